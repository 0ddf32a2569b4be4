/* LapSum soft top-k on the GPU: one thread per row, running the very same per-row functions as the
 * CPU path (csrc/core/lapsum_row.h), so the CPU tests check the arithmetic the GPU runs.
 *
 * Launch shape: `threads` threads in total (smoe_cuda_topk_threads), a grid-stride loop over rows
 * (row = t, t + threads, ...), so any number of rows runs in one launch and gridDim.y is never used.
 *
 * Workspace: the caller gives threads * smoe_topk_scratch_bytes(dtype, n, max_active) bytes. The
 * per-row scratch of lapsum.c (real_words words of the math type R, then max(2 * max_active, n) int32
 * indices)
 * is interleaved over the threads so that word j of thread t lives at region[j * threads + t]:
 *
 *   bytes [0, real_words * threads * sizeof(R))          reals:   ((R *)ws)[j * threads + t]
 *   bytes [real_words * threads * sizeof(R), total)       indices: ((int32_t *)...)[j * threads + t]
 *
 * total = threads * (real_words * sizeof(R) + index_words * 4) = threads * smoe_topk_scratch_bytes.
 * The index region starts at a multiple of sizeof(R) >= 4 bytes from the (sizeof(R)-aligned) base,
 * so it is int32-aligned. Each thread passes rs = reals + t, is = indices + t and ss = threads, which
 * is what lapsum_row.h's SMOE_AT(arr, j) = arr[j * ss] expects. Neighbouring threads thus touch
 * neighbouring words whenever they work on the same j.
 */
#include <cuda_runtime.h>

#include "../core/smoe_math.h"

#define SMOE_SUFFIX f32
#include "../core/lapsum_row.h"
#undef SMOE_SUFFIX
#define SMOE_SUFFIX f64
#include "../core/lapsum_row.h"
#undef SMOE_SUFFIX

#include "cuda_utils.cuh"
#include "launch.h"

/* Threads per block of the soft top-k kernels. */
#define SMOE_TOPK_BLOCK 128
/* Upper bound on the total number of threads, which bounds the workspace at
 * SMOE_TOPK_MAX_THREADS * smoe_topk_scratch_bytes: at E = 256, 130 MiB for f32/bf16/f16 with
 * max_active = 8 (2080 B per thread), 256 MiB with max_active = 256 (4096 B), 448 MiB for f64 with
 * max_active = 256 (7168 B). 65536 threads are 2048 warps, about 15 per SM on an H100 (132 SMs)
 * or 19 on an A100 (108): enough to hide latency for this launch-bound op without a larger buffer. */
#define SMOE_TOPK_MAX_THREADS 65536
/* threads is rounded up to a multiple of this, so that for a fixed j the 32 words of a warp form
 * one aligned segment of the interleaved scratch. */
#define SMOE_TOPK_THREAD_QUANTUM 32

namespace {

__device__ __forceinline__ void fwd_row(const smoe_topk_fwd_args *a, int64_t row, float *rs, int32_t *is,
                                        int64_t ss) {
  smoe_topk_fwd_row_f32(a, row, rs, is, ss);
}

__device__ __forceinline__ void fwd_row(const smoe_topk_fwd_args *a, int64_t row, double *rs, int32_t *is,
                                        int64_t ss) {
  smoe_topk_fwd_row_f64(a, row, rs, is, ss);
}

__device__ __forceinline__ void bwd_row(const smoe_topk_bwd_args *a, int64_t row, float *rs, int32_t *is, int64_t ss,
                                        float *gk, float *ga) {
  smoe_topk_bwd_row_f32(a, row, rs, is, ss, gk, ga);
}

__device__ __forceinline__ void bwd_row(const smoe_topk_bwd_args *a, int64_t row, double *rs, int32_t *is,
                                        int64_t ss, double *gk, double *ga) {
  smoe_topk_bwd_row_f64(a, row, rs, is, ss, gk, ga);
}

/* args is passed by value: it is a small struct of sizes and device pointers. */
template <typename R>
__global__ void __launch_bounds__(SMOE_TOPK_BLOCK)
    smoe_topk_fwd_kernel(const smoe_topk_fwd_args args, R *reals, int32_t *indices, int64_t threads) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= threads) return;
  for (int64_t row = t; row < args.rows; row += threads) fwd_row(&args, row, reals + t, indices + t, threads);
}

template <typename R>
__global__ void __launch_bounds__(SMOE_TOPK_BLOCK)
    smoe_topk_bwd_kernel(const smoe_topk_bwd_args args, R *reals, int32_t *indices, int64_t threads) {
  const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= threads) return;
  R *gk = (R *)args.grad_k_rows, *ga = (R *)args.grad_alpha_rows;
  for (int64_t row = t; row < args.rows; row += threads) bwd_row(&args, row, reals + t, indices + t, threads, gk + row, ga + row);
}

