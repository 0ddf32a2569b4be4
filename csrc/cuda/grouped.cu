// Grouped matmul over expert-contiguous row segments on the GPU (the expert compute of
// csrc/torch/experts_cuda.cpp): a fixed number of launches whatever the number of experts, the
// segment bounds read on the device only (no host sync, capturable in a CUDA graph).
//
// Segments. offsets[e] .. offsets[e + 1] are expert e's rows; rows from offsets[E] on are padding.
// The launchers never read offsets on the host, so they cannot reject bad ones: the first kernel
// turns them into bounds that are always valid (bound[0] = 0, bound[e + 1] = the running maximum
// of offsets[1 .. e + 1] clamped to [0, rows], bound[E + 1] = rows) and every other kernel reads
// those. Valid offsets are unchanged by this; invalid ones give defined output (each row written by
// exactly one block, never a race or a read out of bounds) instead of an error. Segment E is the
// padding: its rows are written as zeros.
//
// Tiles. Segment s holds ceil(len_s / kTileM) row tiles; tile_start (an exclusive scan of those
// counts, in the workspace) numbers them, and block b of the product finds its segment by binary
// search. ceil(rows / kTileM) + E + 1 blocks cover every possible split; blocks past the last tile
// return at once.
//
// Arithmetic: products accumulate in float (double for f64) over the whole reduction, in a fixed
// order (k ascending in steps of kTileK, each step in ascending k), so the result is the same bits
// every run; 16-bit results are rounded once, at the store. The weight gradient reduces over a
// segment's rows in one block per output tile: an expert's gradient is summed in float over all its
// rows (never rounded to 16 bits between chunks) and written once; an expert without rows gets 0.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/cuda_utils.cuh"
#include "cuda/launch.h"

namespace {

constexpr int kTileM = 64, kTileN = 64, kTileK = 16;
constexpr int kThreads = 256;  // 16 x 16 threads, each 4 x 4 outputs of a 64 x 64 tile
constexpr int kScanThreads = 1024;
static_assert(kTileM == 4 * 16 && kTileN == 4 * 16, "each of the 16 x 16 threads owns 4 x 4 outputs");
static_assert(kTileM * kTileK == 4 * kThreads && kTileK * kTileN == 4 * kThreads, "4 loads per thread per tile");

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half(v); }

// Inclusive block-wide scan of one int64 per thread (kScanThreads threads) with `op`, through
// shared memory `sh` [kScanThreads]: Hillis-Steele, a fixed order.
template <typename Op>
__device__ int64_t block_scan(int64_t v, int64_t *sh, Op op) {
  const int t = threadIdx.x;
  sh[t] = v;
  __syncthreads();
  for (int stride = 1; stride < kScanThreads; stride <<= 1) {
    const int64_t other = t >= stride ? sh[t - stride] : 0;
    __syncthreads();
    if (t >= stride) sh[t] = op(sh[t], other);
    __syncthreads();
  }
  const int64_t out = sh[t];
  __syncthreads();
  return out;
}

struct MaxOp {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a > b ? a : b; }
};
struct SumOp {
  __device__ int64_t operator()(int64_t a, int64_t b) const { return a + b; }
};

