// What every *_cuda op implementation does around a launcher of csrc/cuda: make the tensors' device
// current, take torch's current stream on it, allocate the launcher's device workspace, and turn its
// status into an error. Included by the *_cuda.cpp files only (compiled in a CUDA build).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstddef>

#include "common.h"
#include "cuda/launch.h"

namespace softmoe {

// The number of multiprocessors of the current device (a host query: no sync, allowed while a
// CUDA graph is captured).
inline int current_multiprocessors() {
  int device = 0, count = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Runs launch(workspace, stream) on the device of `like` with `workspace_bytes` bytes of device
// workspace (a null pointer for 0) and torch's current stream there (a cudaStream_t as void *),
// and raises "softmoe: <what>: ..." when it returns a status other than SMOE_OK (with the CUDA error's
// name and text for SMOE_ERR_DEVICE).
template <typename Launch>
void launch_cuda(const at::Tensor &like, size_t workspace_bytes, const char *what, Launch launch) {
  c10::cuda::CUDAGuard guard(like.device());
  at::Tensor workspace;
  if (workspace_bytes > 0)
    workspace = at::empty({static_cast<int64_t>(workspace_bytes)}, like.options().dtype(at::kByte));
  void *stream = c10::cuda::getCurrentCUDAStream().stream();
  const smoe_status status = launch(workspace_bytes > 0 ? workspace.data_ptr() : nullptr, stream);
  TORCH_CHECK(status != SMOE_ERR_DEVICE, "softmoe: ", what, ": ", smoe_status_string(status), " (",
              smoe_cuda_last_error(), ")");
  check_status(status, what);
}

}  // namespace softmoe