bool valid_dtype(smoe_dtype d) { return d == SMOE_F32 || d == SMOE_F64 || d == SMOE_BF16 || d == SMOE_F16; }

/* The same checks as lapsum.c's valid_shape for the full row range. */
bool valid_shape(int64_t rows, int64_t n, int64_t max_active, double eps) {
  if (rows < 0 || n < 1 || n > INT32_MAX) return false; /* candidate indices are stored as int32 */
  if (max_active < 1 || max_active > n) return false;
  return eps >= 0.0 && eps < 0.5;
}

/* Splits the workspace into the interleaved real and index regions (see the top of this file).
 * Returns false when the workspace or the thread count cannot be right. */
bool split_workspace(smoe_dtype dtype, int64_t n, int64_t max_active, void *workspace, int64_t threads,
                     void **reals, int32_t **indices) {
  const size_t real_size = dtype == SMOE_F64 ? sizeof(double) : sizeof(float);
  const size_t per_row = smoe_topk_scratch_bytes(dtype, n, max_active);
  const size_t index_bytes = (size_t)(2 * max_active > n ? 2 * max_active : n) * sizeof(int32_t);
  if (per_row <= index_bytes || (per_row - index_bytes) % real_size != 0) return false;
  if (!workspace || !smoe_cuda_aligned(workspace, real_size)) return false;
  /* threads * per_row must be a representable size (the caller allocated that many bytes). */
  if (threads < 1 || threads > INT32_MAX || (uint64_t)threads > (uint64_t)INT64_MAX / per_row) return false;
  const size_t real_words = (per_row - index_bytes) / real_size;
  *reals = workspace;
  *indices = (int32_t *)((char *)workspace + real_words * real_size * (size_t)threads);
  return true;
}

unsigned int grid_for(int64_t threads) { return (unsigned int)smoe_cuda_div_up(threads, SMOE_TOPK_BLOCK); }

}  // namespace

extern "C" int64_t smoe_cuda_topk_threads(int64_t rows) {
  if (rows <= 0) return 0;
  const int64_t t = smoe_cuda_div_up(rows, SMOE_TOPK_THREAD_QUANTUM) * SMOE_TOPK_THREAD_QUANTUM;
  return t < SMOE_TOPK_MAX_THREADS ? t : SMOE_TOPK_MAX_THREADS;
}

extern "C" smoe_status smoe_cuda_topk_fwd(const smoe_topk_fwd_args *a, void *workspace, int64_t threads,
                                          void *stream) {
  if (!a || !valid_dtype(a->dtype) || !valid_shape(a->rows, a->n, a->max_active, a->eps)) return SMOE_ERR_ARG;
  if (a->rows == 0) return SMOE_OK;
  if (!a->scores || !a->k || !a->alpha || !a->p || !a->threshold) return SMOE_ERR_ARG;
  if (a->k_stride < 0 || a->alpha_stride < 0) return SMOE_ERR_ARG;
  void *reals;
  int32_t *indices;
  if (!split_workspace(a->dtype, a->n, a->max_active, workspace, threads, &reals, &indices)) return SMOE_ERR_ARG;
  cudaStream_t s = (cudaStream_t)stream;
  if (a->dtype == SMOE_F64)
    smoe_topk_fwd_kernel<double><<<grid_for(threads), SMOE_TOPK_BLOCK, 0, s>>>(*a, (double *)reals, indices, threads);
  else
    smoe_topk_fwd_kernel<float><<<grid_for(threads), SMOE_TOPK_BLOCK, 0, s>>>(*a, (float *)reals, indices, threads);
  return smoe_cuda_launch_status();
}

extern "C" smoe_status smoe_cuda_topk_bwd(const smoe_topk_bwd_args *a, void *workspace, int64_t threads,
                                          void *stream) {
  if (!a || !valid_dtype(a->dtype) || !valid_shape(a->rows, a->n, a->max_active, a->eps)) return SMOE_ERR_ARG;
  if (a->rows == 0) return SMOE_OK;
  if (!a->grad_p || !a->scores || !a->p || !a->threshold || !a->alpha || !a->grad_scores || !a->grad_k_rows ||
      !a->grad_alpha_rows || a->alpha_stride < 0)
    return SMOE_ERR_ARG;
  void *reals;
  int32_t *indices;
  if (!split_workspace(a->dtype, a->n, a->max_active, workspace, threads, &reals, &indices)) return SMOE_ERR_ARG;
  cudaStream_t s = (cudaStream_t)stream;
  if (a->dtype == SMOE_F64)
    smoe_topk_bwd_kernel<double><<<grid_for(threads), SMOE_TOPK_BLOCK, 0, s>>>(*a, (double *)reals, indices, threads);
  else
    smoe_topk_bwd_kernel<float><<<grid_for(threads), SMOE_TOPK_BLOCK, 0, s>>>(*a, (float *)reals, indices, threads);
  return smoe_cuda_launch_status();
}
