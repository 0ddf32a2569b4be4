// LapSum soft top-k on the GPU: one thread per row, running the very same per-row functions as the
// CPU path (csrc/core/lapsum_row.h), so the CPU tests check the arithmetic the GPU runs.
//
// Launch shape (smoe_cuda_topk_shape): `threads` threads in total in blocks of `block`, a grid-stride
// loop over rows (row = t, t + threads, ...), so any number of rows runs in one launch and gridDim.y
// is never used. A thread runs a whole row, so a call of R rows has at most R threads to spread:
// blocks shrink from 128 to 32 threads until there is a block for every multiprocessor (4,096 rows:
// 128 blocks of 32 on the 132 SMs of an H100, where blocks of 128 left three quarters of them idle).
//
// Workspace: the caller gives threads * smoe_topk_scratch_bytes(dtype, n, max_active) bytes. The
// per-row scratch of core/lapsum_args.h (`reals` words of the math type R, then `indices` int32
// words) is interleaved over the threads so that word j of thread t lives at region[j * threads + t]:
//
//   bytes [0, index_offset)       reals:   ((R *)ws)[j * threads + t]
//   bytes [index_offset, total)   indices: ((int32_t *)(ws + index_offset))[j * threads + t]
//
// with index_offset = smoe_topk_scratch_index_offset(dtype, n, max_active, threads) and
// total = threads * smoe_topk_scratch_bytes. Each thread passes rs = reals + t, is = indices + t
// and ss = threads, which is what lapsum_row.h's SMOE_AT(arr, j) = arr[j * ss] expects.
// Neighbouring threads thus touch neighbouring words whenever they work on the same j.
#include <cuda_runtime.h>

#include "core/lapsum_args.h"
#include "core/smoe_math.h"

#define SMOE_SUFFIX f32
#include "core/lapsum_row.h"
#undef SMOE_SUFFIX
#define SMOE_SUFFIX f64
#include "core/lapsum_row.h"
#undef SMOE_SUFFIX

#include "cuda/cuda_utils.cuh"
#include "cuda/launch.h"

namespace {

// Most threads per block of the soft top-k kernels (blocks of 32 and 64 are used for few rows).
constexpr int kBlock = 128;
// Upper bounds on the total number of threads: 65536 (2048 warps, about 15 per SM on an H100 or 19
// on an A100: enough to hide latency), and as many as kScratchBudget bytes of scratch allow (at
// E = 256, f32 with max_active = 8 takes 2080 B per thread, f64 with max_active = 256 7168 B), but
// never fewer than one warp per multiprocessor (or one warp) while there are rows for them: the
// workspace is at most max(kScratchBudget, sm_count * 32 * scratch per row).
constexpr int64_t kMaxThreads = 65536;
constexpr int64_t kScratchBudget = int64_t{64} << 20;
// threads is rounded up to a multiple of this, so that for a fixed j the 32 words of a warp form
// one aligned segment of the interleaved scratch.
constexpr int64_t kThreadQuantum = 32;

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

// args is passed by value: it is a small struct of sizes and device pointers.
template <typename R>
__global__ void __launch_bounds__(kBlock)
    smoe_topk_fwd_kernel(const smoe_topk_fwd_args args, R *reals, int32_t *indices, int64_t threads) {
  const int64_t t = smoe_cuda_global_thread();
  if (t >= threads) return;
  for (int64_t row = t; row < args.rows; row += threads) fwd_row(&args, row, reals + t, indices + t, threads);
}

template <typename R>
__global__ void __launch_bounds__(kBlock)
    smoe_topk_bwd_kernel(const smoe_topk_bwd_args args, R *reals, int32_t *indices, int64_t threads) {
  const int64_t t = smoe_cuda_global_thread();
  if (t >= threads) return;
  R *gk = (R *)args.grad_k_rows, *ga = (R *)args.grad_alpha_rows;
  for (int64_t row = t; row < args.rows; row += threads) bwd_row(&args, row, reals + t, indices + t, threads, gk + row, ga + row);
}

// Splits the workspace into the interleaved real and index regions (see the top of this file).
// Returns false when the workspace or the thread count cannot be right.
bool split_workspace(smoe_dtype dtype, int64_t n, int64_t max_active, void *workspace, int64_t threads,
                     void **reals, int32_t **indices) {
  const size_t per_row = smoe_topk_scratch_bytes(dtype, n, max_active);
  if (per_row == 0 || !workspace || !smoe_cuda_aligned(workspace, smoe_real_size(dtype))) return false;
  // threads * per_row must be a representable size (the caller allocated that many bytes).
  if (threads < 1 || threads > INT32_MAX || (uint64_t)threads > (uint64_t)INT64_MAX / per_row) return false;
  *reals = workspace;
  *indices = (int32_t *)((char *)workspace + smoe_topk_scratch_index_offset(dtype, n, max_active, threads));
  return true;
}

unsigned int grid_for(int64_t threads, int block) { return (unsigned int)smoe_cuda_div_up(threads, block); }

bool valid_block(int block) { return block == 32 || block == 64 || block == kBlock; }

}  // namespace

