// CUDA kernels of the truncated dispatch: the plan, gather, combine and combine's backward.
//
// The per-token and per-element math is the very code the CPU runs and the C tests check
// (core/route_row.h). The plan uses integer counts and scans only, so it is bit-identical to the
// CPU plan and deterministic without atomics:
//   1. select   one thread per token: its first M active experts -> te [T, M] (workspace);
//   2. count    one thread per (chunk of kChunk tokens, expert): routed tokens -> counts[e][c];
//   3. scan     exclusive scan of counts in (expert, chunk) order -> base (three kernels:
//               tile sums, one block over the tile sums, tiles);
//   4. finish   offsets[e] = base[e][0], -1 for the padding slots s >= N;
//   5. place    one thread per (chunk, expert): walks its chunk's tokens in order and writes the
//               slots base[e][c], base[e][c] + 1, ... (pair_token, pair_expert, token_pairs).
// gather / combine / grad_ys run one warp per row (a slot or a token) with the lanes over the
// features; grad_p runs one warp per (token, pair) with the warp-shuffle tree of route_row.h's dot.
// Every loop is grid-stride (no limit on rows), every launch goes to the caller's stream.
#include <cuda_runtime.h>

#include "core/route_args.h"
#include "core/smoe_math.h"

#define SMOE_SUFFIX f32
#include "core/route_row.h"
#undef SMOE_SUFFIX
#define SMOE_SUFFIX f64
#include "core/route_row.h"
#undef SMOE_SUFFIX

#include "cuda/cuda_utils.cuh"
#include "cuda/launch.h"

namespace {

constexpr int kThreads = 256;          // 1-D kernels
constexpr int kRowsPerBlock = 8;       // 2-D kernels: blockDim = (32, kRowsPerBlock), a warp per row
constexpr int64_t kChunk = 32;         // tokens per (expert, chunk) counter
constexpr int kScanThreads = 256;      // scan tiles: kScanThreads * kScanItems entries
constexpr int kScanItems = 16;
constexpr int64_t kScanTile = static_cast<int64_t>(kScanThreads) * kScanItems;
constexpr int kScanTopThreads = 1024;  // one block over the tile sums
constexpr int64_t kMaxBlocks = 65535;

static_assert(SMOE_ROUTE_LANES == 32, "the dot's lanes are one warp");

// Blocks of `per_block` items for n items, at least 1 and at most kMaxBlocks (the loops are grid-stride).
unsigned blocks_for(int64_t n, int64_t per_block) {
  return static_cast<unsigned>(smoe_cuda_max64(1, smoe_cuda_min64(smoe_cuda_div_up(n, per_block), kMaxBlocks)));
}
unsigned blocks_1d(int64_t n) { return blocks_for(n, kThreads); }
unsigned blocks_rows(int64_t rows) { return blocks_for(rows, kRowsPerBlock); }
int64_t plan_chunks(int64_t tokens) { return smoe_cuda_div_up(tokens, kChunk); }

// ---- plan ---------------------------------------------------------------------------------------

__global__ void select_kernel(smoe_plan_args a, int64_t *te) {
  const int64_t M = a.max_active;
  for (int64_t t = smoe_cuda_global_thread(); t < a.tokens; t += smoe_cuda_global_threads()) {
    smoe_route_select(a.p, a.dtype, a.experts, M, t, te + t * M);
    for (int64_t j = 0; j < M; ++j) a.token_pairs[t * M + j] = -1;
  }
}

__global__ void count_kernel(smoe_plan_args a, const int64_t *te, int64_t chunks, int64_t *counts) {
  const int64_t E = a.experts;
  for (int64_t i = smoe_cuda_global_thread(); i < chunks * E; i += smoe_cuda_global_threads()) {
    const int64_t c = i / E, e = i % E;
    counts[e * chunks + c] = smoe_route_count_chunk(&a, te, c * kChunk, smoe_cuda_min64(a.tokens, (c + 1) * kChunk), e);
  }
}

// Exclusive scan over the threads of a block of N threads (Hillis-Steele in shared memory).
template <int N>
__device__ int64_t block_exclusive_scan(int64_t v, int64_t *total) {
  __shared__ int64_t sh[N];
  const int i = static_cast<int>(threadIdx.x);
  sh[i] = v;
  __syncthreads();
  for (int off = 1; off < N; off <<= 1) {
    const int64_t add = i >= off ? sh[i - off] : 0;
    __syncthreads();
    sh[i] += add;
    __syncthreads();
  }
  const int64_t inclusive = sh[i];
  *total = sh[N - 1];
  __syncthreads();  // sh is reused by the next call
  return inclusive - v;
}

__device__ __forceinline__ int64_t thread_items_sum(const int64_t *x, int64_t L, int64_t begin) {
  int64_t s = 0;
  for (int64_t k = begin; k < smoe_cuda_min64(L, begin + kScanItems); ++k) s += x[k];
  return s;
}

__global__ void scan_tiles_kernel(const int64_t *counts, int64_t L, int64_t tiles, int64_t *tile_sums) {
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t begin = tile * kScanTile + static_cast<int64_t>(threadIdx.x) * kScanItems;
    int64_t total = 0;
    block_exclusive_scan<kScanThreads>(thread_items_sum(counts, L, begin), &total);
    if (threadIdx.x == 0) tile_sums[tile] = total;
  }
}

