// The only torch-facing C++ file: op schemas, argument checks, allocation, the dtype switch, the
// CPU thread pool or CUDA stream, and calls into the C core (csrc/core) or the CUDA launchers.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/Allocator.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif
#include <omp.h>

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

// ---- Large activations on huge pages ------------------------------------------------------------
//
// A layer step allocates a few activation tensors of tens to hundreds of MB (the gathered rows, the
// experts' pre-activation, their gradients). glibc hands blocks above its 32 MB mmap ceiling a
// fresh mapping every time and unmaps them on free, so each step page-faults all of it again, 4 KB
// at a time (measured here: ~0.5 ms per MB, a tenth of a layer step). Those outputs come from this
// allocator instead: 2 MB-aligned and advised MADV_HUGEPAGE, so the kernel backs them with 2 MB
// pages where transparent huge pages are enabled ("always" or "madvise"; the advice is ignored
// otherwise), 512 times fewer faults. The memory goes back to the OS on free as before; this is
// what PyTorch's THP_MEM_ALLOC_ENABLE=1 does for every tensor, confined to ours.
class HugePageAllocator final : public c10::Allocator {
 public:
  static constexpr size_t kPage = size_t{2} << 20;

  c10::DataPtr allocate(size_t n) override {
    void *ptr = nullptr;
    const size_t bytes = (std::max<size_t>(n, 1) + kPage - 1) / kPage * kPage;
    if (posix_memalign(&ptr, kPage, bytes) != 0)
      TORCH_CHECK_WITH(OutOfMemoryError, false, "softmoe: could not allocate ", bytes, " bytes for an activation");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(ptr, bytes, MADV_HUGEPAGE);  // advice only: failure leaves ordinary pages
#endif
    return {ptr, ptr, &std::free, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &std::free; }
  void copy_data(void *dest, const void *src, std::size_t count) const override { std::memcpy(dest, src, count); }
};

// Below this, glibc's heap serves the tensor without fresh pages (and 2 MB rounding would waste).
constexpr int64_t kHugePageMinBytes = int64_t{8} << 20;

// at::empty for a large CPU activation (contiguous), on huge pages; anything else as at::empty.
at::Tensor empty_activation(at::IntArrayRef sizes, const at::TensorOptions &options) {
  const int64_t bytes = c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (options.device().type() != c10::DeviceType::CPU || bytes < kHugePageMinBytes) return at::empty(sizes, options);
  static HugePageAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), c10::MemoryFormat::Contiguous);
}

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

// Raises for a status of the C core or of a CUDA launcher other than SMOE_OK.
void check_status(smoe_status status, const char *what) {
  TORCH_CHECK(status == SMOE_OK, "softmoe: ", what, ": ", smoe_status_string(status));
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

// ---- Truncated dispatch: dispatch_plan, gather_rows, combine_rows and their backward ops -------

// Runs fn(begin, end) over [0, n) on the CPU thread pool with the given grain; first non-OK status.
template <typename Fn>
smoe_status parallel_ranges(int64_t n, int64_t grain, Fn fn) {
  std::atomic<int> status{SMOE_OK};
  at::parallel_for(0, n, std::max<int64_t>(grain, 1), [&](int64_t begin, int64_t end) {
    smoe_status s = fn(begin, end);
    if (s != SMOE_OK) {
      int expected = SMOE_OK;
      status.compare_exchange_strong(expected, static_cast<int>(s));
    }
  });
  return static_cast<smoe_status>(status.load());
}

// Work items of about this many elements per task of the thread pool.
int64_t grain_for(int64_t work_per_item) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(work_per_item, 1)); }

void check_same_device(const char *op, const at::Tensor &t, const char *name, const at::Tensor &ref,
                       const char *ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "softmoe: ", op, ": ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

// A plan tensor: int64 with `dim` dimensions, on the device of ref.
void check_plan_tensor(const char *op, const at::Tensor &t, const char *name, int64_t dim, const at::Tensor &ref,
                       const char *ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "softmoe: ", op, ": ", name,
                   " must be an int64 tensor from dispatch_plan, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "softmoe: ", op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  check_same_device(op, t, name, ref, ref_name);
}

void check_float_2d(const char *op, const at::Tensor &t, const char *name, const char *shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                       t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
                   "softmoe: ", op, ": ", name, " must be float32, float64, bfloat16 or float16, got ",
                   t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "softmoe: ", op, ": ", name, " must be 2-D ", shape, ", got shape ", t.sizes());
}

// token_pairs [T, M] with M >= 1 and T = tokens; a slot tensor [T * M] (pair_token / pair_expert).
void check_token_pairs(const char *op, const at::Tensor &token_pairs, int64_t tokens, const char *tokens_from) {
  TORCH_CHECK(token_pairs.size(1) >= 1, "softmoe: ", op, ": token_pairs must have max_active >= 1 columns, got shape ",
              token_pairs.sizes());
  TORCH_CHECK(token_pairs.size(0) == tokens, "softmoe: ", op, ": token_pairs must have one row per token (", tokens,
              " rows, from ", tokens_from, "), got shape ", token_pairs.sizes());
}

// A slot tensor (pair_token / pair_expert / ys rows): S entries with S <= tokens * max_active, all of
// them (S = T * M) or the routed prefix (S = N, see DispatchPlan.trim); an index of token_pairs
// beyond S is then caught by the kernels' range checks.
void check_slots(const char *op, const at::Tensor &t, const char *name, const at::Tensor &token_pairs) {
  TORCH_CHECK(t.size(0) <= token_pairs.numel(), "softmoe: ", op, ": ", name,
              " must have at most tokens * max_active = ", token_pairs.numel(), " entries (the slots of token_pairs ",
              token_pairs.sizes(), "), got ", t.size(0));
}

