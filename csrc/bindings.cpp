// The only torch-facing C++ file: op schemas, argument checks, allocation, the dtype switch, the
// CPU thread pool or CUDA stream, and calls into the C core (csrc/core) or the CUDA launchers.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <tuple>

#include "core/softmoe.h"

#ifdef SOFTMOE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/launch.h"
#endif

// `import softmoe._C` loads this library, which runs the TORCH_LIBRARY registrations below.
extern "C" PyObject *PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace {

smoe_dtype to_smoe_dtype(const at::Tensor &t, const char *name) {
  switch (t.scalar_type()) {
    case at::kFloat: return SMOE_F32;
    case at::kDouble: return SMOE_F64;
    case at::kBFloat16: return SMOE_BF16;
    case at::kHalf: return SMOE_F16;
    default:
      TORCH_CHECK_TYPE(false, "softmoe: ", name, " must be float32, float64, bfloat16 or float16, got ",
                       t.scalar_type());
  }
}

at::ScalarType math_type(const at::Tensor &scores) {
  return scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

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

void check_status(smoe_status status, const char *what) {
  TORCH_CHECK(status != SMOE_ERR_ALLOC, "softmoe: ", what, ": out of memory for scratch");
  TORCH_CHECK(status == SMOE_OK, "softmoe: ", what, " failed with status ", static_cast<int>(status));
}

// Rows per task of the CPU thread pool: enough work per task to amortise the scheduling.
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

// Runs fn(begin, end) over rows on the CPU thread pool and keeps the first non-OK status.
template <typename Fn>
smoe_status parallel_rows(int64_t rows, int64_t n, Fn fn) {
  std::atomic<int> status{SMOE_OK};
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    smoe_status s = fn(begin, end);
    if (s != SMOE_OK) {
      int expected = SMOE_OK;
      status.compare_exchange_strong(expected, static_cast<int>(s));
    }
  });
  return static_cast<smoe_status>(status.load());
}

