// The CUDA error behind a launcher's SMOE_ERR_DEVICE: smoe_cuda_launch_status (cuda_utils.cuh)
// notes it here, per host thread, and the binding puts its name and text into the exception, so that
// a failure reads "an illegal memory access was encountered", not just a status number.
#include <cuda_runtime.h>

#include <stdio.h>

#include "cuda/cuda_utils.cuh"
#include "cuda/launch.h"

namespace {

thread_local int last_error = 0;  // cudaSuccess
thread_local char text[256];

}  // namespace

extern "C" void smoe_cuda_note_error(int error) { last_error = error; }

extern "C" const char *smoe_cuda_error_text(int error) {
  if (error == 0) return "";
  const cudaError_t e = static_cast<cudaError_t>(error);
  snprintf(text, sizeof text, "%s: %s", cudaGetErrorName(e), cudaGetErrorString(e));
  return text;
}

extern "C" const char *smoe_cuda_last_error(void) { return smoe_cuda_error_text(last_error); }