// check_status for the ops that read a plan's indices, whose CPU entry points report an index out
// of range as SMOE_ERR_ARG (the binding has checked everything else).
void check_index_status(smoe_status status, const char *op, const char *indices) {
  TORCH_CHECK(status != SMOE_ERR_ARG, "softmoe: ", op, ": ", indices,
              " hold an index out of range; pass the tensors of one dispatch_plan (", smoe_status_string(status), ")");
  check_status(status, op);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dispatch_plan_impl(const at::Tensor &p_in,
                                                                              int64_t max_active) {
  const char *op = "dispatch_plan";
  check_float_2d(op, p_in, "p", "[tokens, experts]");
  const int64_t T = p_in.size(0), E = p_in.size(1);
  TORCH_CHECK(E >= 1, "softmoe: dispatch_plan: p must have at least one expert (p.size(1) >= 1), got shape ",
              p_in.sizes());
  TORCH_CHECK(max_active >= 1 && max_active <= E, "softmoe: dispatch_plan: max_active must satisfy 1 <= max_active <= ",
              E, " (the number of experts), got ", max_active);
  const int64_t M = max_active, P = T * M;
  auto opts = p_in.options().dtype(at::kLong);
  at::Tensor offsets = at::zeros({E + 1}, opts);
  at::Tensor pair_token = at::empty({P}, opts);
  at::Tensor pair_expert = at::empty({P}, opts);
  at::Tensor token_pairs = at::empty({T, M}, opts);
  if (T == 0) return {offsets, pair_token, pair_expert, token_pairs};
  at::Tensor p = p_in.contiguous();

  smoe_plan_args args{};
  args.tokens = T;
  args.experts = E;
  args.max_active = M;
  args.dtype = to_smoe_dtype(p, "p");
  args.p = p.data_ptr();
  args.offsets = offsets.data_ptr<int64_t>();
  args.pair_token = pair_token.data_ptr<int64_t>();
  args.pair_expert = pair_expert.data_ptr<int64_t>();
  args.token_pairs = token_pairs.data_ptr<int64_t>();

  if (p.is_cpu()) {
    // Token chunks (the result does not depend on them): at most 64, at least 256 tokens each.
    const int64_t chunk = std::max<int64_t>(256, (T + 63) / 64);
    const int64_t chunks = (T + chunk - 1) / chunk;
    at::Tensor counts = at::empty({chunks, E}, opts);
    int64_t *c = counts.data_ptr<int64_t>();
    check_status(parallel_ranges(chunks, 1,
                                 [&](int64_t b, int64_t e) {
                                   for (int64_t k = b; k < e; ++k) {
                                     smoe_status st = smoe_plan_count(&args, k * chunk, std::min(T, (k + 1) * chunk),
                                                                      c + k * E);
                                     if (st != SMOE_OK) return st;
                                   }
                                   return SMOE_OK;
                                 }),
                 "dispatch_plan (count)");
    check_status(smoe_plan_scan(&args, chunks, c), "dispatch_plan (scan)");
    check_status(parallel_ranges(chunks, 1,
                                 [&](int64_t b, int64_t e) {
                                   for (int64_t k = b; k < e; ++k) {
                                     smoe_status st = smoe_plan_place(&args, k * chunk, std::min(T, (k + 1) * chunk),
                                                                      c + k * E);
                                     if (st != SMOE_OK) return st;
                                   }
                                   return SMOE_OK;
                                 }),
                 "dispatch_plan (place)");
  } else {
#ifdef SOFTMOE_WITH_CUDA
    c10::cuda::CUDAGuard guard(p.device());
    at::Tensor ws = at::empty({static_cast<int64_t>(smoe_cuda_plan_workspace_bytes(T, E, M))}, p.options().dtype(at::kByte));
    check_status(smoe_cuda_dispatch_plan(&args, ws.data_ptr(), at::cuda::getCurrentCUDAStream().stream()),
                 "dispatch_plan (CUDA)");
#else
    TORCH_CHECK(false, "softmoe was built without CUDA");
#endif
  }
  return {offsets, pair_token, pair_expert, token_pairs};
}

at::Tensor gather_rows_impl(const at::Tensor &x_in, const at::Tensor &pair_token_in, const at::Tensor &token_pairs) {
  const char *op = "gather_rows";
  check_float_2d(op, x_in, "x", "[tokens, features]");
  check_plan_tensor(op, pair_token_in, "pair_token", 1, x_in, "x");
  check_plan_tensor(op, token_pairs, "token_pairs", 2, x_in, "x");
  check_token_pairs(op, token_pairs, x_in.size(0), "x.size(0)");
  check_slots(op, pair_token_in, "pair_token", token_pairs);
  const int64_t T = x_in.size(0), d = x_in.size(1), P = pair_token_in.size(0);
  at::Tensor xs = empty_activation({P, d}, x_in.options());
  if (P == 0 || d == 0) return xs;
  at::Tensor x = x_in.contiguous();
  at::Tensor pair_token = pair_token_in.contiguous();
  smoe_gather_args args{};
  args.tokens = T;
  args.slots = P;
  args.d = d;
  args.dtype = to_smoe_dtype(x, "x");
  args.x = x.data_ptr();
  args.pair_token = pair_token.data_ptr<int64_t>();
  args.xs = xs.data_ptr();
  if (x.is_cpu()) {
    check_index_status(
        parallel_ranges(P, grain_for(d), [&](int64_t b, int64_t e) { return smoe_gather_rows(&args, b, e); }), op,
        "pair_token");
  } else {
#ifdef SOFTMOE_WITH_CUDA
    c10::cuda::CUDAGuard guard(x.device());
    check_status(smoe_cuda_gather_rows(&args, at::cuda::getCurrentCUDAStream().stream()), "gather_rows (CUDA)");
#else
    TORCH_CHECK(false, "softmoe was built without CUDA");
#endif
  }
  return xs;
}

// combine with weights p (p defined) or unit weights (the backward of gather_rows).
at::Tensor combine_common(const char *op, const at::Tensor &ys_in, const at::Tensor *p_in,
                          const at::Tensor *pair_expert_in, const at::Tensor &token_pairs_in) {
  const int64_t T = token_pairs_in.size(0), M = token_pairs_in.size(1), d = ys_in.size(1);
  at::Tensor y = empty_activation({T, d}, ys_in.options());
  if (T == 0 || d == 0) return y;
  at::Tensor ys = ys_in.contiguous();
  at::Tensor token_pairs = token_pairs_in.contiguous();
  at::Tensor p, pair_expert;
  smoe_combine_args args{};
  args.tokens = T;
  args.max_active = M;
  args.d = d;
  args.slots = ys.size(0);
  args.ys_dtype = to_smoe_dtype(ys, "ys");
  args.ys = ys.data_ptr();
  args.p_dtype = SMOE_F32;
  args.p = nullptr;
  args.experts = M;
  if (p_in) {
    p = p_in->contiguous();
    pair_expert = pair_expert_in->contiguous();
    args.experts = p.size(1);
    args.p_dtype = to_smoe_dtype(p, "p");
    args.p = p.data_ptr();
    args.pair_expert = pair_expert.data_ptr<int64_t>();
  }
  args.token_pairs = token_pairs.data_ptr<int64_t>();
  args.y = y.data_ptr();
  if (ys.is_cpu()) {
    check_index_status(
        parallel_ranges(T, grain_for(d * M), [&](int64_t b, int64_t e) { return smoe_combine_rows(&args, b, e); }), op,
        p_in ? "token_pairs or pair_expert" : "token_pairs");
  } else {
#ifdef SOFTMOE_WITH_CUDA
    c10::cuda::CUDAGuard guard(ys.device());
    check_status(smoe_cuda_combine_rows(&args, at::cuda::getCurrentCUDAStream().stream()), op);
#else
    TORCH_CHECK(false, "softmoe was built without CUDA");
#endif
  }
  return y;
}

void check_combine_args(const char *op, const at::Tensor &ys, const at::Tensor &p, const at::Tensor &pair_token,
                        const at::Tensor &pair_expert, const at::Tensor &token_pairs) {
  check_float_2d(op, ys, "ys", "[slots, features]");
  check_float_2d(op, p, "p", "[tokens, experts]");
  check_same_device(op, p, "p", ys, "ys");
  check_plan_tensor(op, pair_token, "pair_token", 1, ys, "ys");
  check_plan_tensor(op, pair_expert, "pair_expert", 1, ys, "ys");
  check_plan_tensor(op, token_pairs, "token_pairs", 2, ys, "ys");
  TORCH_CHECK(p.size(1) >= 1, "softmoe: ", op, ": p must have at least one expert, got shape ", p.sizes());
  check_token_pairs(op, token_pairs, p.size(0), "p.size(0)");
  TORCH_CHECK(token_pairs.size(1) <= p.size(1), "softmoe: ", op, ": token_pairs must have max_active <= ", p.size(1),
              " (the number of experts of p) columns, got shape ", token_pairs.sizes());
  check_slots(op, pair_token, "pair_token", token_pairs);
  TORCH_CHECK(pair_expert.size(0) == pair_token.size(0), "softmoe: ", op,
              ": pair_expert must have as many slots as pair_token (", pair_token.size(0), "), got ",
              pair_expert.size(0));
  TORCH_CHECK(ys.size(0) == pair_token.size(0), "softmoe: ", op, ": ys must have one row per slot of pair_token (",
              pair_token.size(0), "), got shape ", ys.sizes());
}

at::Tensor combine_rows_impl(const at::Tensor &ys, const at::Tensor &p, const at::Tensor &pair_token,
                             const at::Tensor &pair_expert, const at::Tensor &token_pairs) {
  check_combine_args("combine_rows", ys, p, pair_token, pair_expert, token_pairs);
  return combine_common("combine_rows", ys, &p, &pair_expert, token_pairs);
}

at::Tensor gather_rows_backward_impl(const at::Tensor &grad_xs, const at::Tensor &token_pairs) {
  const char *op = "gather_rows_backward";
  check_float_2d(op, grad_xs, "grad_xs", "[slots, features]");
  check_plan_tensor(op, token_pairs, "token_pairs", 2, grad_xs, "grad_xs");
  check_token_pairs(op, token_pairs, token_pairs.size(0), "token_pairs");
  check_slots(op, grad_xs, "grad_xs", token_pairs);
  return combine_common(op, grad_xs, nullptr, nullptr, token_pairs);
}

std::tuple<at::Tensor, at::Tensor> combine_rows_backward_impl(const at::Tensor &grad_y_in, const at::Tensor &ys_in,
                                                              const at::Tensor &p_in, const at::Tensor &pair_token_in,
                                                              const at::Tensor &pair_expert_in,
                                                              const at::Tensor &token_pairs_in) {
  const char *op = "combine_rows_backward";
  check_combine_args(op, ys_in, p_in, pair_token_in, pair_expert_in, token_pairs_in);
  TORCH_CHECK(grad_y_in.dim() == 2 && grad_y_in.size(0) == p_in.size(0) && grad_y_in.size(1) == ys_in.size(1),
              "softmoe: ", op, ": grad_y must have shape [tokens, features] = [", p_in.size(0), ", ", ys_in.size(1),
              "], got ", grad_y_in.sizes());
  check_same_device(op, grad_y_in, "grad_y", ys_in, "ys");
  TORCH_CHECK_TYPE(at::isFloatingType(grad_y_in.scalar_type()), "softmoe: ", op,
                   ": grad_y must be a floating-point tensor, got ", grad_y_in.scalar_type());
  const int64_t T = p_in.size(0), E = p_in.size(1), M = token_pairs_in.size(1), d = ys_in.size(1);
  at::Tensor grad_ys = empty_activation(ys_in.sizes(), ys_in.options());
  at::Tensor grad_p = at::empty(p_in.sizes(), p_in.options());
  if (T == 0) return {grad_ys, grad_p};
  at::Tensor ys = ys_in.contiguous();
  at::Tensor grad_y = grad_y_in.to(ys.scalar_type()).contiguous();
  at::Tensor p = p_in.contiguous();
  at::Tensor pair_token = pair_token_in.contiguous();
  at::Tensor pair_expert = pair_expert_in.contiguous();
  at::Tensor token_pairs = token_pairs_in.contiguous();
  smoe_combine_bwd_args args{};
  args.tokens = T;
  args.experts = E;
  args.max_active = M;
  args.d = d;
  args.slots = ys.size(0);
  args.ys_dtype = to_smoe_dtype(ys, "ys");
  args.grad_y = grad_y.data_ptr();
  args.ys = ys.data_ptr();
  args.p_dtype = to_smoe_dtype(p, "p");
  args.p = p.data_ptr();
  args.pair_token = pair_token.data_ptr<int64_t>();
  args.pair_expert = pair_expert.data_ptr<int64_t>();
  args.token_pairs = token_pairs.data_ptr<int64_t>();
  args.grad_ys = grad_ys.data_ptr();
  args.grad_p = grad_p.data_ptr();
  if (ys.is_cpu()) {
    check_index_status(parallel_ranges(T, grain_for(2 * d * M + E),
                                       [&](int64_t b, int64_t e) { return smoe_combine_bwd(&args, b, e); }),
                       op, "pair_token, pair_expert or token_pairs");
  } else {
#ifdef SOFTMOE_WITH_CUDA
    c10::cuda::CUDAGuard guard(ys.device());
    check_status(smoe_cuda_combine_bwd(&args, at::cuda::getCurrentCUDAStream().stream()), "combine_rows_backward (CUDA)");
#else
    TORCH_CHECK(false, "softmoe was built without CUDA");
#endif
  }
  return {grad_ys, grad_p};
}

// ---- Matmuls whose bits do not depend on the thread count ---------------------------------------
//
// A BLAS library splits a product over its threads as it sees fit, and how it splits can change the
// order in which a dot product is summed. MKL (torch's BLAS on x86) splits the reduction dimension
// of products with a small output and a long reduction (a router's [E, d] weight gradient summed
// over every token, an expert's weight gradient over a short segment) once it has two threads:
// measured on an Intel Xeon, torch.set_num_threads(1) and (2) then differ in the last bits. So on
// the CPU every BLAS call of softmoe's ops is single-threaded, on pieces of work cut by the shapes
// alone, and the pieces are spread over torch's threads: the same shapes make the same calls, so the
// same bits, for any number of threads. The expert ops cut by expert segments (below); a lone
// product (the router's) by reproducible_mm_out.

// MKL's per-thread thread count, where torch's BLAS is MKL (weak: null in builds without it).
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

// Makes the BLAS calls of this thread single-threaded while it lives: MKL through its per-thread
// setting, OpenMP-threaded code (ATen's own loops, oneDNN for 16-bit types) through the OpenMP
// thread count of this thread. Both are restored on exit.
class SingleThreadedBlas {
 public:
  SingleThreadedBlas() : omp_threads_(omp_get_max_threads()) {
    omp_set_num_threads(1);
    if (MKL_Set_Num_Threads_Local) mkl_threads_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SingleThreadedBlas() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_threads_);
    omp_set_num_threads(omp_threads_);
  }
  SingleThreadedBlas(const SingleThreadedBlas &) = delete;
  SingleThreadedBlas &operator=(const SingleThreadedBlas &) = delete;

 private:
  int omp_threads_;
  int mkl_threads_ = 0;
};