// One block of kScanThreads: bound[0 .. E + 1] and tile_start[0 .. E + 1] (see the top of the file),
// `tile_rows` rows per tile (0: no tiles needed, only the bounds).
__global__ void __launch_bounds__(kScanThreads)
    smoe_segments_kernel(const int64_t *offsets, int64_t experts, int64_t rows, int64_t tile_rows, int64_t *bound,
                         int64_t *tile_start) {
  __shared__ int64_t sh[kScanThreads];
  __shared__ int64_t carry_max, carry_tiles;
  if (threadIdx.x == 0) {
    carry_max = 0;
    carry_tiles = 0;
    bound[0] = 0;
  }
  __syncthreads();
  // bound[i] for i = 1 .. experts: running max of offsets[1 .. i], clamped to [0, rows]
  for (int64_t base = 1; base <= experts; base += kScanThreads) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i <= experts ? smoe_cuda_min64(smoe_cuda_max64(offsets[i], 0), rows) : 0;
    const int64_t m = smoe_cuda_max64(block_scan(v, sh, MaxOp()), carry_max);
    if (i <= experts) bound[i] = m;
    __syncthreads();
    if (threadIdx.x == kScanThreads - 1) carry_max = m;
    __syncthreads();
  }
  if (threadIdx.x == 0) bound[experts + 1] = rows;
  __syncthreads();
  if (tile_rows <= 0) return;
  // tile_start[s] for s = 0 .. experts + 1: exclusive scan of the segments' tile counts
  for (int64_t base = 0; base <= experts; base += kScanThreads) {
    const int64_t s = base + threadIdx.x;
    const int64_t count = s <= experts ? smoe_cuda_div_up(bound[s + 1] - bound[s], tile_rows) : 0;
    const int64_t inclusive = block_scan(count, sh, SumOp()) + carry_tiles;
    if (s <= experts) tile_start[s] = inclusive - count;
    if (s == experts) tile_start[experts + 1] = inclusive;
    __syncthreads();
    if (threadIdx.x == kScanThreads - 1) carry_tiles = inclusive;
    __syncthreads();
  }
}

// Largest s in [0, experts] with tile_start[s] <= tile (tile < tile_start[experts + 1]).
__device__ int64_t segment_of_tile(const int64_t *tile_start, int64_t experts, int64_t tile) {
  int64_t lo = 0, hi = experts;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (tile_start[mid] <= tile) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// y[r, :] = x[r, :] @ w[s] for the rows r of segment s < E; zeros on the padding segment E.
// blockIdx.x: a row tile (over all segments), blockIdx.y: a column tile.
template <typename T>
__global__ void __launch_bounds__(kThreads) smoe_grouped_mm_kernel(const smoe_grouped_mm_args a, const int64_t *bound,
                                                                   const int64_t *tile_start) {
  using A = typename Acc<T>::type;
  __shared__ A xs[kTileK][kTileM + 1];
  __shared__ A ws[kTileK][kTileN + 1];
  const int64_t tile = blockIdx.x;
  if (tile >= tile_start[a.experts + 1]) return;
  const int64_t s = segment_of_tile(tile_start, a.experts, tile);
  const int64_t r0 = bound[s] + (tile - tile_start[s]) * kTileM;
  const int64_t r_end = smoe_cuda_min64(r0 + kTileM, bound[s + 1]);
  const int64_t c0 = static_cast<int64_t>(blockIdx.y) * kTileN;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  T *y = static_cast<T *>(a.y);
  if (s == a.experts) {  // padding rows
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) {
        const int64_t r = r0 + ty + 16 * i, c = c0 + tx + 16 * j;
        if (r < r_end && c < a.n) y[r * a.y_row_stride + c] = from_acc<T>(A(0));
      }
    return;
  }
  const T *x = static_cast<const T *>(a.x);
  const T *w = static_cast<const T *>(a.w) + s * a.w_expert_stride;
  A acc[4][4] = {};
  for (int64_t k0 = 0; k0 < a.k; k0 += kTileK) {
    for (int l = 0; l < 4; ++l) {
      const int idx = threadIdx.x + l * kThreads;
      // x tile [kTileM rows, kTileK]: consecutive threads take consecutive k when x is row-major
      const int xm = idx / kTileK, xk = idx % kTileK;
      const int64_t r = r0 + xm, kk = k0 + xk;
      xs[xk][xm] = (r < r_end && kk < a.k) ? to_acc(x[r * a.x_row_stride + kk * a.x_col_stride]) : A(0);
      // w tile [kTileK, kTileN]: consecutive threads take consecutive columns
      const int wk = idx / kTileN, wn = idx % kTileN;
      const int64_t kw = k0 + wk, c = c0 + wn;
      ws[wk][wn] = (kw < a.k && c < a.n) ? to_acc(w[kw * a.w_row_stride + c * a.w_col_stride]) : A(0);
    }
    __syncthreads();
    for (int kk = 0; kk < kTileK; ++kk) {
      A xv[4], wv[4];
      for (int i = 0; i < 4; ++i) xv[i] = xs[kk][ty + 16 * i];
      for (int j = 0; j < 4; ++j) wv[j] = ws[kk][tx + 16 * j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] += xv[i] * wv[j];
    }
    __syncthreads();
  }
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int64_t r = r0 + ty + 16 * i, c = c0 + tx + 16 * j;
      if (r < r_end && c < a.n) y[r * a.y_row_stride + c] = from_acc<T>(acc[i][j]);
    }
}

