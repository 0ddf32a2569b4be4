// Deterministic sum on the GPU: the gradient of a shared k (the budget gradient) or alpha is the sum
// of the per-row contributions, and it must come out bit-identical run to run.
//
// A fixed two-level tree with no atomics, accumulated in double (float inputs are widened, the
// result is rounded to float once at the end):
//   pass 1: block b sums x[b * CHUNK, (b + 1) * CHUNK): thread i adds, in order, the elements
//           b * CHUNK + j * BLOCK + i for j = 0 .. CHUNK / BLOCK - 1 (out-of-range ones skipped),
//           then a shared-memory tree with halving strides; the result goes to partials[b].
//   pass 2: one block sums the ceil(n / CHUNK) partials the same way (thread i: partials i,
//           i + BLOCK, ... in order, then the same tree) and writes *out.
// Every addition and its order is a function of n alone (not of the stream, the device's SM count
// or scheduling), hence the same bits every run. The tree differs from the CPU's smoe_sum_*, so the
// two agree to rounding, not bit for bit.
#include <cuda_runtime.h>

#include "cuda/cuda_utils.cuh"
#include "cuda/launch.h"

namespace {

constexpr int kBlock = 256;   // threads per block, both passes (a power of two)
constexpr int kChunk = 2048;  // elements per block in pass 1 (a multiple of kBlock)

static_assert((kBlock & (kBlock - 1)) == 0, "kBlock must be a power of two");
static_assert(kChunk % kBlock == 0, "kChunk must be a multiple of kBlock");

// Fixed-shape tree over the block's kBlock values; the total ends in sh[0].
__device__ __forceinline__ void block_tree(double *sh) {
  const unsigned int tid = threadIdx.x;
  __syncthreads();
  for (unsigned int stride = kBlock / 2; stride > 0; stride >>= 1) {
    if (tid < stride) sh[tid] += sh[tid + stride];
    __syncthreads();
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlock) smoe_sum_chunks_kernel(const T *x, int64_t n, double *partials) {
  __shared__ double sh[kBlock];
  const int64_t begin = (int64_t)blockIdx.x * kChunk;
  double acc = 0.0;
  for (int j = 0; j < kChunk / kBlock; ++j) {
    const int64_t i = begin + (int64_t)j * kBlock + threadIdx.x;
    if (i < n) acc += (double)x[i];
  }
  sh[threadIdx.x] = acc;
  block_tree(sh);
  if (threadIdx.x == 0) partials[blockIdx.x] = sh[0];
}

template <typename T>
__global__ void __launch_bounds__(kBlock) smoe_sum_partials_kernel(const double *partials, int64_t count,
                                                                           T *out) {
  __shared__ double sh[kBlock];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kBlock) acc += partials[i];
  sh[threadIdx.x] = acc;
  block_tree(sh);
  if (threadIdx.x == 0) *out = (T)sh[0];
}

int64_t num_chunks(int64_t n) { return n > 0 ? smoe_cuda_div_up(n, kChunk) : 0; }

template <typename T>
smoe_status launch_sum(const T *x, int64_t n, T *out, double *partials, cudaStream_t stream) {
  const int64_t chunks = num_chunks(n);
  if (chunks > 0) {
    smoe_sum_chunks_kernel<T><<<(unsigned int)chunks, kBlock, 0, stream>>>(x, n, partials);
    const smoe_status st = smoe_cuda_launch_status();
    if (st != SMOE_OK) return st;
  }
  // With n == 0 there are no partials and this writes 0.
  smoe_sum_partials_kernel<T><<<1, kBlock, 0, stream>>>(partials, chunks, out);
  return smoe_cuda_launch_status();
}

}  // namespace

extern "C" size_t smoe_cuda_sum_workspace_bytes(int64_t n) { return (size_t)num_chunks(n) * sizeof(double); }

extern "C" smoe_status smoe_cuda_sum(const void *x, smoe_dtype dtype, int64_t n, void *out, void *workspace,
                                     void *stream) {
  if (n < 0 || !out || (dtype != SMOE_F32 && dtype != SMOE_F64)) return SMOE_ERR_ARG;
  if (num_chunks(n) > INT32_MAX) return SMOE_ERR_ARG;  // one block per chunk in gridDim.x
  if (n > 0 && (!x || !workspace || !smoe_cuda_aligned(workspace, sizeof(double)))) return SMOE_ERR_ARG;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == SMOE_F64) return launch_sum((const double *)x, n, (double *)out, (double *)workspace, s);
  return launch_sum((const float *)x, n, (float *)out, (double *)workspace, s);
}
