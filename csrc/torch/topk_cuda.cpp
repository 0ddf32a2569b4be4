// The soft top-k ops on a GPU: the launchers of cuda/lapsum.cu and cuda/budget.cu behind the checks
// of topk.cpp. Compiled in a CUDA build only.
#include <torch/library.h>

#include "cuda/launch.h"
#include "cuda_launch.h"
#include "topk.h"

namespace softmoe {
namespace {

// The fixed two-level tree of cuda/budget.cu (no atomics: the same bits every run).
at::Tensor sum_rows_cuda(const at::Tensor &rows_grad) {
  at::Tensor sum = at::empty({}, rows_grad.options());
  const int64_t n = rows_grad.numel();
  const smoe_dtype dtype = rows_grad.scalar_type() == at::kDouble ? SMOE_F64 : SMOE_F32;
  launch_cuda(rows_grad, smoe_cuda_sum_workspace_bytes(n), "sum of per-row gradients", [&](void *ws, void *stream) {
    return smoe_cuda_sum(rows_grad.data_ptr(), dtype, n, sum.data_ptr(), ws, stream);
  });
  return sum;
}

// The launch shape (cuda/lapsum.cu) on the current device and its workspace: one row's scratch per
// thread.
struct TopkLaunch {
  int64_t threads = 0;
  int block = 0;
  size_t workspace_bytes = 0;
};

template <typename Args>
TopkLaunch topk_launch(const Args &a) {
  TopkLaunch l;
  const size_t per_row = smoe_topk_scratch_bytes(a.dtype, a.n, a.max_active);
  smoe_cuda_topk_shape(a.rows, per_row, current_multiprocessors(), &l.threads, &l.block);
  l.workspace_bytes = static_cast<size_t>(l.threads) * per_row;
  return l;
}

std::tuple<at::Tensor, at::Tensor> soft_topk_cuda(const at::Tensor &scores, const at::Tensor &k,
                                                  const at::Tensor &alpha, double eps, int64_t max_active) {
  TopkForward call = topk_forward(scores, k, alpha, eps, max_active);
  const smoe_topk_fwd_args &args = call.args;
  if (args.rows > 0) {
    c10::cuda::CUDAGuard guard(call.scores.device());
    const TopkLaunch l = topk_launch(args);
    launch_cuda(call.scores, l.workspace_bytes, "soft_topk (CUDA)",
                [&](void *ws, void *stream) { return smoe_cuda_topk_fwd(&args, ws, l.threads, l.block, stream); });
  }
  return {call.p, call.threshold};
}

// The whole backward, the sums of the per-row k / alpha gradients included, runs under one guard of
// scores' device, on that device's current stream.
std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_topk_backward_cuda(const at::Tensor &grad_p,
                                                                       const at::Tensor &scores, const at::Tensor &p,
                                                                       const at::Tensor &threshold,
                                                                       const at::Tensor &k, const at::Tensor &alpha,
                                                                       double eps, int64_t max_active) {
  TopkBackward call = topk_backward(grad_p, scores, p, threshold, k, alpha, eps, max_active);
  c10::cuda::CUDAGuard guard(call.scores.device());
  const smoe_topk_bwd_args &args = call.args;
  if (args.rows > 0) {
    const TopkLaunch l = topk_launch(args);
    launch_cuda(call.scores, l.workspace_bytes, "soft_topk_backward (CUDA)",
                [&](void *ws, void *stream) { return smoe_cuda_topk_bwd(&args, ws, l.threads, l.block, stream); });
  }
  return topk_backward_result(call, k, alpha, &sum_rows_cuda);
}

}  // namespace
}  // namespace softmoe

TORCH_LIBRARY_IMPL(softmoe, CUDA, m) {
  m.impl("soft_topk", &softmoe::soft_topk_cuda);
  m.impl("soft_topk_backward", &softmoe::soft_topk_backward_cuda);
}