// How a lone product is cut. Every piece repacks its operands for BLAS, so pieces are large: output
// tiles of 512 x 512, halved (rows first, to 128 x 256 at least) only while the product has fewer
// than 4 of them, and the reduction split into blocks of at least 512 only when that still leaves
// fewer than 4 pieces (the router's [E, d] gradient).
constexpr int64_t kTileRows = 512, kTileCols = 512, kMinTileRows = 128, kMinTileCols = 256, kMinPieces = 4,
                  kMinBlockK = 512;

struct MatmulPieces {
  int64_t tile_rows, tile_cols, row_tiles, col_tiles, k_blocks, block_k;
};

MatmulPieces cut_matmul(int64_t M, int64_t K, int64_t N) {
  MatmulPieces c{kTileRows, kTileCols, 0, 0, 1, K};
  auto count = [](int64_t n, int64_t tile) { return (n + tile - 1) / tile; };
  while (count(M, c.tile_rows) * count(N, c.tile_cols) < kMinPieces) {
    if (c.tile_rows > kMinTileRows && M > c.tile_rows / 2) c.tile_rows /= 2;
    else if (c.tile_cols > kMinTileCols && N > c.tile_cols / 2) c.tile_cols /= 2;
    else break;
  }
  c.row_tiles = count(M, c.tile_rows);
  c.col_tiles = count(N, c.tile_cols);
  const int64_t tiles = c.row_tiles * c.col_tiles;
  if (tiles < kMinPieces) c.k_blocks = std::max<int64_t>(1, std::min(count(kMinPieces, tiles), K / kMinBlockK));
  c.block_k = count(K, c.k_blocks);
  c.k_blocks = count(K, c.block_k);
  return c;
}