// grad_w[e] = x[seg_e]^T @ g[seg_e] ([K, N], row-major, contiguous per expert); zeros for an expert
// without rows. blockIdx.x: an output tile of [K, N], blockIdx.y: the expert.
template <typename T>
__global__ void __launch_bounds__(kThreads) smoe_grouped_wgrad_kernel(const smoe_grouped_wgrad_args a,
                                                                      const int64_t *bound) {
  using A = typename Acc<T>::type;
  __shared__ A xs[kTileK][kTileM + 1];
  __shared__ A gs[kTileK][kTileN + 1];
  const int64_t e = blockIdx.y;
  const int64_t col_tiles = smoe_cuda_div_up(a.n, kTileN);
  const int64_t m0 = (blockIdx.x / col_tiles) * kTileM, c0 = (blockIdx.x % col_tiles) * kTileN;
  const int64_t begin = bound[e], end = bound[e + 1];
  const T *x = static_cast<const T *>(a.x);
  const T *g = static_cast<const T *>(a.grad_y);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  A acc[4][4] = {};
  for (int64_t r0 = begin; r0 < end; r0 += kTileK) {
    for (int l = 0; l < 4; ++l) {
      const int idx = threadIdx.x + l * kThreads;
      // x^T tile [kTileM of K, kTileK rows]: consecutive threads take consecutive columns of x
      const int xr = idx / kTileM, xm = idx % kTileM;
      const int64_t r = r0 + xr, m = m0 + xm;
      xs[xr][xm] = (r < end && m < a.k) ? to_acc(x[r * a.x_row_stride + m * a.x_col_stride]) : A(0);
      const int gr = idx / kTileN, gn = idx % kTileN;
      const int64_t rg = r0 + gr, c = c0 + gn;
      gs[gr][gn] = (rg < end && c < a.n) ? to_acc(g[rg * a.g_row_stride + c * a.g_col_stride]) : A(0);
    }
    __syncthreads();
    for (int rr = 0; rr < kTileK; ++rr) {
      A xv[4], gv[4];
      for (int i = 0; i < 4; ++i) xv[i] = xs[rr][ty + 16 * i];
      for (int j = 0; j < 4; ++j) gv[j] = gs[rr][tx + 16 * j];
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] += xv[i] * gv[j];
    }
    __syncthreads();
  }
  T *out = static_cast<T *>(a.grad_w) + e * a.k * a.n;
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + ty + 16 * i, c = c0 + tx + 16 * j;
      if (m < a.k && c < a.n) out[m * a.n + c] = from_acc<T>(acc[i][j]);
    }
}

// Workspace: bound [E + 2] then tile_start [E + 2], int64.
int64_t *bounds_of(void *workspace) { return static_cast<int64_t *>(workspace); }
int64_t *tile_starts_of(void *workspace, int64_t experts) { return static_cast<int64_t *>(workspace) + experts + 2; }

bool valid_dtype(smoe_dtype d) { return d == SMOE_F32 || d == SMOE_F64 || d == SMOE_BF16 || d == SMOE_F16; }

