// Helpers shared by the CUDA launchers (the .cu files in csrc/cuda), and their one convention:
//   - a .cu file includes the C core's headers and this one by their path from csrc ("core/...",
//     "cuda/..."), never torch;
//   - kernels, constants (constexpr) and helpers live in an anonymous namespace; only the
//     extern "C" launchers of launch.h are visible;
//   - a launcher checks its arguments with the C core's checks (core/*_args.h, the very checks of
//     the CPU entry point), returns SMOE_OK at once when there is nothing to do, launches on the
//     caller's stream and returns smoe_cuda_launch_status();
//   - every kernel loops grid-stride (no limit on rows): global_thread / global_threads for one
//     thread per item, first_row / row_stride for one warp (threadIdx.x) per row (threadIdx.y).
#ifndef SOFTMOE_CUDA_UTILS_CUH
#define SOFTMOE_CUDA_UTILS_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "core/softmoe.h"

// Notes the CUDA error behind a SMOE_ERR_DEVICE for smoe_cuda_last_error (status.cu, launch.h).
extern "C" void smoe_cuda_note_error(int error);

// Status of the launch just made: cudaGetLastError reports (and clears) a launch-configuration or
// earlier asynchronous error, which is noted for the binding's message. Called right after every
// <<<...>>>.
static inline smoe_status smoe_cuda_launch_status(void) {
  const cudaError_t error = cudaGetLastError();
  if (error == cudaSuccess) return SMOE_OK;
  smoe_cuda_note_error(static_cast<int>(error));
  return SMOE_ERR_DEVICE;
}

// Whether a device pointer may be read as an array of `align`-byte words.
static inline bool smoe_cuda_aligned(const void *p, uintptr_t align) { return ((uintptr_t)p % align) == 0; }

// int64 helpers usable on host and device (std::min / std::max are host-only without
// --expt-relaxed-constexpr, which `make cuda-check` does not pass).
__host__ __device__ __forceinline__ int64_t smoe_cuda_min64(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t smoe_cuda_max64(int64_t a, int64_t b) { return a > b ? a : b; }
// ceil(a / b) for a >= 0, b > 0.
__host__ __device__ __forceinline__ int64_t smoe_cuda_div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Grid-stride loops.
__device__ __forceinline__ int64_t smoe_cuda_global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t smoe_cuda_global_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }
__device__ __forceinline__ int64_t smoe_cuda_first_row() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
}
__device__ __forceinline__ int64_t smoe_cuda_row_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.y; }

#endif  // SOFTMOE_CUDA_UTILS_CUH
