// The soft top-k ops (soft_topk, soft_topk_backward): the argument checks and the C core call
// arguments shared by the CPU (topk.cpp) and CUDA (topk_cuda.cpp) implementations.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "core/softmoe.h"

namespace softmoe {

// A checked soft_topk call: contiguous inputs in the C core's layout, the outputs allocated, and
// args pointing at them (rows may be 0: then there is nothing to run).
struct TopkForward {
  at::Tensor scores, k, alpha, p, threshold;
  smoe_topk_fwd_args args;
};

TopkForward topk_forward(const at::Tensor &scores, const at::Tensor &k, const at::Tensor &alpha, double eps,
                         int64_t max_active);

// A checked soft_topk_backward call; grad_k_rows / grad_alpha_rows hold each row's contribution,
// reduced by topk_backward_result.
struct TopkBackward {
  at::Tensor scores, grad_p, p, threshold, alpha, grad_scores, grad_k_rows, grad_alpha_rows;
  int64_t k_stride, alpha_stride;
  smoe_topk_bwd_args args;
};

TopkBackward topk_backward(const at::Tensor &grad_p, const at::Tensor &scores, const at::Tensor &p,
                           const at::Tensor &threshold, const at::Tensor &k, const at::Tensor &alpha, double eps,
                           int64_t max_active);

// (grad_scores, grad_k, grad_alpha) of a computed backward: the gradient of a per-row k or alpha is
// its rows' contributions; that of a shared one their sum by `sum_rows`, the device's fixed-order
// (bit-reproducible) sum of a 1-D float32 / float64 tensor into a 0-d one.
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_backward_result(const TopkBackward &call, const at::Tensor &k,
                                                                    const at::Tensor &alpha,
                                                                    at::Tensor (*sum_rows)(const at::Tensor &));

}  // namespace softmoe