// One block: tile_sums[0..tiles) become their exclusive scan, tile_sums[tiles] the total.
__global__ void scan_top_kernel(int64_t *tile_sums, int64_t tiles) {
  const int64_t per = smoe_cuda_div_up(tiles, kScanTopThreads);
  const int64_t begin = static_cast<int64_t>(threadIdx.x) * per, end = smoe_cuda_min64(tiles, begin + per);
  int64_t local = 0;
  for (int64_t k = begin; k < end; ++k) local += tile_sums[k];
  int64_t total = 0;
  int64_t run = block_exclusive_scan<kScanTopThreads>(local, &total);
  for (int64_t k = begin; k < end; ++k) {
    const int64_t v = tile_sums[k];
    tile_sums[k] = run;
    run += v;
  }
  if (threadIdx.x == 0) tile_sums[tiles] = total;
}

__global__ void scan_apply_kernel(const int64_t *counts, int64_t L, int64_t tiles, const int64_t *tile_sums,
                                  int64_t *base) {
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t begin = tile * kScanTile + static_cast<int64_t>(threadIdx.x) * kScanItems;
    int64_t total = 0;
    int64_t run = tile_sums[tile] + block_exclusive_scan<kScanThreads>(thread_items_sum(counts, L, begin), &total);
    for (int64_t k = begin; k < smoe_cuda_min64(L, begin + kScanItems); ++k) {
      base[k] = run;
      run += counts[k];
    }
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) base[L] = tile_sums[tiles];
}

__global__ void finish_kernel(smoe_plan_args a, const int64_t *base, int64_t chunks) {
  const int64_t E = a.experts, P = a.tokens * a.max_active;
  const int64_t N = base[E * chunks];
  for (int64_t i = smoe_cuda_global_thread(); i < smoe_cuda_max64(E + 1, P); i += smoe_cuda_global_threads()) {
    if (i <= E) a.offsets[i] = base[i * chunks];
    if (i < P && i >= N) {
      a.pair_token[i] = -1;
      a.pair_expert[i] = -1;
    }
  }
}

__global__ void place_kernel(smoe_plan_args a, const int64_t *te, const int64_t *base, int64_t chunks) {
  const int64_t E = a.experts;
  for (int64_t i = smoe_cuda_global_thread(); i < chunks * E; i += smoe_cuda_global_threads()) {
    const int64_t c = i / E, e = i % E;
    smoe_route_place_chunk(&a, te, c * kChunk, smoe_cuda_min64(a.tokens, (c + 1) * kChunk), e, base[e * chunks + c]);
  }
}

// ---- gather / combine -------------------------------------------------------------------------

__global__ void gather_kernel(smoe_gather_args a) {
  const int64_t d = a.d;
  for (int64_t s = smoe_cuda_first_row(); s < a.slots; s += smoe_cuda_row_stride()) {
    const int64_t t = a.pair_token[s];
    if (t >= 0 && t < a.tokens) {
      for (int64_t f = threadIdx.x; f < d; f += blockDim.x) smoe_route_copy(a.xs, s * d + f, a.x, t * d + f, a.dtype);
    } else {
      for (int64_t f = threadIdx.x; f < d; f += blockDim.x) smoe_route_zero(a.xs, s * d + f, a.dtype);
    }
  }
}

// The math-type functions of route_row.h as static members of RouteMath<RT>, RT = float (their _f32
// variants) or double (_f64), for the kernels below, which are templates over the math type.
template <typename RT>
struct RouteMath;

#define SMOE_ROUTE_MATH(RT, SUFFIX)                                                                     \
  template <>                                                                                           \
  struct RouteMath<RT> {                                                                                \
    static __device__ RT combine_elem(const smoe_combine_args *a, int64_t t, int64_t f, int *bad) {     \
      return smoe_route_combine_elem_##SUFFIX(a, t, f, bad);                                            \
    }                                                                                                   \
    static __device__ void store(void *dst, smoe_dtype dt, int64_t i, RT v) {                           \
      smoe_store_##SUFFIX(dst, dt, i, v);                                                               \
    }                                                                                                   \
    static __device__ RT load(const void *src, smoe_dtype dt, int64_t i) {                              \
      return smoe_load_##SUFFIX(src, dt, i);                                                            \
    }                                                                                                   \
    static __device__ void scale_elem(void *dst, int64_t di, RT w, const void *src, int64_t si,         \
                                      smoe_dtype dt) {                                                  \
      smoe_route_scale_elem_##SUFFIX(dst, di, w, src, si, dt);                                          \
    }                                                                                                   \
    static __device__ RT dot_lane(const void *x, const void *y, smoe_dtype dt, int64_t xo, int64_t yo,  \
                                  int64_t d, int64_t lane) {                                            \
      return smoe_route_dot_lane_##SUFFIX(x, y, dt, xo, yo, d, lane);                                   \
    }                                                                                                   \
  };
