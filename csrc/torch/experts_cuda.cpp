// The expert compute ops on a GPU behind the checks of experts.cpp. Nothing here reads the offsets
// on the host and nothing loops over experts: every op is a fixed number of launches on the current
// stream whatever E, so a layer step is launch-count independent of E, never waits for the device
// and can be captured in a CUDA graph. Bad offsets are made valid on the device (clamped, made
// nondecreasing) and give defined output here, where the CPU raises.
//
// Two implementations of each product, both without host syncs: torch's grouped GEMM
// (at::_grouped_mm: CUTLASS on sm_90 / sm_100, bfloat16 operands whose layout its TMA loads
// accept) where it applies, else cuda/grouped.cu's kernels (any dtype, any strides, any GPU).
// Elsewhere at::_grouped_mm falls back to a host loop over the groups that copies the offsets to
// the host, so it is never called there. SOFTMOE_TORCH_GROUPED_MM=0 forces softmoe's kernels.
//
// Unlike the CPU's chunked compute (experts.h), the activation and its gradient are whole
// [P, d_hidden] buffers: on a GPU the caching allocator reuses them step to step, and one launch
// over all rows replaces a launch per chunk. Compiled in a CUDA build only.
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>

#include "cuda/launch.h"
#include "cuda_launch.h"
#include "experts.h"