template <template <typename> class Kernel, typename Args, typename... Rest>
smoe_status launch_typed(smoe_dtype dtype, dim3 grid, cudaStream_t s, const Args &a, Rest... rest) {
  switch (dtype) {
    case SMOE_F32: Kernel<float>::launch(grid, s, a, rest...); break;
    case SMOE_F64: Kernel<double>::launch(grid, s, a, rest...); break;
    case SMOE_BF16: Kernel<__nv_bfloat16>::launch(grid, s, a, rest...); break;
    case SMOE_F16: Kernel<__half>::launch(grid, s, a, rest...); break;
    default: return SMOE_ERR_ARG;
  }
  return smoe_cuda_launch_status();
}

template <typename T> struct GroupedMm {
  static void launch(dim3 grid, cudaStream_t s, const smoe_grouped_mm_args &a, const int64_t *bound,
                     const int64_t *tile_start) {
    smoe_grouped_mm_kernel<T><<<grid, kThreads, 0, s>>>(a, bound, tile_start);
  }
};

template <typename T> struct GroupedWgrad {
  static void launch(dim3 grid, cudaStream_t s, const smoe_grouped_wgrad_args &a, const int64_t *bound) {
    smoe_grouped_wgrad_kernel<T><<<grid, kThreads, 0, s>>>(a, bound);
  }
};

}  // namespace

extern "C" size_t smoe_cuda_grouped_workspace_bytes(int64_t experts) {
  return experts >= 0 ? static_cast<size_t>(2 * (experts + 2)) * sizeof(int64_t) : 0;
}

extern "C" smoe_status smoe_cuda_grouped_mm(const smoe_grouped_mm_args *a, void *workspace, void *stream) {
  if (!a || a->experts < 1 || a->rows < 0 || a->k < 0 || a->n < 0 || !valid_dtype(a->dtype)) return SMOE_ERR_ARG;
  if (a->rows == 0 || a->n == 0) return SMOE_OK;
  if (!a->offsets || !a->y || !workspace || (a->k > 0 && (!a->x || !a->w))) return SMOE_ERR_ARG;
  const int64_t row_tiles = smoe_cuda_div_up(a->rows, kTileM) + a->experts + 1;
  const int64_t col_tiles = smoe_cuda_div_up(a->n, kTileN);
  if (row_tiles > INT32_MAX || col_tiles > 65535) return SMOE_ERR_ARG;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int64_t *bound = bounds_of(workspace), *tile_start = tile_starts_of(workspace, a->experts);
  smoe_segments_kernel<<<1, kScanThreads, 0, s>>>(a->offsets, a->experts, a->rows, kTileM, bound, tile_start);
  const smoe_status st = smoe_cuda_launch_status();
  if (st != SMOE_OK) return st;
  const dim3 grid(static_cast<unsigned int>(row_tiles), static_cast<unsigned int>(col_tiles));
  return launch_typed<GroupedMm>(a->dtype, grid, s, *a, static_cast<const int64_t *>(bound),
                                 static_cast<const int64_t *>(tile_start));
}

extern "C" smoe_status smoe_cuda_grouped_mm_weight_grad(const smoe_grouped_wgrad_args *a, void *workspace,
                                                        void *stream) {
  if (!a || a->experts < 1 || a->rows < 0 || a->k < 0 || a->n < 0 || !valid_dtype(a->dtype)) return SMOE_ERR_ARG;
  if (a->k == 0 || a->n == 0) return SMOE_OK;
  if (!a->offsets || !a->grad_w || !workspace || (a->rows > 0 && (!a->x || !a->grad_y))) return SMOE_ERR_ARG;
  const int64_t tiles = smoe_cuda_div_up(a->k, kTileM) * smoe_cuda_div_up(a->n, kTileN);
  if (tiles > INT32_MAX || a->experts > 65535) return SMOE_ERR_ARG;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  int64_t *bound = bounds_of(workspace);
  smoe_segments_kernel<<<1, kScanThreads, 0, s>>>(a->offsets, a->experts, a->rows, 0, bound, nullptr);
  const smoe_status st = smoe_cuda_launch_status();
  if (st != SMOE_OK) return st;
  const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(a->experts));
  return launch_typed<GroupedWgrad>(a->dtype, grid, s, *a, static_cast<const int64_t *>(bound));
}