SMOE_ROUTE_MATH(float, f32)
SMOE_ROUTE_MATH(double, f64)
#undef SMOE_ROUTE_MATH

template <typename RT>
__global__ void combine_kernel(smoe_combine_args a) {
  const int64_t d = a.d;
  for (int64_t t = smoe_cuda_first_row(); t < a.tokens; t += smoe_cuda_row_stride()) {
    for (int64_t f = threadIdx.x; f < d; f += blockDim.x) {
      int bad = 0;
      RouteMath<RT>::store(a.y, a.ys_dtype, t * d + f, RouteMath<RT>::combine_elem(&a, t, f, &bad));
    }
  }
}

// grad_ys[s] = p[t, e] * grad_y[t] for a routed slot, a zero row for padding (or a bad index).
template <typename RT>
__global__ void grad_ys_kernel(smoe_combine_bwd_args a) {
  const int64_t d = a.d;
  for (int64_t s = smoe_cuda_first_row(); s < a.slots; s += smoe_cuda_row_stride()) {
    const int64_t t = a.pair_token[s];
    const int64_t e = (t >= 0 && t < a.tokens) ? a.pair_expert[s] : -1;
    if (e >= 0 && e < a.experts) {
      const RT w = RouteMath<RT>::load(a.p, a.p_dtype, t * a.experts + e);
      for (int64_t f = threadIdx.x; f < d; f += blockDim.x)
        RouteMath<RT>::scale_elem(a.grad_ys, s * d + f, w, a.grad_y, t * d + f, a.ys_dtype);
    } else {
      for (int64_t f = threadIdx.x; f < d; f += blockDim.x) smoe_route_zero(a.grad_ys, s * d + f, a.ys_dtype);
    }
  }
}

// grad_p[t, e] = <grad_y[t], ys[s]> for each routed pair (t, j): a warp per pair, lane l sums the
// features l, l + 32, ..., then the shuffle-down tree 16, 8, 4, 2, 1 (route_row.h's dot order).
// grad_p is zero-filled before the launch.
template <typename RT>
__global__ void grad_p_kernel(smoe_combine_bwd_args a) {
  const int64_t M = a.max_active, P = a.tokens * M;
  const int64_t lane = threadIdx.x;
  for (int64_t pair = smoe_cuda_first_row(); pair < P; pair += smoe_cuda_row_stride()) {
    const int64_t t = pair / M;
    const int64_t s = a.token_pairs[pair];
    const int64_t e = (s >= 0 && s < a.slots) ? a.pair_expert[s] : -1;
    if (e < 0 || e >= a.experts) continue;  // uniform over the warp
    RT v = RouteMath<RT>::dot_lane(a.grad_y, a.ys, a.ys_dtype, t * a.d, s * a.d, a.d, lane);
    for (int w = SMOE_ROUTE_LANES / 2; w > 0; w /= 2) v += __shfl_down_sync(0xffffffffu, v, w);
    if (lane == 0) RouteMath<RT>::store(a.grad_p, a.p_dtype, t * a.experts + e, v);
  }
}

struct PlanWorkspace {
  int64_t chunks, L, tiles;
  int64_t *te, *counts, *base, *tile_sums;
};

PlanWorkspace plan_layout(int64_t T, int64_t E, int64_t M, void *ws) {
  PlanWorkspace w;
  w.chunks = plan_chunks(T);
  w.L = w.chunks * E;
  w.tiles = smoe_cuda_max64(1, smoe_cuda_div_up(w.L, kScanTile));
  int64_t *p = static_cast<int64_t *>(ws);
  w.te = p;
  w.counts = w.te + T * M;
  w.base = w.counts + w.L;
  w.tile_sums = w.base + w.L + 1;
  return w;
}

}  // namespace

extern "C" size_t smoe_cuda_plan_workspace_bytes(int64_t tokens, int64_t experts, int64_t max_active) {
  if (tokens < 0 || experts < 1 || max_active < 1) return 0;
  PlanWorkspace w = plan_layout(tokens, experts, max_active, nullptr);
  const int64_t words = tokens * max_active + w.L + (w.L + 1) + (w.tiles + 1);
  return static_cast<size_t>(words) * sizeof(int64_t);
}

