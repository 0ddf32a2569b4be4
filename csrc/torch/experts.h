// The expert compute ops (grouped_mm, grouped_mm_weight_grad, expert_ffn, expert_ffn_backward; and
// matmul, the router's product): the argument checks shared by the CPU (experts.cpp) and CUDA
// (experts_cuda.cpp) implementations, and the CPU's compute.
//
// Rows offsets[e]:offsets[e+1] of x belong to expert e; rows from offsets[E] on are padding. On the
// CPU the ops read the segment bounds on the host (free there), cut the segments into row blocks by
// the shapes and the bounds alone, and hand each block's products to BLAS; a GPU never reads them
// on the host (experts_cuda.cpp: grouped kernels, a fixed number of launches). Being ops, they keep
// torch.compile graphs whole. How the blocks run is a Schedule, a type with
//   static void run(std::vector<RowBlock> blocks, MakeScratch make_scratch, Body body)
//       calls body(block, scratch) for every block, scratch = make_scratch() once per thread;
//   static constexpr int backward_chunk_log2
//       the backward's chunks hold about 2^backward_chunk_log2 elements of the widest buffer.
// The CPU runs the blocks side by side on torch's threads (cpu_runtime.h).
//
// expert_ffn fuses both matmuls and the activation: the same math as grouped_mm -> activation ->
// grouped_mm, but the activation and, in the backward, the activation's gradient only ever exist for
// one chunk of rows at a time, in buffers reused across chunks and experts. Only the pre-activation
// `hidden` [P, W] is kept for the backward (the activation is recomputed from it per chunk, an
// elementwise pass). Unfused, a step allocates about six [P, d_hidden]-sized temporaries plus a
// concatenation; on the CPU each of those is a fresh mmap that page-faults again every step (glibc
// returns blocks above 32 MB to the OS on free), which made the layer slower than a per-expert
// Python loop whose tensors are small. The forward's blocks are its chunks, the backward's those of
// weight_grad_blocks.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "cpu_runtime.h"