// out = a @ b (a [M, K], b [K, N], out [M, N], any BLAS-compatible strides). Off the CPU it is one
// (cu)BLAS call: those are deterministic for fixed shapes.
void reproducible_mm_out(at::Tensor &out, const at::Tensor &a, const at::Tensor &b) {
  if (!out.is_cpu()) {
    at::mm_out(out, a, b);
    return;
  }
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    out.zero_();
    return;
  }
  const MatmulPieces cut = cut_matmul(M, K, N);
  const int64_t k_blocks = cut.k_blocks, tiles = cut.row_tiles * cut.col_tiles;
  // With several reduction blocks, block j's product goes to partial[j] (float32 for 16-bit types,
  // so that the split adds no rounding of its own); the sum follows below.
  const bool widen = out.scalar_type() == at::kBFloat16 || out.scalar_type() == at::kHalf;
  at::Tensor partial = k_blocks > 1 ? at::empty({k_blocks, M, N}, out.options().dtype(widen ? at::kFloat : out.scalar_type()))
                                    : at::Tensor();
  // The pool's threads do not inherit this thread's dispatcher state (autograd already handled, or
  // inference mode): the pieces run under it, as one call here would.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, tiles * k_blocks, 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard caller_state_guard(caller_state);
    SingleThreadedBlas single;
    for (int64_t piece = begin; piece < end; ++piece) {
      const int64_t tile = piece / k_blocks, block = piece % k_blocks;
      const int64_t r0 = tile / cut.col_tiles * cut.tile_rows, c0 = tile % cut.col_tiles * cut.tile_cols;
      const int64_t rows = std::min(cut.tile_rows, M - r0), cols = std::min(cut.tile_cols, N - c0);
      const int64_t k0 = block * cut.block_k, klen = std::min(cut.block_k, K - k0);
      at::Tensor a_piece = a.narrow(0, r0, rows).narrow(1, k0, klen);
      at::Tensor b_piece = b.narrow(0, k0, klen).narrow(1, c0, cols);
      if (k_blocks > 1 && widen) {
        a_piece = a_piece.to(at::kFloat);
        b_piece = b_piece.to(at::kFloat);
      }
      at::Tensor target = (k_blocks > 1 ? partial.select(0, block) : out).narrow(0, r0, rows).narrow(1, c0, cols);
      at::mm_out(target, a_piece, b_piece);
    }
  });
  if (k_blocks == 1) return;
  // elementwise adds in block order: the same sum for any thread count
  at::Tensor sum = partial.select(0, 0);
  for (int64_t block = 1; block < k_blocks; ++block) sum.add_(partial.select(0, block));
  out.copy_(sum);
}

// a @ b in a new tensor through reproducible_mm_out (the binding of the softmoe::matmul op).
at::Tensor matmul_impl(const at::Tensor &a, const at::Tensor &b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "softmoe: matmul: a and b must be 2-D, got shapes ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.size(1) == b.size(0), "softmoe: matmul: a has ", a.size(1), " columns but b has ", b.size(0), " rows");
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "softmoe: matmul: a and b must have one dtype, got ",
                   a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(a.scalar_type()), "softmoe: matmul: a and b must be floating point, got ",
                   a.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "softmoe: matmul: a and b must be on one device");
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  reproducible_mm_out(out, a, b);
  return out;
}