extern "C" smoe_status smoe_cuda_dispatch_plan(const smoe_plan_args *args, void *workspace, void *stream) {
  if (!smoe_route_valid_plan(args)) return SMOE_ERR_ARG;
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const smoe_plan_args a = *args;
  const int64_t T = a.tokens, E = a.experts;
  if (T == 0) {
    if (cudaMemsetAsync(a.offsets, 0, static_cast<size_t>(E + 1) * sizeof(int64_t), st) != cudaSuccess)
      return SMOE_ERR_DEVICE;
    return SMOE_OK;
  }
  if (!workspace) return SMOE_ERR_ARG;
  const PlanWorkspace w = plan_layout(T, E, a.max_active, workspace);
  const unsigned scan_blocks = static_cast<unsigned>(smoe_cuda_min64(w.tiles, kMaxBlocks));
  select_kernel<<<blocks_1d(T), kThreads, 0, st>>>(a, w.te);
  count_kernel<<<blocks_1d(w.L), kThreads, 0, st>>>(a, w.te, w.chunks, w.counts);
  scan_tiles_kernel<<<scan_blocks, kScanThreads, 0, st>>>(w.counts, w.L, w.tiles, w.tile_sums);
  scan_top_kernel<<<1, kScanTopThreads, 0, st>>>(w.tile_sums, w.tiles);
  scan_apply_kernel<<<scan_blocks, kScanThreads, 0, st>>>(w.counts, w.L, w.tiles, w.tile_sums, w.base);
  finish_kernel<<<blocks_1d(smoe_cuda_max64(E + 1, T * a.max_active)), kThreads, 0, st>>>(a, w.base, w.chunks);
  place_kernel<<<blocks_1d(w.L), kThreads, 0, st>>>(a, w.te, w.base, w.chunks);
  return smoe_cuda_launch_status();
}

extern "C" smoe_status smoe_cuda_gather_rows(const smoe_gather_args *args, void *stream) {
  if (!smoe_route_valid_gather(args)) return SMOE_ERR_ARG;
  if (args->slots == 0 || args->d == 0) return SMOE_OK;
  if (!smoe_route_gather_pointers(args)) return SMOE_ERR_ARG;
  const dim3 block(32, kRowsPerBlock);
  gather_kernel<<<blocks_rows(args->slots), block, 0, static_cast<cudaStream_t>(stream)>>>(*args);
  return smoe_cuda_launch_status();
}

extern "C" smoe_status smoe_cuda_combine_rows(const smoe_combine_args *args, void *stream) {
  if (!smoe_route_valid_combine(args)) return SMOE_ERR_ARG;
  if (args->tokens == 0 || args->d == 0) return SMOE_OK;
  if (!smoe_route_combine_pointers(args)) return SMOE_ERR_ARG;
  const dim3 block(32, kRowsPerBlock);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const bool f64 = args->ys_dtype == SMOE_F64 || (args->p && args->p_dtype == SMOE_F64);
  if (f64)
    combine_kernel<double><<<blocks_rows(args->tokens), block, 0, st>>>(*args);
  else
    combine_kernel<float><<<blocks_rows(args->tokens), block, 0, st>>>(*args);
  return smoe_cuda_launch_status();
}

extern "C" smoe_status smoe_cuda_combine_bwd(const smoe_combine_bwd_args *args, void *stream) {
  if (!smoe_route_valid_combine_bwd(args)) return SMOE_ERR_ARG;
  if (args->tokens == 0) return SMOE_OK;
  if (!smoe_route_combine_bwd_pointers(args)) return SMOE_ERR_ARG;
  const dim3 block(32, kRowsPerBlock);
  cudaStream_t st = static_cast<cudaStream_t>(stream);
  const int64_t P = args->tokens * args->max_active;
  const size_t p_bytes = static_cast<size_t>(args->tokens * args->experts) * smoe_dtype_size(args->p_dtype);
  if (cudaMemsetAsync(args->grad_p, 0, p_bytes, st) != cudaSuccess) return SMOE_ERR_DEVICE;
  const bool f64 = args->ys_dtype == SMOE_F64 || args->p_dtype == SMOE_F64;
  if (args->d > 0) {
    if (f64)
      grad_ys_kernel<double><<<blocks_rows(args->slots), block, 0, st>>>(*args);
    else
      grad_ys_kernel<float><<<blocks_rows(args->slots), block, 0, st>>>(*args);
  }
  if (f64)
    grad_p_kernel<double><<<blocks_rows(P), block, 0, st>>>(*args);
  else
    grad_p_kernel<float><<<blocks_rows(P), block, 0, st>>>(*args);
  return smoe_cuda_launch_status();
}
