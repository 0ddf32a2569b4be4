// The truncated dispatch ops on a GPU: the launchers of cuda/route.cu behind the checks of
// route.cpp. Compiled in a CUDA build only.
#include <torch/library.h>

#include "cuda/launch.h"
#include "cuda_launch.h"
#include "route.h"

namespace softmoe {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_plan_cuda(const at::Tensor &p, int64_t max_active) {
  PlanCall call = plan_call(p, max_active);
  if (call.run) {
    const smoe_plan_args &args = call.args;
    launch_cuda(call.p, smoe_cuda_plan_workspace_bytes(args.tokens, args.experts, args.max_active),
                "dispatch_plan (CUDA)",
                [&](void *ws, void *stream) { return smoe_cuda_dispatch_plan(&args, ws, stream); });
  }
  return call.outputs();
}

at::Tensor gather_rows_cuda(const at::Tensor &x, const at::Tensor &pair_token, const at::Tensor &token_pairs) {
  GatherCall call = gather_rows_call(x, pair_token, token_pairs);
  if (call.run)
    launch_cuda(call.x, 0, "gather_rows (CUDA)",
                [&](void *, void *stream) { return smoe_cuda_gather_rows(&call.args, stream); });
  return call.xs;
}

at::Tensor combine_cuda(const CombineCall &call) {
  if (call.run)
    launch_cuda(call.ys, 0, call.op, [&](void *, void *stream) { return smoe_cuda_combine_rows(&call.args, stream); });
  return call.y;
}

at::Tensor combine_rows_cuda(const at::Tensor &ys, const at::Tensor &p, const at::Tensor &pair_token,
                             const at::Tensor &pair_expert, const at::Tensor &token_pairs) {
  return combine_cuda(combine_rows_call(ys, p, pair_token, pair_expert, token_pairs));
}

at::Tensor gather_rows_backward_cuda(const at::Tensor &grad_xs, const at::Tensor &token_pairs) {
  return combine_cuda(gather_rows_backward_call(grad_xs, token_pairs));
}

std::tuple<at::Tensor, at::Tensor> combine_rows_backward_cuda(const at::Tensor &grad_y, const at::Tensor &ys,
                                                              const at::Tensor &p, const at::Tensor &pair_token,
                                                              const at::Tensor &pair_expert,
                                                              const at::Tensor &token_pairs) {
  CombineBackwardCall call = combine_rows_backward_call(grad_y, ys, p, pair_token, pair_expert, token_pairs);
  if (call.run)
    launch_cuda(call.ys, 0, "combine_rows_backward (CUDA)",
                [&](void *, void *stream) { return smoe_cuda_combine_bwd(&call.args, stream); });
  return {call.grad_ys, call.grad_p};
}

}  // namespace
}  // namespace softmoe

TORCH_LIBRARY_IMPL(softmoe, CUDA, m) {
  m.impl("dispatch_plan", &softmoe::dispatch_plan_cuda);
  m.impl("gather_rows", &softmoe::gather_rows_cuda);
  m.impl("gather_rows_backward", &softmoe::gather_rows_backward_cuda);
  m.impl("combine_rows", &softmoe::combine_rows_cuda);
  m.impl("combine_rows_backward", &softmoe::combine_rows_backward_cuda);
}