// ---- Expert compute over expert-contiguous segments ---------------------------------------------
//
// Rows offsets[e]:offsets[e+1] of x belong to expert e; rows from offsets[E] on are padding.
// The ops read the segment bounds on the host (free on the CPU; one sync per call on CUDA) and hand
// the segments to BLAS / cuBLAS. Being ops, they keep torch.compile graphs whole.
//
// On the CPU the work is cut into row blocks (by the shapes and the segment bounds alone) that
// torch's threads take from a queue, each thread with its own buffers and single-threaded BLAS:
// independent products side by side instead of every product split over all threads. That makes
// every block's arithmetic fixed, so results do not depend on the thread count, and it is faster
// than BLAS's own threading: measured on 2 cores, 8 or 64 single-threaded products of the layer's
// shapes side by side took 0.90 to 0.98x the time of the same products one after another on MKL's
// two threads. Off the CPU the blocks run in order on the current stream.

std::vector<int64_t> segment_bounds(const at::Tensor &offsets, int64_t experts, int64_t rows, const char *op) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.size(0) == experts + 1,
              "softmoe: ", op, ": offsets must be int64 of shape [", experts + 1, "] (experts + 1), got ",
              offsets.scalar_type(), " of shape ", offsets.sizes());
  at::Tensor host = offsets.to(at::kCPU).contiguous();
  const int64_t *o = host.data_ptr<int64_t>();
  std::vector<int64_t> bounds(o, o + experts + 1);
  TORCH_CHECK(bounds[0] == 0, "softmoe: ", op, ": offsets[0] must be 0, got ", bounds[0]);
  for (int64_t e = 0; e < experts; ++e)
    TORCH_CHECK(bounds[e] <= bounds[e + 1], "softmoe: ", op, ": offsets must be nondecreasing");
  TORCH_CHECK(bounds[experts] <= rows, "softmoe: ", op, ": offsets[-1] = ", bounds[experts],
              " exceeds the number of rows (", rows, ")");
  return bounds;
}

void check_grouped_operands(const at::Tensor &x, const at::Tensor &w, const at::Tensor &offsets, const char *op) {
  TORCH_CHECK(x.dim() == 2, "softmoe: ", op, ": x must be 2-D [rows, in], got shape ", x.sizes());
  TORCH_CHECK(w.dim() == 3, "softmoe: ", op, ": w must be 3-D [experts, in, out], got shape ", w.sizes());
  TORCH_CHECK(x.size(1) == w.size(1), "softmoe: ", op, ": x has ", x.size(1), " columns but w expects ", w.size(1));
  TORCH_CHECK_TYPE(x.scalar_type() == w.scalar_type(), "softmoe: ", op, ": x and w must have one dtype, got ",
                   x.scalar_type(), " and ", w.scalar_type());
  TORCH_CHECK(x.device() == w.device() && offsets.device() == x.device(), "softmoe: ", op,
              ": x, w and offsets must be on one device");
}

// Rows per chunk: about 2^21 elements of the widest buffer ([chunk, W]), 8 MB in float32 per thread,
// which bounds the peak memory the buffers add. A GPU has one set of buffers and pays a launch per
// product, so its backward takes chunks four times as long.
constexpr int kChunkLog2 = 21, kDeviceBackwardChunkLog2 = 23;
int64_t ffn_chunk_rows(int64_t width, int elements_log2 = kChunkLog2) {
  return std::max<int64_t>(16, (int64_t{1} << elements_log2) / std::max<int64_t>(width, 1));
}

// Rows [begin, begin + len) of expert `expert`'s segment; in the backward, `slot` says where the
// block's weight gradients go: 0 straight into grad_w[expert], s > 0 into partial s - 1, added to
// grad_w[expert] after all blocks in slot order.
struct RowBlock {
  int64_t expert, begin, len, slot;
};

// Runs body(block, scratch) for every block, scratch = make_scratch() once per thread. On the CPU
// the blocks go to torch's threads through a queue (the longest first, for balance), each thread's
// BLAS calls single-threaded; elsewhere in order on this thread.
template <typename MakeScratch, typename Body>
void run_blocks(std::vector<RowBlock> blocks, bool on_cpu, MakeScratch make_scratch, Body body) {
  if (blocks.empty()) return;
  if (!on_cpu) {
    auto scratch = make_scratch();
    for (const RowBlock &block : blocks) body(block, scratch);
    return;
  }
  std::stable_sort(blocks.begin(), blocks.end(), [](const RowBlock &a, const RowBlock &b) { return a.len > b.len; });
  std::atomic<size_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(blocks.size()));
  const at::ThreadLocalState caller_state;  // see reproducible_mm_out
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard caller_state_guard(caller_state);
    SingleThreadedBlas single;
    auto scratch = make_scratch();
    for (size_t i; (i = next.fetch_add(1)) < blocks.size();) body(blocks[i], scratch);
  });
}

// Every segment in chunks of `chunk` rows (the last one of a segment shorter).
std::vector<RowBlock> chunk_blocks(const std::vector<int64_t> &bounds, int64_t chunk) {
  std::vector<RowBlock> blocks;
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(bounds.size()); ++e)
    for (int64_t r = bounds[e]; r < bounds[e + 1]; r += chunk) blocks.push_back({e, r, std::min(chunk, bounds[e + 1] - r), 0});
  return blocks;
}

void mm_into(at::Tensor &out, const at::Tensor &a, const at::Tensor &b, bool accumulate) {
  if (accumulate) out.addmm_(a, b);
  else at::mm_out(out, a, b);
}

// The blocks of a weight gradient: an expert's segment is one block, unless it holds at least two
// shares of the work (a share: 1 / kTargetBlocks of all routed rows, at least one chunk); then it is
// cut into that many blocks of about equal length (at most kMaxBlocksPerExpert), so that an
// overloaded expert does not leave the other threads idle. Each block accumulates its chunks'
// weight gradients in order; blocks after an expert's first write into partial sums (slots, one
// weight-sized buffer each) that are added in block order at the end. Balanced routing needs no
// slots: the experts themselves are the blocks.
constexpr int64_t kTargetBlocks = 8, kMaxBlocksPerExpert = 4;

std::vector<RowBlock> weight_grad_blocks(const std::vector<int64_t> &bounds, int64_t experts, int64_t chunk,
                                         int64_t *slots) {
  const int64_t share = std::max(chunk, (bounds[experts] + kTargetBlocks - 1) / kTargetBlocks);
  std::vector<RowBlock> blocks;
  *slots = 0;
  for (int64_t e = 0; e < experts; ++e) {
    const int64_t len = bounds[e + 1] - bounds[e];
    if (len == 0) continue;
    const int64_t count = std::max<int64_t>(1, std::min(kMaxBlocksPerExpert, len / share));
    const int64_t each = (len + count - 1) / count;
    for (int64_t i = 0, r = bounds[e]; r < bounds[e + 1]; ++i, r += each)
      blocks.push_back({e, r, std::min(each, bounds[e + 1] - r), i == 0 ? 0 : ++*slots});
  }
  return blocks;
}

