/* Small helpers shared by the CUDA launchers (the .cu files in csrc/cuda). */
#ifndef SOFTMOE_CUDA_UTILS_CUH
#define SOFTMOE_CUDA_UTILS_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "../core/softmoe.h"

/* Status of the launch just made: cudaGetLastError reports (and clears) a launch-configuration or
 * earlier asynchronous error. Called right after every <<<...>>>. */
static inline smoe_status smoe_cuda_launch_status(void) {
  return cudaGetLastError() == cudaSuccess ? SMOE_OK : SMOE_ERR_DEVICE;
}

/* Whether a device pointer may be read as an array of `align`-byte words. */
static inline bool smoe_cuda_aligned(const void *p, uintptr_t align) {
  return ((uintptr_t)p % align) == 0;
}

/* ceil(a / b) for a >= 0, b > 0. */
static inline int64_t smoe_cuda_div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

#endif /* SOFTMOE_CUDA_UTILS_CUH */
