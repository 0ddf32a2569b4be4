// The truncated dispatch ops (dispatch_plan, gather_rows, combine_rows and their backward ops): the
// argument checks and the C core call arguments shared by the CPU (route.cpp) and CUDA
// (route_cuda.cpp) implementations. Each *_call checks its op's arguments, makes the inputs
// contiguous, allocates the outputs and fills the C core's arguments; `run` is false when there is
// nothing to compute (the outputs are then complete as allocated).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "core/softmoe.h"

namespace softmoe {

struct PlanCall {
  at::Tensor p, offsets, pair_token, pair_expert, token_pairs;
  smoe_plan_args args;
  bool run;
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> outputs() const {
    return {offsets, pair_token, pair_expert, token_pairs};
  }
};

PlanCall plan_call(const at::Tensor &p, int64_t max_active);

struct GatherCall {
  at::Tensor x, pair_token, xs;
  smoe_gather_args args;
  bool run;
};

GatherCall gather_rows_call(const at::Tensor &x, const at::Tensor &pair_token, const at::Tensor &token_pairs);

// combine_rows, or gather_rows_backward (combine with unit weights: no p, no pair_expert). `op` and
// `indices` (the index tensors a bad index can come from) name the op in errors.
struct CombineCall {
  const char *op, *indices;
  at::Tensor ys, p, pair_expert, token_pairs, y;
  smoe_combine_args args;
  bool run;
};

CombineCall combine_rows_call(const at::Tensor &ys, const at::Tensor &p, const at::Tensor &pair_token,
                              const at::Tensor &pair_expert, const at::Tensor &token_pairs);
CombineCall gather_rows_backward_call(const at::Tensor &grad_xs, const at::Tensor &token_pairs);

struct CombineBackwardCall {
  at::Tensor grad_y, ys, p, pair_token, pair_expert, token_pairs, grad_ys, grad_p;
  smoe_combine_bwd_args args;
  bool run;
};

CombineBackwardCall combine_rows_backward_call(const at::Tensor &grad_y, const at::Tensor &ys, const at::Tensor &p,
                                               const at::Tensor &pair_token, const at::Tensor &pair_expert,
                                               const at::Tensor &token_pairs);

}  // namespace softmoe