// y[P, N] with y[seg_e] = x[seg_e] @ w[e]; padding rows are zero.
at::Tensor grouped_mm_impl(const at::Tensor &x, const at::Tensor &w, const at::Tensor &offsets) {
  check_grouped_operands(x, w, offsets, "grouped_mm");
  const int64_t experts = w.size(0), rows = x.size(0);
  const auto bounds = segment_bounds(offsets, experts, rows, "grouped_mm");
  at::Tensor y = empty_activation({rows, w.size(2)}, x.options());
  run_blocks(chunk_blocks(bounds, ffn_chunk_rows(w.size(2))), x.is_cpu(), [] { return 0; }, [&](const RowBlock &block, int) {
    at::Tensor out = y.narrow(0, block.begin, block.len);
    at::mm_out(out, x.narrow(0, block.begin, block.len), w.select(0, block.expert));
  });
  y.narrow(0, bounds[experts], rows - bounds[experts]).zero_();
  return y;
}

// Adds each block's partial sum (slot > 0) to its expert's gradient, in block order, and zeroes the
// gradients of experts without rows.
void finish_weight_grad(at::Tensor &grad_w, const at::Tensor &partial, const std::vector<RowBlock> &blocks,
                        const std::vector<int64_t> &bounds) {
  for (const RowBlock &block : blocks)
    if (block.slot > 0) grad_w.select(0, block.expert).add_(partial.select(0, block.slot - 1));
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(bounds.size()); ++e)
    if (bounds[e + 1] == bounds[e]) grad_w.select(0, e).zero_();
}

// grad_w[E, K, N] with grad_w[e] = x[seg_e]^T @ grad_y[seg_e]; zero for empty segments.
at::Tensor grouped_mm_weight_grad_impl(const at::Tensor &x, const at::Tensor &grad_y, const at::Tensor &offsets,
                                       int64_t experts) {
  TORCH_CHECK(x.dim() == 2 && grad_y.dim() == 2 && x.size(0) == grad_y.size(0),
              "softmoe: grouped_mm_weight_grad: x and grad_y must be 2-D with one row count, got ", x.sizes(),
              " and ", grad_y.sizes());
  TORCH_CHECK(experts >= 1, "softmoe: grouped_mm_weight_grad: experts must be >= 1, got ", experts);
  const auto bounds = segment_bounds(offsets, experts, x.size(0), "grouped_mm_weight_grad");
  at::Tensor grad_w = at::empty({experts, x.size(1), grad_y.size(1)}, x.options());
  int64_t slots = 0;
  const auto blocks = weight_grad_blocks(bounds, experts, ffn_chunk_rows(grad_y.size(1)), &slots);
  at::Tensor partial = at::empty({slots, x.size(1), grad_y.size(1)}, x.options());
  run_blocks(blocks, x.is_cpu(), [] { return 0; }, [&](const RowBlock &block, int) {
    at::Tensor out = block.slot == 0 ? grad_w.select(0, block.expert) : partial.select(0, block.slot - 1);
    at::mm_out(out, x.narrow(0, block.begin, block.len).t(), grad_y.narrow(0, block.begin, block.len));
  });
  finish_weight_grad(grad_w, partial, blocks, bounds);
  return grad_w;
}

// ---- Fused expert FFN: both matmuls and the activation, chunk by chunk --------------------------
//
// The same math as grouped_mm -> activation -> grouped_mm, but the activation and, in the
// backward, the activation's gradient only ever exist for one chunk of rows at a time, in buffers
// reused across chunks and experts. Only the pre-activation `hidden` [P, W] is kept for the
// backward (the activation is recomputed from it per chunk, an elementwise pass). Unfused, a step
// allocates about six [P, d_hidden]-sized temporaries plus a concatenation; on the CPU each of
// those is a fresh mmap that page-faults again every step (glibc returns blocks above 32 MB to the
// OS on free), which made the layer slower than a per-expert Python loop whose tensors are small.
// The CPU runs the blocks side by side as described above (Expert compute); the forward's blocks are
// its chunks, the backward's those of weight_grad_blocks.

enum class Activation { swiglu, gelu };

Activation parse_activation(c10::string_view name, const char *op) {
  if (name == "swiglu") return Activation::swiglu;
  if (name == "gelu") return Activation::gelu;
  TORCH_CHECK(false, "softmoe: ", op, ": activation must be 'swiglu' or 'gelu', got '", std::string(name), "'");
}

struct FfnShape {
  int64_t experts, rows, d_in, width, d_hidden, d_out;
};

FfnShape check_ffn_operands(const at::Tensor &x, const at::Tensor &w_in, const at::Tensor &w_out,
                            const at::Tensor &offsets, Activation act, const char *op) {
  TORCH_CHECK(x.dim() == 2, "softmoe: ", op, ": x must be 2-D [rows, d_model], got shape ", x.sizes());
  TORCH_CHECK(w_in.dim() == 3 && w_out.dim() == 3, "softmoe: ", op,
              ": w_in and w_out must be 3-D [experts, in, out], got shapes ", w_in.sizes(), " and ", w_out.sizes());
  FfnShape s{w_in.size(0), x.size(0), x.size(1), w_in.size(2), w_out.size(1), w_out.size(2)};
  TORCH_CHECK(w_in.size(1) == s.d_in, "softmoe: ", op, ": x has ", s.d_in, " columns but w_in expects ", w_in.size(1));
  TORCH_CHECK(w_out.size(0) == s.experts, "softmoe: ", op, ": w_in has ", s.experts, " experts but w_out has ",
              w_out.size(0));
  const int64_t expected = act == Activation::swiglu ? 2 * s.d_hidden : s.d_hidden;
  TORCH_CHECK(s.width == expected, "softmoe: ", op, ": w_in must have ", act == Activation::swiglu ? "2 * " : "",
              "d_hidden = ", expected, " output columns for w_out's d_hidden = ", s.d_hidden, ", got ", s.width);
  TORCH_CHECK_TYPE(x.scalar_type() == w_in.scalar_type() && x.scalar_type() == w_out.scalar_type(), "softmoe: ", op,
                   ": x, w_in and w_out must have one dtype, got ", x.scalar_type(), ", ", w_in.scalar_type(), " and ",
                   w_out.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "softmoe: ", op,
                   ": x, w_in and w_out must be floating point (the activation), got ", x.scalar_type());
  TORCH_CHECK(x.device() == w_in.device() && x.device() == w_out.device() && x.device() == offsets.device(),
              "softmoe: ", op, ": x, w_in, w_out and offsets must be on one device");
  return s;
}