// The gradient of a shared parameter is the fixed-order sum of the per-row contributions.
at::Tensor reduce_param_grad(const at::Tensor &rows_grad, const at::Tensor &param, int64_t stride) {
  at::Tensor grad;
  if (stride == 1) {
    grad = rows_grad;
  } else if (rows_grad.is_cpu()) {
    grad = at::empty({}, rows_grad.options());
    const int64_t n = rows_grad.numel();
    if (rows_grad.scalar_type() == at::kDouble)
      grad.fill_(smoe_sum_f64(rows_grad.data_ptr<double>(), n));
    else
      grad.fill_(static_cast<double>(smoe_sum_f32(rows_grad.data_ptr<float>(), n)));
  } else {
#ifdef SOFTMOE_WITH_CUDA
    grad = at::empty({}, rows_grad.options());
    const size_t ws_bytes = smoe_cuda_sum_workspace_bytes(rows_grad.numel());
    at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, rows_grad.options().dtype(at::kByte));
    auto stream = at::cuda::getCurrentCUDAStream();
    check_status(smoe_cuda_sum(rows_grad.data_ptr(), rows_grad.scalar_type() == at::kDouble ? SMOE_F64 : SMOE_F32,
                               rows_grad.numel(), grad.data_ptr(), ws.data_ptr(), stream.stream()),
                 "sum of per-row gradients");
#else
    TORCH_CHECK(false, "softmoe was built without CUDA");
#endif
  }
  return grad.reshape(param.sizes()).to(param.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> soft_topk_impl(const at::Tensor &scores_in, const at::Tensor &k_in,
                                                  const at::Tensor &alpha_in, double eps, int64_t max_active) {
  check_scores(scores_in, eps, max_active);
  auto [k, k_stride] = row_param(k_in, scores_in, "k");
  auto [alpha, alpha_stride] = row_param(alpha_in, scores_in, "alpha");
  at::Tensor scores = scores_in.contiguous();
  const int64_t n = scores.size(-1);
  const int64_t rows = scores.numel() / n;
  at::Tensor p = at::empty_like(scores);
  at::Tensor threshold = at::empty(scores.sizes().slice(0, scores.dim() - 1), scores.options().dtype(at::kDouble));
  if (rows == 0) return {p, threshold};

  smoe_topk_fwd_args args{};
  args.rows = rows;
  args.n = n;
  args.dtype = to_smoe_dtype(scores, "scores");
  args.scores = scores.data_ptr();
  args.k = k.data_ptr();
  args.k_stride = k_stride;
  args.alpha = alpha.data_ptr();
  args.alpha_stride = alpha_stride;
  args.eps = eps;
  args.max_active = max_active;
  args.p = p.data_ptr();
  args.threshold = threshold.data_ptr<double>();

  if (scores.is_cpu()) {
    check_status(parallel_rows(rows, n, [&](int64_t b, int64_t e) { return smoe_topk_fwd(&args, b, e); }),
                 "soft_topk");
  } else {
#ifdef SOFTMOE_WITH_CUDA
    c10::cuda::CUDAGuard guard(scores.device());
    const int64_t threads = smoe_cuda_topk_threads(rows);
    at::Tensor ws = at::empty({threads * static_cast<int64_t>(smoe_topk_scratch_bytes(args.dtype, n, max_active))},
                              scores.options().dtype(at::kByte));
    check_status(smoe_cuda_topk_fwd(&args, ws.data_ptr(), threads, at::cuda::getCurrentCUDAStream().stream()),
                 "soft_topk (CUDA)");
#else
    TORCH_CHECK(false, "softmoe was built without CUDA");
#endif
  }
  return {p, threshold};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_topk_backward_impl(
    const at::Tensor &grad_p_in, const at::Tensor &scores_in, const at::Tensor &p_in, const at::Tensor &threshold_in,
    const at::Tensor &k_in, const at::Tensor &alpha_in, double eps, int64_t max_active) {
  check_scores(scores_in, eps, max_active);
  TORCH_CHECK(grad_p_in.sizes() == scores_in.sizes() && p_in.sizes() == scores_in.sizes(),
              "softmoe: grad_p and p must have the shape of scores ", scores_in.sizes());
  auto lead = scores_in.sizes().slice(0, scores_in.dim() - 1);
  TORCH_CHECK(threshold_in.sizes() == lead && threshold_in.scalar_type() == at::kDouble,
              "softmoe: threshold must be float64 of shape ", lead);
  auto [k, k_stride] = row_param(k_in, scores_in, "k");
  auto [alpha, alpha_stride] = row_param(alpha_in, scores_in, "alpha");
  (void)k;
  const auto dtype = scores_in.scalar_type();
  at::Tensor scores = scores_in.contiguous();
  at::Tensor grad_p = grad_p_in.to(dtype).contiguous();
  at::Tensor p = p_in.to(dtype).contiguous();
  at::Tensor threshold = threshold_in.contiguous();
  const int64_t n = scores.size(-1);
  const int64_t rows = scores.numel() / n;
  at::Tensor grad_scores = at::empty_like(scores);
  at::Tensor grad_k_rows = at::zeros({rows}, scores.options().dtype(math_type(scores)));
  at::Tensor grad_alpha_rows = at::zeros({rows}, scores.options().dtype(math_type(scores)));

  if (rows > 0) {
    smoe_topk_bwd_args args{};
    args.rows = rows;
    args.n = n;
    args.dtype = to_smoe_dtype(scores, "scores");
    args.grad_p = grad_p.data_ptr();
    args.scores = scores.data_ptr();
    args.p = p.data_ptr();
    args.threshold = threshold.data_ptr<double>();
    args.alpha = alpha.data_ptr();
    args.alpha_stride = alpha_stride;
    args.eps = eps;
    args.max_active = max_active;
    args.grad_scores = grad_scores.data_ptr();
    args.grad_k_rows = grad_k_rows.data_ptr();
    args.grad_alpha_rows = grad_alpha_rows.data_ptr();
    if (scores.is_cpu()) {
      check_status(parallel_rows(rows, n, [&](int64_t b, int64_t e) { return smoe_topk_bwd(&args, b, e); }),
                   "soft_topk_backward");
    } else {
#ifdef SOFTMOE_WITH_CUDA
      c10::cuda::CUDAGuard guard(scores.device());
      const int64_t threads = smoe_cuda_topk_threads(rows);
      at::Tensor ws = at::empty({threads * static_cast<int64_t>(smoe_topk_scratch_bytes(args.dtype, n, max_active))},
                                scores.options().dtype(at::kByte));
      check_status(smoe_cuda_topk_bwd(&args, ws.data_ptr(), threads, at::cuda::getCurrentCUDAStream().stream()),
                   "soft_topk_backward (CUDA)");
#else
      TORCH_CHECK(false, "softmoe was built without CUDA");
#endif
    }
  }
  return {grad_scores, reduce_param_grad(grad_k_rows, k_in, k_stride),
          reduce_param_grad(grad_alpha_rows, alpha_in, alpha_stride)};
}

}  // namespace

TORCH_LIBRARY(softmoe, m) {
  m.def(
      "soft_topk(Tensor scores, Tensor k, Tensor alpha, float eps, int max_active) -> (Tensor p, Tensor threshold)");
  m.def(
      "soft_topk_backward(Tensor grad_p, Tensor scores, Tensor p, Tensor threshold, Tensor k, Tensor alpha, "
      "float eps, int max_active) -> (Tensor grad_scores, Tensor grad_k, Tensor grad_alpha)");
}

TORCH_LIBRARY_IMPL(softmoe, CPU, m) {
  m.impl("soft_topk", &soft_topk_impl);
  m.impl("soft_topk_backward", &soft_topk_backward_impl);
}

#ifdef SOFTMOE_WITH_CUDA
TORCH_LIBRARY_IMPL(softmoe, CUDA, m) {
  m.impl("soft_topk", &soft_topk_impl);
  m.impl("soft_topk_backward", &soft_topk_backward_impl);
}
#endif