namespace softmoe {
namespace {

// One (cu)BLAS call: deterministic for fixed shapes, whatever the thread count.
at::Tensor matmul_cuda(const at::Tensor &a, const at::Tensor &b) {
  check_matmul(a, b);
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  at::mm_out(out, a, b);
  return out;
}

// ---- torch's grouped GEMM -------------------------------------------------------------------------

// Whether at::_grouped_mm takes its device-only CUTLASS path for a @ b (a 2-D, b 2-D or 3-D) with
// a bfloat16 result of `out_cols` columns: bfloat16 on compute capability 9 or 10, non-empty
// operands at 16-byte aligned addresses with one of their last two strides 1 and the other a
// multiple of 16 bytes covering the row (the checks of its TMA loads), and out_cols a multiple of 8
// (so that its output is contiguous).
bool torch_grouped_mm_applies(const at::Tensor &a, const at::Tensor &b, int64_t out_cols) {
  const char *flag = std::getenv("SOFTMOE_TORCH_GROUPED_MM");
  if (flag && std::strcmp(flag, "0") == 0) return false;
  if (a.scalar_type() != at::kBFloat16 || b.scalar_type() != at::kBFloat16 || out_cols % 8 != 0) return false;
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major != 9 && major != 10) return false;
  auto layout_ok = [](const at::Tensor &t) {
    if (t.numel() == 0 || reinterpret_cast<std::uintptr_t>(t.data_ptr()) % 16 != 0) return false;
    const int64_t d = t.dim(), rs = t.stride(d - 2), cs = t.stride(d - 1);
    const bool column_major = rs == 1 && cs >= std::max<int64_t>(1, t.size(d - 2)) && cs % 8 == 0;
    const bool row_major = cs == 1 && rs >= std::max<int64_t>(1, t.size(d - 1)) && rs % 8 == 0;
    return (row_major || column_major) && (d == 2 || t.stride(0) % 8 == 0);
  };
  return layout_ok(a) && layout_ok(b);
}

// The segment ends offsets[1..E] as at::_grouped_mm's int32 group ends, made valid on the device as
// cuda/grouped.cu makes them (clamped to [0, rows], nondecreasing): bad offsets cannot send it out
// of bounds.
at::Tensor group_ends(const at::Tensor &offsets, int64_t experts, int64_t rows) {
  const at::Tensor ends = offsets.narrow(0, 1, experts).clamp(0, rows);
  return std::get<0>(at::cummax(ends, 0)).to(at::kInt);
}

// ---- softmoe's grouped kernels (cuda/grouped.cu) ---------------------------------------------------

// y[seg_e] = x[seg_e] @ w[e] (x [P, K] and w [E, K, N] with any strides, e.g. a transposed w for
// the gradient of x; y [P, N] with contiguous rows), zeros on padding rows.
void grouped_mm_into(at::Tensor &y, const at::Tensor &x, const at::Tensor &w, const at::Tensor &offsets,
                     const char *what) {
  const at::Tensor offs = offsets.contiguous();  // the kernels read offsets[e] at offs + e
  smoe_grouped_mm_args a{};
  a.experts = w.size(0);
  a.rows = x.size(0);
  a.k = x.size(1);
  a.n = w.size(2);
  a.dtype = to_smoe_dtype(x, "x");
  a.x = x.data_ptr();
  a.x_row_stride = x.stride(0);
  a.x_col_stride = x.stride(1);
  a.w = w.data_ptr();
  a.w_expert_stride = w.stride(0);
  a.w_row_stride = w.stride(1);
  a.w_col_stride = w.stride(2);
  a.offsets = offs.data_ptr<int64_t>();
  a.y = y.data_ptr();
  a.y_row_stride = y.stride(0);
  TORCH_INTERNAL_ASSERT(y.size(1) <= 1 || y.stride(1) == 1, "grouped_mm_into: y's columns must be contiguous");
  launch_cuda(x, smoe_cuda_grouped_workspace_bytes(a.experts), what,
              [&](void *ws, void *stream) { return smoe_cuda_grouped_mm(&a, ws, stream); });
}

// ---- the products, on whichever implementation applies ---------------------------------------------

at::Tensor grouped_mm_of(const at::Tensor &x, const at::Tensor &w, const at::Tensor &offsets, const char *what) {
  const int64_t experts = w.size(0), rows = x.size(0);
  if (torch_grouped_mm_applies(x, w, w.size(2))) {
    at::Tensor y = at::_grouped_mm(x, w, group_ends(offsets, experts, rows));
    // rows from offsets[E] on (padding) are not written by the grouped GEMM
    const at::Tensor end = offsets.select(0, experts).clamp(0, rows);
    return y.masked_fill_(at::arange(rows, offsets.options()).ge(end).unsqueeze(1), 0);
  }
  at::Tensor y = at::empty({rows, w.size(2)}, x.options());
  grouped_mm_into(y, x, w, offsets, what);
  return y;
}

// grad_w [E, K, N] with grad_w[e] = x[seg_e]^T @ g[seg_e], summed in float (double for float64) over
// all of an expert's rows and rounded once: 16-bit gradients are not accumulated in 16 bits.
at::Tensor weight_grad_of(const at::Tensor &x, const at::Tensor &g, const at::Tensor &offsets, int64_t experts,
                          const char *what) {
  if (torch_grouped_mm_applies(x.t(), g, g.size(1))) {
    // one GEMM per expert over its rows, float32 accumulation inside, rounded once; an expert
    // without rows is zeroed here rather than trusted to the kernel
    const at::Tensor ends = group_ends(offsets, experts, x.size(0));
    at::Tensor grad_w = at::_grouped_mm(x.t(), g, ends);
    const at::Tensor begins = at::cat({at::zeros({1}, ends.options()), ends.narrow(0, 0, experts - 1)});
    return grad_w.masked_fill_(ends.eq(begins).view({experts, 1, 1}), 0);
  }
  at::Tensor grad_w = at::empty({experts, x.size(1), g.size(1)}, x.options());
  const at::Tensor offs = offsets.contiguous();
  smoe_grouped_wgrad_args a{};
  a.experts = experts;
  a.rows = x.size(0);
  a.k = x.size(1);
  a.n = g.size(1);
  a.dtype = to_smoe_dtype(x, "x");
  a.x = x.data_ptr();
  a.x_row_stride = x.stride(0);
  a.x_col_stride = x.stride(1);
  a.grad_y = g.data_ptr();
  a.g_row_stride = g.stride(0);
  a.g_col_stride = g.stride(1);
  a.offsets = offs.data_ptr<int64_t>();
  a.grad_w = grad_w.data_ptr();
  launch_cuda(x, smoe_cuda_grouped_workspace_bytes(experts), what,
              [&](void *ws, void *stream) { return smoe_cuda_grouped_mm_weight_grad(&a, ws, stream); });
  return grad_w;
}

at::Tensor grouped_mm_cuda(const at::Tensor &x, const at::Tensor &w, const at::Tensor &offsets) {
  check_grouped_operands(x, w, offsets, "grouped_mm");
  check_offsets(offsets, w.size(0), "grouped_mm");
  return grouped_mm_of(x, w, offsets, "grouped_mm (CUDA)");
}

at::Tensor grouped_mm_weight_grad_cuda(const at::Tensor &x, const at::Tensor &grad_y, const at::Tensor &offsets,
                                       int64_t experts) {
  check_weight_grad_operands(x, grad_y, offsets, experts);
  check_offsets(offsets, experts, "grouped_mm_weight_grad");
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type(), "softmoe: grouped_mm_weight_grad: x and grad_y must ",
                   "have one dtype, got ", x.scalar_type(), " and ", grad_y.scalar_type());
  return weight_grad_of(x, grad_y, offsets, experts, "grouped_mm_weight_grad (CUDA)");
}