// out[c, d_hidden] = activation(h[c, W]).
void activate_out(at::Tensor &out, const at::Tensor &h, Activation act, int64_t d_hidden) {
  if (act == Activation::swiglu) {
    at::silu_out(out, h.narrow(1, 0, d_hidden));
    out.mul_(h.narrow(1, d_hidden, d_hidden));
  } else {
    at::gelu_out(out, h);
  }
}

// Returns y [P, d_out] (zeros on padding rows) and, with keep_hidden, hidden = x @ w_in per segment
// [P, W] for the backward (else an empty [0, W]). The forward's blocks are its chunks.
std::tuple<at::Tensor, at::Tensor> expert_ffn_impl(const at::Tensor &x, const at::Tensor &w_in,
                                                   const at::Tensor &w_out, const at::Tensor &offsets,
                                                   c10::string_view activation, bool keep_hidden) {
  const char *op = "expert_ffn";
  const Activation act = parse_activation(activation, op);
  const FfnShape s = check_ffn_operands(x, w_in, w_out, offsets, act, op);
  const auto bounds = segment_bounds(offsets, s.experts, s.rows, op);
  at::Tensor y = empty_activation({s.rows, s.d_out}, x.options());
  at::Tensor hidden = empty_activation({keep_hidden ? s.rows : 0, s.width}, x.options());
  const std::vector<RowBlock> blocks = chunk_blocks(bounds, ffn_chunk_rows(s.width));
  const int64_t buffer_rows = blocks.empty() ? 0 : std::max_element(blocks.begin(), blocks.end(), [](auto &a, auto &b) {
    return a.len < b.len;
  })->len;
  struct Scratch {
    at::Tensor h, a;
  };
  run_blocks(
      blocks, x.is_cpu(),
      [&] {
        return Scratch{keep_hidden ? at::Tensor() : empty_activation({buffer_rows, s.width}, x.options()),
                       empty_activation({buffer_rows, s.d_hidden}, x.options())};
      },
      [&](const RowBlock &block, Scratch &scratch) {
        at::Tensor h = keep_hidden ? hidden.narrow(0, block.begin, block.len) : scratch.h.narrow(0, 0, block.len);
        at::Tensor a = scratch.a.narrow(0, 0, block.len);
        at::Tensor y_rows = y.narrow(0, block.begin, block.len);
        at::mm_out(h, x.narrow(0, block.begin, block.len), w_in.select(0, block.expert));
        activate_out(a, h, act, s.d_hidden);
        at::mm_out(y_rows, a, w_out.select(0, block.expert));
      });
  y.narrow(0, bounds[s.experts], s.rows - bounds[s.experts]).zero_();
  if (keep_hidden) hidden.narrow(0, bounds[s.experts], s.rows - bounds[s.experts]).zero_();
  return {y, hidden};
}

// Gradients of expert_ffn's y w.r.t. x, w_in and w_out (those not in output_mask come back empty).
std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_ffn_backward_impl(
    const at::Tensor &grad_y_in, const at::Tensor &x, const at::Tensor &hidden, const at::Tensor &w_in,
    const at::Tensor &w_out, const at::Tensor &offsets, c10::string_view activation, std::array<bool, 3> output_mask) {
  const char *op = "expert_ffn_backward";
  const Activation act = parse_activation(activation, op);
  const FfnShape s = check_ffn_operands(x, w_in, w_out, offsets, act, op);
  TORCH_CHECK(grad_y_in.dim() == 2 && grad_y_in.size(0) == s.rows && grad_y_in.size(1) == s.d_out, "softmoe: ", op,
              ": grad_y must be [", s.rows, ", ", s.d_out, "], got shape ", grad_y_in.sizes());
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == s.rows && hidden.size(1) == s.width, "softmoe: ", op,
              ": hidden must be [", s.rows, ", ", s.width, "] (expert_ffn with keep_hidden=True), got shape ",
              hidden.sizes());
  TORCH_CHECK_TYPE(grad_y_in.scalar_type() == x.scalar_type() && hidden.scalar_type() == x.scalar_type(), "softmoe: ",
                   op, ": grad_y and hidden must have x's dtype ", x.scalar_type());
  const auto bounds = segment_bounds(offsets, s.experts, s.rows, op);
  const bool want_x = output_mask[0], want_w_in = output_mask[1], want_w_out = output_mask[2];
  const at::Tensor grad_y = grad_y_in.contiguous();
  at::Tensor grad_x = empty_activation({want_x ? s.rows : 0, s.d_in}, x.options());
  at::Tensor grad_w_in = empty_activation(want_w_in ? w_in.sizes() : at::IntArrayRef{0}, x.options());
  at::Tensor grad_w_out = empty_activation(want_w_out ? w_out.sizes() : at::IntArrayRef{0}, x.options());
  const int64_t chunk = ffn_chunk_rows(s.width, x.is_cpu() ? kChunkLog2 : kDeviceBackwardChunkLog2);
  int64_t slots = 0;
  const std::vector<RowBlock> blocks = weight_grad_blocks(bounds, s.experts, chunk, &slots);
  at::Tensor partial_w_in = want_w_in ? at::empty({slots, s.d_in, s.width}, x.options()) : at::Tensor();
  at::Tensor partial_w_out = want_w_out ? at::empty({slots, s.d_hidden, s.d_out}, x.options()) : at::Tensor();
  const int64_t buffer_rows = std::min(chunk, s.rows);
  const bool swiglu = act == Activation::swiglu;
  // swiglu: silu = silu(gate), a = silu * up, t = grad_a * up; gelu: a = gelu(h)
  struct Scratch {
    at::Tensor a, silu, t, grad_a, grad_h;
  };
  run_blocks(
      blocks, x.is_cpu(),
      [&] {
        auto rows = [&](int64_t cols) { return empty_activation({buffer_rows, cols}, x.options()); };
        return Scratch{rows(s.d_hidden), swiglu ? rows(s.d_hidden) : at::Tensor(), swiglu ? rows(s.d_hidden) : at::Tensor(),
                       rows(s.d_hidden), rows(s.width)};
      },
      [&](const RowBlock &block, Scratch &scratch) {
        const at::Tensor wi = w_in.select(0, block.expert), wo = w_out.select(0, block.expert);
        at::Tensor gwi, gwo;
        if (want_w_in) gwi = block.slot == 0 ? grad_w_in.select(0, block.expert) : partial_w_in.select(0, block.slot - 1);
        if (want_w_out) gwo = block.slot == 0 ? grad_w_out.select(0, block.expert) : partial_w_out.select(0, block.slot - 1);
        for (int64_t r = block.begin; r < block.begin + block.len; r += chunk) {
          const int64_t len = std::min(chunk, block.begin + block.len - r);
          const bool first = r == block.begin;  // the block's first chunk overwrites its weight gradients
          const at::Tensor h = hidden.narrow(0, r, len), gy = grad_y.narrow(0, r, len);
          at::Tensor a = scratch.a.narrow(0, 0, len);
          if (swiglu) {
            at::Tensor silu_gate = scratch.silu.narrow(0, 0, len);
            at::silu_out(silu_gate, h.narrow(1, 0, s.d_hidden));
            if (want_w_out) at::mul_out(a, silu_gate, h.narrow(1, s.d_hidden, s.d_hidden));
          } else if (want_w_out) {
            at::gelu_out(a, h);
          }
          if (want_w_out) mm_into(gwo, a.t(), gy, !first);
          if (!want_x && !want_w_in) continue;
          at::Tensor ga = scratch.grad_a.narrow(0, 0, len), gh = scratch.grad_h.narrow(0, 0, len);
          at::mm_out(ga, gy, wo.t());
          if (swiglu) {
            at::Tensor gh_gate = gh.narrow(1, 0, s.d_hidden), gh_up = gh.narrow(1, s.d_hidden, s.d_hidden);
            at::Tensor t = scratch.t.narrow(0, 0, len);
            at::mul_out(gh_up, ga, scratch.silu.narrow(0, 0, len));
            at::mul_out(t, ga, h.narrow(1, s.d_hidden, s.d_hidden));
            at::silu_backward_out(gh_gate, t, h.narrow(1, 0, s.d_hidden));
          } else {
            at::gelu_backward_out(gh, ga, h);
          }
          if (want_w_in) mm_into(gwi, x.narrow(0, r, len).t(), gh, !first);
          if (want_x) {
            at::Tensor gx = grad_x.narrow(0, r, len);
            at::mm_out(gx, gh, wi.t());
          }
        }
      });
  if (want_w_in) finish_weight_grad(grad_w_in, partial_w_in, blocks, bounds);
  if (want_w_out) finish_weight_grad(grad_w_out, partial_w_out, blocks, bounds);
  if (want_x) grad_x.narrow(0, bounds[s.experts], s.rows - bounds[s.experts]).zero_();
  return {grad_x, grad_w_in, grad_w_out};
}

}  // namespace