namespace softmoe {

// Rows [begin, begin + len) of expert `expert`'s segment; in a weight gradient, `slot` says where the
// block's gradients go: 0 straight into grad_w[expert], s > 0 into partial sum s - 1, added to
// grad_w[expert] after all blocks in slot order.
struct RowBlock {
  int64_t expert, begin, len, slot;
};

enum class Activation { swiglu, gelu };

struct FfnShape {
  int64_t experts, rows, d_in, width, d_hidden, d_out;
};

// ---- argument checks (experts.cpp) ----------------------------------------------------------------

// a @ b of two 2-D floating tensors of one dtype and device.
void check_matmul(const at::Tensor &a, const at::Tensor &b);
// offsets: int64 of shape [experts + 1] (its values are not read).
void check_offsets(const at::Tensor &offsets, int64_t experts, const char *op);
// The segment bounds offsets [experts + 1] on the host, checked: 0, nondecreasing, at most `rows`.
std::vector<int64_t> segment_bounds(const at::Tensor &offsets, int64_t experts, int64_t rows, const char *op);
void check_grouped_operands(const at::Tensor &x, const at::Tensor &w, const at::Tensor &offsets, const char *op);
void check_weight_grad_operands(const at::Tensor &x, const at::Tensor &grad_y, const at::Tensor &offsets,
                                int64_t experts);
Activation parse_activation(c10::string_view name, const char *op);
FfnShape check_ffn_operands(const at::Tensor &x, const at::Tensor &w_in, const at::Tensor &w_out,
                            const at::Tensor &offsets, Activation act, const char *op);
void check_ffn_backward_operands(const at::Tensor &grad_y, const at::Tensor &x, const at::Tensor &hidden,
                                 const FfnShape &s, const char *op);

// ---- row blocks (experts.cpp) ----------------------------------------------------------------------

// Rows per chunk: about 2^21 elements of the widest buffer ([chunk, W]), 8 MB in float32 per thread,
// which bounds the peak memory the buffers add.
constexpr int kChunkLog2 = 21;
int64_t ffn_chunk_rows(int64_t width, int elements_log2 = kChunkLog2);
// Every segment in chunks of `chunk` rows (the last one of a segment shorter).
std::vector<RowBlock> chunk_blocks(const std::vector<int64_t> &bounds, int64_t chunk);
// The blocks of a weight gradient and, in *slots, how many partial sums they need (experts.cpp).
std::vector<RowBlock> weight_grad_blocks(const std::vector<int64_t> &bounds, int64_t experts, int64_t chunk,
                                         int64_t *slots);
// Adds each block's partial sum (slot > 0) to its expert's gradient, in block order (in float32 for
// bf16 / f16 gradients), and zeroes the gradients of experts without rows.
void finish_weight_grad(at::Tensor &grad_w, const at::Tensor &partial, const std::vector<RowBlock> &blocks,
                        const std::vector<int64_t> &bounds);
// out[c, d_hidden] = activation(h[c, W]).
void activate_out(at::Tensor &out, const at::Tensor &h, Activation act, int64_t d_hidden);

// ---- the compute, for a device's Schedule ----------------------------------------------------------

// y[P, N] with y[seg_e] = x[seg_e] @ w[e]; padding rows are zero.
template <typename Schedule>
at::Tensor grouped_mm(const at::Tensor &x, const at::Tensor &w, const at::Tensor &offsets) {
  check_grouped_operands(x, w, offsets, "grouped_mm");
  const int64_t experts = w.size(0), rows = x.size(0);
  const auto bounds = segment_bounds(offsets, experts, rows, "grouped_mm");
  at::Tensor y = empty_activation({rows, w.size(2)}, x.options());
  Schedule::run(chunk_blocks(bounds, ffn_chunk_rows(w.size(2))), [] { return 0; }, [&](const RowBlock &block, int) {
    at::Tensor out = y.narrow(0, block.begin, block.len);
    at::mm_out(out, x.narrow(0, block.begin, block.len), w.select(0, block.expert));
  });
  y.narrow(0, bounds[experts], rows - bounds[experts]).zero_();
  return y;
}

// grad_w[E, K, N] with grad_w[e] = x[seg_e]^T @ grad_y[seg_e]; zero for empty segments.
template <typename Schedule>
at::Tensor grouped_mm_weight_grad(const at::Tensor &x, const at::Tensor &grad_y, const at::Tensor &offsets,
                                  int64_t experts) {
  check_weight_grad_operands(x, grad_y, offsets, experts);
  const auto bounds = segment_bounds(offsets, experts, x.size(0), "grouped_mm_weight_grad");
  at::Tensor grad_w = at::empty({experts, x.size(1), grad_y.size(1)}, x.options());
  int64_t slots = 0;
  const auto blocks = weight_grad_blocks(bounds, experts, ffn_chunk_rows(grad_y.size(1)), &slots);
  at::Tensor partial = at::empty({slots, x.size(1), grad_y.size(1)}, x.options());
  Schedule::run(blocks, [] { return 0; }, [&](const RowBlock &block, int) {
    at::Tensor out = block.slot == 0 ? grad_w.select(0, block.expert) : partial.select(0, block.slot - 1);
    at::mm_out(out, x.narrow(0, block.begin, block.len).t(), grad_y.narrow(0, block.begin, block.len));
  });
  finish_weight_grad(grad_w, partial, blocks, bounds);
  return grad_w;
}

// Returns y [P, d_out] (zeros on padding rows) and, with keep_hidden, hidden = x @ w_in per segment
// [P, W] for the backward (else an empty [0, W]).
template <typename Schedule>
std::tuple<at::Tensor, at::Tensor> expert_ffn(const at::Tensor &x, const at::Tensor &w_in, const at::Tensor &w_out,
                                              const at::Tensor &offsets, c10::string_view activation,
                                              bool keep_hidden) {
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
  Schedule::run(
      blocks,
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
template <typename Schedule>
std::tuple<at::Tensor, at::Tensor, at::Tensor> expert_ffn_backward(
    const at::Tensor &grad_y_in, const at::Tensor &x, const at::Tensor &hidden, const at::Tensor &w_in,
    const at::Tensor &w_out, const at::Tensor &offsets, c10::string_view activation, std::array<bool, 3> output_mask) {
  const char *op = "expert_ffn_backward";
  const Activation act = parse_activation(activation, op);
  const FfnShape s = check_ffn_operands(x, w_in, w_out, offsets, act, op);
  check_ffn_backward_operands(grad_y_in, x, hidden, s, op);
  const auto bounds = segment_bounds(offsets, s.experts, s.rows, op);
  const bool want_x = output_mask[0], want_w_in = output_mask[1], want_w_out = output_mask[2];
  const at::Tensor grad_y = grad_y_in.contiguous();
  // The weight gradients are sums over chunks and blocks: for bf16 / f16 weights they are summed in
  // float32 (a running sum rounded to an 8-bit mantissa after every chunk would lose a share of the
  // later chunks) and rounded once at the end. Each chunk's product is computed in the weights' dtype
  // (BLAS accumulates it in float32) into a per-thread buffer and added.
  const at::TensorOptions sum_options = x.options().dtype(at::toOpMathType(x.scalar_type()));
  const bool reduced = sum_options.dtype() != x.options().dtype();
  at::Tensor grad_x = empty_activation({want_x ? s.rows : 0, s.d_in}, x.options());
  at::Tensor grad_w_in = empty_activation(want_w_in ? w_in.sizes() : at::IntArrayRef{0}, sum_options);
  at::Tensor grad_w_out = empty_activation(want_w_out ? w_out.sizes() : at::IntArrayRef{0}, sum_options);
  const int64_t chunk = ffn_chunk_rows(s.width, Schedule::backward_chunk_log2);
  int64_t slots = 0;
  const std::vector<RowBlock> blocks = weight_grad_blocks(bounds, s.experts, chunk, &slots);
  at::Tensor partial_w_in = want_w_in ? at::empty({slots, s.d_in, s.width}, sum_options) : at::Tensor();
  at::Tensor partial_w_out = want_w_out ? at::empty({slots, s.d_hidden, s.d_out}, sum_options) : at::Tensor();
  const int64_t buffer_rows = std::min(chunk, s.rows);
  const bool swiglu = act == Activation::swiglu;
  // swiglu: silu = silu(gate), a = silu * up, t = grad_a * up; gelu: a = gelu(h);
  // product_w_in / product_w_out: one chunk's weight-gradient product (bf16 / f16 only)
  struct Scratch {
    at::Tensor a, silu, t, grad_a, grad_h, product_w_in, product_w_out;
  };
  // out = a @ b, or out += a @ b
  auto mm_into = [reduced](at::Tensor &out, const at::Tensor &a, const at::Tensor &b, bool accumulate,
                           at::Tensor &product) {
    if (reduced) {
      at::mm_out(product, a, b);
      if (accumulate) out.add_(product);
      else out.copy_(product);
    } else if (accumulate) {
      out.addmm_(a, b);
    } else {
      at::mm_out(out, a, b);
    }
  };
  Schedule::run(
      blocks,
      [&] {
        auto rows = [&](int64_t cols) { return empty_activation({buffer_rows, cols}, x.options()); };
        auto product = [&](bool want, int64_t r, int64_t c) {
          return reduced && want ? at::empty({r, c}, x.options()) : at::Tensor();
        };
        return Scratch{rows(s.d_hidden),
                       swiglu ? rows(s.d_hidden) : at::Tensor(),
                       swiglu ? rows(s.d_hidden) : at::Tensor(),
                       rows(s.d_hidden),
                       rows(s.width),
                       product(want_w_in, s.d_in, s.width),
                       product(want_w_out, s.d_hidden, s.d_out)};
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
          if (want_w_out) mm_into(gwo, a.t(), gy, !first, scratch.product_w_out);
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
          if (want_w_in) mm_into(gwi, x.narrow(0, r, len).t(), gh, !first, scratch.product_w_in);
          if (want_x) {
            at::Tensor gx = grad_x.narrow(0, r, len);
            at::mm_out(gx, gh, wi.t());
          }
        }
      });
  if (want_w_in) finish_weight_grad(grad_w_in, partial_w_in, blocks, bounds);
  if (want_w_out) finish_weight_grad(grad_w_out, partial_w_out, blocks, bounds);
  if (want_x) grad_x.narrow(0, bounds[s.experts], s.rows - bounds[s.experts]).zero_();
  return {grad_x, grad_w_in.to(x.scalar_type()), grad_w_out.to(x.scalar_type())};
}

}  // namespace softmoe