std::tuple<at::Tensor, at::Tensor> expert_ffn_cuda(const at::Tensor &x, const at::Tensor &w_in,
                                                   const at::Tensor &w_out, const at::Tensor &offsets,
                                                   c10::string_view activation, bool keep_hidden) {
  const char *op = "expert_ffn";
  const Activation act = parse_activation(activation, op);
  const FfnShape s = check_ffn_operands(x, w_in, w_out, offsets, act, op);
  check_offsets(offsets, s.experts, op);
  at::Tensor h = grouped_mm_of(x, w_in, offsets, "expert_ffn (CUDA)");
  at::Tensor a = at::empty({s.rows, s.d_hidden}, x.options());
  activate_out(a, h, act, s.d_hidden);
  at::Tensor y = grouped_mm_of(a, w_out, offsets, "expert_ffn (CUDA)");
  return {y, keep_hidden ? h : at::empty({0, s.width}, x.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_ffn_backward_cuda(
    const at::Tensor &grad_y_in, const at::Tensor &x, const at::Tensor &hidden, const at::Tensor &w_in,
    const at::Tensor &w_out, const at::Tensor &offsets, c10::string_view activation, std::array<bool, 3> output_mask) {
  const char *op = "expert_ffn_backward";
  const char *what = "expert_ffn_backward (CUDA)";
  const Activation act = parse_activation(activation, op);
  const FfnShape s = check_ffn_operands(x, w_in, w_out, offsets, act, op);
  check_ffn_backward_operands(grad_y_in, x, hidden, s, op);
  check_offsets(offsets, s.experts, op);
  const bool want_x = output_mask[0], want_w_in = output_mask[1], want_w_out = output_mask[2];
  const at::Tensor grad_y = grad_y_in.contiguous();
  at::Tensor grad_x = at::empty({0, s.d_in}, x.options());
  at::Tensor grad_w_in = at::empty({0}, x.options()), grad_w_out = at::empty({0}, x.options());
  if (want_w_out) {
    at::Tensor a = at::empty({s.rows, s.d_hidden}, x.options());
    activate_out(a, hidden, act, s.d_hidden);
    grad_w_out = weight_grad_of(a, grad_y, offsets, s.experts, what);
  }
  if (want_x || want_w_in) {
    const at::Tensor grad_a = grouped_mm_of(grad_y, w_out.transpose(1, 2), offsets, what);
    at::Tensor grad_h = at::empty({s.rows, s.width}, x.options());
    if (act == Activation::swiglu) {
      const at::Tensor gate = hidden.narrow(1, 0, s.d_hidden), up = hidden.narrow(1, s.d_hidden, s.d_hidden);
      at::Tensor grad_gate = grad_h.narrow(1, 0, s.d_hidden), grad_up = grad_h.narrow(1, s.d_hidden, s.d_hidden);
      at::mul_out(grad_up, grad_a, at::silu(gate));
      at::silu_backward_out(grad_gate, grad_a * up, gate);
    } else {
      at::gelu_backward_out(grad_h, grad_a, hidden);
    }
    if (want_w_in) grad_w_in = weight_grad_of(x, grad_h, offsets, s.experts, what);
    if (want_x) grad_x = grouped_mm_of(grad_h, w_in.transpose(1, 2), offsets, what);
  }
  return {grad_x, grad_w_in, grad_w_out};
}

}  // namespace
}  // namespace softmoe

TORCH_LIBRARY_IMPL(softmoe, CUDA, m) {
  m.impl("matmul", &softmoe::matmul_cuda);
  m.impl("grouped_mm", &softmoe::grouped_mm_cuda);
  m.impl("grouped_mm_weight_grad", &softmoe::grouped_mm_weight_grad_cuda);
  m.impl("expert_ffn", &softmoe::expert_ffn_cuda);
  m.impl("expert_ffn_backward", &softmoe::expert_ffn_backward_cuda);
}