TORCH_LIBRARY(softmoe, m) {
  m.def(
      "soft_topk(Tensor scores, Tensor k, Tensor alpha, float eps, int max_active) -> (Tensor p, Tensor threshold)");
  m.def(
      "soft_topk_backward(Tensor grad_p, Tensor scores, Tensor p, Tensor threshold, Tensor k, Tensor alpha, "
      "float eps, int max_active) -> (Tensor grad_scores, Tensor grad_k, Tensor grad_alpha)");
  // Truncated dispatch (DESIGN.md §3): the plan, the permutation into expert order and back.
  m.def(
      "dispatch_plan(Tensor p, int max_active) -> "
      "(Tensor offsets, Tensor pair_token, Tensor pair_expert, Tensor token_pairs)");
  m.def("gather_rows(Tensor x, Tensor pair_token, Tensor token_pairs) -> Tensor");
  m.def("gather_rows_backward(Tensor grad_xs, Tensor token_pairs) -> Tensor");
  m.def("combine_rows(Tensor ys, Tensor p, Tensor pair_token, Tensor pair_expert, Tensor token_pairs) -> Tensor");
  m.def(
      "combine_rows_backward(Tensor grad_y, Tensor ys, Tensor p, Tensor pair_token, Tensor pair_expert, "
      "Tensor token_pairs) -> (Tensor grad_ys, Tensor grad_p)");
  // Matmuls whose bits do not depend on the thread count (the router), and expert compute over
  // expert-contiguous segments.
  m.def("matmul(Tensor a, Tensor b) -> Tensor");
  m.def("grouped_mm(Tensor x, Tensor w, Tensor offsets) -> Tensor");
  m.def("grouped_mm_weight_grad(Tensor x, Tensor grad_y, Tensor offsets, int experts) -> Tensor");
  // The whole expert FFN (matmul, activation, matmul) with chunked temporaries.
  m.def(
      "expert_ffn(Tensor x, Tensor w_in, Tensor w_out, Tensor offsets, str activation, bool keep_hidden) -> "
      "(Tensor y, Tensor hidden)");
  m.def(
      "expert_ffn_backward(Tensor grad_y, Tensor x, Tensor hidden, Tensor w_in, Tensor w_out, Tensor offsets, "
      "str activation, bool[3] output_mask) -> (Tensor grad_x, Tensor grad_w_in, Tensor grad_w_out)");
}

TORCH_LIBRARY_IMPL(softmoe, CPU, m) {
  m.impl("soft_topk", &soft_topk_impl);
  m.impl("soft_topk_backward", &soft_topk_backward_impl);
  m.impl("dispatch_plan", &dispatch_plan_impl);
  m.impl("gather_rows", &gather_rows_impl);
  m.impl("gather_rows_backward", &gather_rows_backward_impl);
  m.impl("combine_rows", &combine_rows_impl);
  m.impl("combine_rows_backward", &combine_rows_backward_impl);
  m.impl("matmul", &matmul_impl);
  m.impl("grouped_mm", &grouped_mm_impl);
  m.impl("grouped_mm_weight_grad", &grouped_mm_weight_grad_impl);
  m.impl("expert_ffn", &expert_ffn_impl);
  m.impl("expert_ffn_backward", &expert_ffn_backward_impl);
}

#ifdef SOFTMOE_WITH_CUDA
TORCH_LIBRARY_IMPL(softmoe, CUDA, m) {
  m.impl("soft_topk", &soft_topk_impl);
  m.impl("soft_topk_backward", &soft_topk_backward_impl);
  m.impl("dispatch_plan", &dispatch_plan_impl);
  m.impl("gather_rows", &gather_rows_impl);
  m.impl("gather_rows_backward", &gather_rows_backward_impl);
  m.impl("combine_rows", &combine_rows_impl);
  m.impl("combine_rows_backward", &combine_rows_backward_impl);
  m.impl("matmul", &matmul_impl);
  m.impl("grouped_mm", &grouped_mm_impl);
  m.impl("grouped_mm_weight_grad", &grouped_mm_weight_grad_impl);
  m.impl("expert_ffn", &expert_ffn_impl);
  m.impl("expert_ffn_backward", &expert_ffn_backward_impl);
}
#endif
