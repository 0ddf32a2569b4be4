// The soft top-k ops on the CPU, and the argument checks they share with topk_cuda.cpp.
#include "topk.h"

#include <torch/library.h>

#include <utility>

#include "common.h"
#include "cpu_runtime.h"

namespace softmoe {
namespace {

// A per-row parameter (k or alpha) is either one value for every row or one value per row.
// Returns it contiguous, in the math type, with its stride over rows (0 or 1).
std::pair<at::Tensor, int64_t> row_param(const at::Tensor &param, const at::Tensor &scores, const char *name) {
  TORCH_CHECK_TYPE(at::isFloatingType(param.scalar_type()), "softmoe: ", name,
                   " must be a floating-point tensor, got ", param.scalar_type());
  TORCH_CHECK(param.device() == scores.device(), "softmoe: ", name, " must be on the device of scores (",
              scores.device(), "), got ", param.device());
  auto lead = scores.sizes().slice(0, scores.dim() - 1);
  const bool per_row = param.sizes() == lead;
  TORCH_CHECK(per_row || param.numel() == 1, "softmoe: ", name,
              " must hold one value or one per row (shape ", lead, "), got shape ", param.sizes());
  at::Tensor t = param.to(math_type(scores)).contiguous();
  return {t, per_row ? 1 : 0};
}

void check_scores(const at::Tensor &scores, double eps, int64_t max_active) {
  to_smoe_dtype(scores, "scores");
  TORCH_CHECK(scores.dim() >= 1, "softmoe: scores must have at least one dimension (the experts)");
  const int64_t n = scores.size(-1);
  TORCH_CHECK(n >= 1, "softmoe: scores must have at least one expert along the last dimension");
  TORCH_CHECK(n <= INT32_MAX, "softmoe: at most 2^31 - 1 experts are supported, got ", n);
  TORCH_CHECK(eps >= 0.0 && eps < 0.5, "softmoe: eps must satisfy 0 <= eps < 0.5, got ", eps);
  TORCH_CHECK(max_active >= 1 && max_active <= n, "softmoe: max_active must satisfy 1 <= max_active <= ", n,
              " (the number of experts), got ", max_active);
}

// Rows per task of the CPU thread pool: enough work per task to amortise the scheduling.
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

}  // namespace

TopkForward topk_forward(const at::Tensor &scores_in, const at::Tensor &k_in, const at::Tensor &alpha_in, double eps,
                         int64_t max_active) {
  check_scores(scores_in, eps, max_active);
  TopkForward call;
  int64_t k_stride = 0, alpha_stride = 0;
  std::tie(call.k, k_stride) = row_param(k_in, scores_in, "k");
  std::tie(call.alpha, alpha_stride) = row_param(alpha_in, scores_in, "alpha");
  call.scores = scores_in.contiguous();
  const at::Tensor &scores = call.scores;
  const int64_t n = scores.size(-1);
  call.p = at::empty_like(scores);
  call.threshold = at::empty(scores.sizes().slice(0, scores.dim() - 1), scores.options().dtype(at::kDouble));
  smoe_topk_fwd_args &args = call.args;
  args = smoe_topk_fwd_args{};
  args.rows = scores.numel() / n;
  args.n = n;
  args.dtype = to_smoe_dtype(scores, "scores");
  args.scores = scores.data_ptr();
  args.k = call.k.data_ptr();
  args.k_stride = k_stride;
  args.alpha = call.alpha.data_ptr();
  args.alpha_stride = alpha_stride;
  args.eps = eps;
  args.max_active = max_active;
  args.p = call.p.data_ptr();
  args.threshold = call.threshold.data_ptr<double>();
  return call;
}

TopkBackward topk_backward(const at::Tensor &grad_p_in, const at::Tensor &scores_in, const at::Tensor &p_in,
                           const at::Tensor &threshold_in, const at::Tensor &k_in, const at::Tensor &alpha_in,
                           double eps, int64_t max_active) {
  check_scores(scores_in, eps, max_active);
  TORCH_CHECK(grad_p_in.sizes() == scores_in.sizes() && p_in.sizes() == scores_in.sizes(),
              "softmoe: grad_p and p must have the shape of scores ", scores_in.sizes());
  auto lead = scores_in.sizes().slice(0, scores_in.dim() - 1);
  TORCH_CHECK(threshold_in.sizes() == lead && threshold_in.scalar_type() == at::kDouble,
              "softmoe: threshold must be float64 of shape ", lead);
  // A GPU kernel handed a CPU tensor's pointer would read host memory.
  check_same_device("soft_topk_backward", grad_p_in, "grad_p", scores_in, "scores");
  check_same_device("soft_topk_backward", p_in, "p", scores_in, "scores");
  check_same_device("soft_topk_backward", threshold_in, "threshold", scores_in, "scores");
  TopkBackward call;
  std::tie(std::ignore, call.k_stride) = row_param(k_in, scores_in, "k");
  std::tie(call.alpha, call.alpha_stride) = row_param(alpha_in, scores_in, "alpha");
  const auto dtype = scores_in.scalar_type();
  call.scores = scores_in.contiguous();
  call.grad_p = grad_p_in.to(dtype).contiguous();
  call.p = p_in.to(dtype).contiguous();
  call.threshold = threshold_in.contiguous();
  const at::Tensor &scores = call.scores;
  const int64_t n = scores.size(-1);
  const int64_t rows = scores.numel() / n;
  call.grad_scores = at::empty_like(scores);
  call.grad_k_rows = at::zeros({rows}, scores.options().dtype(math_type(scores)));
  call.grad_alpha_rows = at::zeros({rows}, scores.options().dtype(math_type(scores)));
  smoe_topk_bwd_args &args = call.args;
  args = smoe_topk_bwd_args{};
  args.rows = rows;
  args.n = n;
  args.dtype = to_smoe_dtype(scores, "scores");
  args.grad_p = call.grad_p.data_ptr();
  args.scores = scores.data_ptr();
  args.p = call.p.data_ptr();
  args.threshold = call.threshold.data_ptr<double>();
  args.alpha = call.alpha.data_ptr();
  args.alpha_stride = call.alpha_stride;
  args.eps = eps;
  args.max_active = max_active;
  args.grad_scores = call.grad_scores.data_ptr();
  args.grad_k_rows = call.grad_k_rows.data_ptr();
  args.grad_alpha_rows = call.grad_alpha_rows.data_ptr();
  return call;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> topk_backward_result(const TopkBackward &call, const at::Tensor &k,
                                                                    const at::Tensor &alpha,
                                                                    at::Tensor (*sum_rows)(const at::Tensor &)) {
  auto param_grad = [&](const at::Tensor &rows_grad, const at::Tensor &param, int64_t stride) {
    const at::Tensor grad = stride == 1 ? rows_grad : sum_rows(rows_grad);
    return grad.reshape(param.sizes()).to(param.scalar_type());
  };
  return {call.grad_scores, param_grad(call.grad_k_rows, k, call.k_stride),
          param_grad(call.grad_alpha_rows, alpha, call.alpha_stride)};
}

namespace {

// The fixed pairwise tree of the C core (smoe_sum_*).
at::Tensor sum_rows_cpu(const at::Tensor &rows_grad) {
  at::Tensor sum = at::empty({}, rows_grad.options());
  const int64_t n = rows_grad.numel();
  if (rows_grad.scalar_type() == at::kDouble)
    sum.fill_(smoe_sum_f64(rows_grad.data_ptr<double>(), n));
  else
    sum.fill_(static_cast<double>(smoe_sum_f32(rows_grad.data_ptr<float>(), n)));
  return sum;
}

std::tuple<at::Tensor, at::Tensor> soft_topk_cpu(const at::Tensor &scores, const at::Tensor &k, const at::Tensor &alpha,
                                                 double eps, int64_t max_active) {
  TopkForward call = topk_forward(scores, k, alpha, eps, max_active);
  const smoe_topk_fwd_args &args = call.args;
  if (args.rows > 0)
    check_status(parallel_ranges(args.rows, grain_rows(args.n),
                                 [&](int64_t b, int64_t e) { return smoe_topk_fwd(&args, b, e); }),
                 "soft_topk");
  return {call.p, call.threshold};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_topk_backward_cpu(const at::Tensor &grad_p,
                                                                      const at::Tensor &scores, const at::Tensor &p,
                                                                      const at::Tensor &threshold, const at::Tensor &k,
                                                                      const at::Tensor &alpha, double eps,
                                                                      int64_t max_active) {
  TopkBackward call = topk_backward(grad_p, scores, p, threshold, k, alpha, eps, max_active);
  const smoe_topk_bwd_args &args = call.args;
  if (args.rows > 0)
    check_status(parallel_ranges(args.rows, grain_rows(args.n),
                                 [&](int64_t b, int64_t e) { return smoe_topk_bwd(&args, b, e); }),
                 "soft_topk_backward");
  return topk_backward_result(call, k, alpha, &sum_rows_cpu);
}

}  // namespace
}  // namespace softmoe

TORCH_LIBRARY_IMPL(softmoe, CPU, m) {
  m.impl("soft_topk", &softmoe::soft_topk_cpu);
  m.impl("soft_topk_backward", &softmoe::soft_topk_backward_cpu);
}