extern "C" void smoe_cuda_topk_shape(int64_t rows, size_t row_scratch_bytes, int sm_count, int64_t *threads,
                                     int *block) {
  *threads = 0;
  *block = kBlock;
  if (rows <= 0) return;
  const int64_t sms = sm_count > 0 ? sm_count : 1;
  const int64_t per_row = row_scratch_bytes > 0 ? (int64_t)row_scratch_bytes : 1;
  const int64_t by_budget = smoe_cuda_max64(kScratchBudget / per_row / kThreadQuantum, sms) * kThreadQuantum;
  const int64_t wanted = smoe_cuda_div_up(rows, kThreadQuantum) * kThreadQuantum;
  *threads = smoe_cuda_min64(smoe_cuda_min64(wanted, kMaxThreads), by_budget);
  while (*block > 32 && smoe_cuda_div_up(*threads, *block) < sms) *block /= 2;
}

extern "C" smoe_status smoe_cuda_topk_fwd(const smoe_topk_fwd_args *a, void *workspace, int64_t threads, int block,
                                          void *stream) {
  if (!smoe_topk_fwd_valid(a)) return SMOE_ERR_ARG;
  if (a->rows == 0) return SMOE_OK;
  if (!smoe_topk_fwd_pointers(a) || !valid_block(block)) return SMOE_ERR_ARG;
  void *reals;
  int32_t *indices;
  if (!split_workspace(a->dtype, a->n, a->max_active, workspace, threads, &reals, &indices)) return SMOE_ERR_ARG;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a->dtype == SMOE_F64)
    smoe_topk_fwd_kernel<double><<<grid_for(threads, block), block, 0, s>>>(*a, (double *)reals, indices, threads);
  else
    smoe_topk_fwd_kernel<float><<<grid_for(threads, block), block, 0, s>>>(*a, (float *)reals, indices, threads);
  return smoe_cuda_launch_status();
}

extern "C" smoe_status smoe_cuda_topk_bwd(const smoe_topk_bwd_args *a, void *workspace, int64_t threads, int block,
                                          void *stream) {
  if (!smoe_topk_bwd_valid(a)) return SMOE_ERR_ARG;
  if (a->rows == 0) return SMOE_OK;
  if (!smoe_topk_bwd_pointers(a) || !valid_block(block)) return SMOE_ERR_ARG;
  void *reals;
  int32_t *indices;
  if (!split_workspace(a->dtype, a->n, a->max_active, workspace, threads, &reals, &indices)) return SMOE_ERR_ARG;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a->dtype == SMOE_F64)
    smoe_topk_bwd_kernel<double><<<grid_for(threads, block), block, 0, s>>>(*a, (double *)reals, indices, threads);
  else
    smoe_topk_bwd_kernel<float><<<grid_for(threads, block), block, 0, s>>>(*a, (float *)reals, indices, threads);
  return smoe_cuda_launch_status();
}
