// The expert compute ops on the CPU, and the argument checks and row blocks they share with
// experts_cuda.cpp (the CPU's compute is experts.h's, run side by side on torch's threads).
#include "experts.h"

#include <torch/library.h>

#include <string>

#include "common.h"

namespace softmoe {

// ---- argument checks ----------------------------------------------------------------------------

void check_matmul(const at::Tensor &a, const at::Tensor &b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "softmoe: matmul: a and b must be 2-D, got shapes ", a.sizes(), " and ",
              b.sizes());
  TORCH_CHECK(a.size(1) == b.size(0), "softmoe: matmul: a has ", a.size(1), " columns but b has ", b.size(0), " rows");
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "softmoe: matmul: a and b must have one dtype, got ",
                   a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(a.scalar_type()), "softmoe: matmul: a and b must be floating point, got ",
                   a.scalar_type());
  TORCH_CHECK(a.device() == b.device(), "softmoe: matmul: a and b must be on one device");
}

void check_offsets(const at::Tensor &offsets, int64_t experts, const char *op) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.size(0) == experts + 1,
              "softmoe: ", op, ": offsets must be int64 of shape [", experts + 1, "] (experts + 1), got ",
              offsets.scalar_type(), " of shape ", offsets.sizes());
}

std::vector<int64_t> segment_bounds(const at::Tensor &offsets, int64_t experts, int64_t rows, const char *op) {
  check_offsets(offsets, experts, op);
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

void check_weight_grad_operands(const at::Tensor &x, const at::Tensor &grad_y, const at::Tensor &offsets,
                                int64_t experts) {
  TORCH_CHECK(x.dim() == 2 && grad_y.dim() == 2 && x.size(0) == grad_y.size(0),
              "softmoe: grouped_mm_weight_grad: x and grad_y must be 2-D with one row count, got ", x.sizes(),
              " and ", grad_y.sizes());
  TORCH_CHECK(experts >= 1, "softmoe: grouped_mm_weight_grad: experts must be >= 1, got ", experts);
  check_same_device("grouped_mm_weight_grad", grad_y, "grad_y", x, "x");
  check_same_device("grouped_mm_weight_grad", offsets, "offsets", x, "x");
}

Activation parse_activation(c10::string_view name, const char *op) {
  if (name == "swiglu") return Activation::swiglu;
  if (name == "gelu") return Activation::gelu;
  TORCH_CHECK(false, "softmoe: ", op, ": activation must be 'swiglu' or 'gelu', got '", std::string(name), "'");
}

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

void check_ffn_backward_operands(const at::Tensor &grad_y, const at::Tensor &x, const at::Tensor &hidden,
                                 const FfnShape &s, const char *op) {
  TORCH_CHECK(grad_y.dim() == 2 && grad_y.size(0) == s.rows && grad_y.size(1) == s.d_out, "softmoe: ", op,
              ": grad_y must be [", s.rows, ", ", s.d_out, "], got shape ", grad_y.sizes());
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == s.rows && hidden.size(1) == s.width, "softmoe: ", op,
              ": hidden must be [", s.rows, ", ", s.width, "] (expert_ffn with keep_hidden=True), got shape ",
              hidden.sizes());
  TORCH_CHECK_TYPE(grad_y.scalar_type() == x.scalar_type() && hidden.scalar_type() == x.scalar_type(), "softmoe: ",
                   op, ": grad_y and hidden must have x's dtype ", x.scalar_type());
  check_same_device(op, grad_y, "grad_y", x, "x");
  check_same_device(op, hidden, "hidden", x, "x");
}

// ---- row blocks -----------------------------------------------------------------------------------

int64_t ffn_chunk_rows(int64_t width, int elements_log2) {
  return std::max<int64_t>(16, (int64_t{1} << elements_log2) / std::max<int64_t>(width, 1));
}

std::vector<RowBlock> chunk_blocks(const std::vector<int64_t> &bounds, int64_t chunk) {
  std::vector<RowBlock> blocks;
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(bounds.size()); ++e)
    for (int64_t r = bounds[e]; r < bounds[e + 1]; r += chunk) blocks.push_back({e, r, std::min(chunk, bounds[e + 1] - r), 0});
  return blocks;
}

// An expert's segment is one block, unless it holds at least two shares of the work (a share: 1 /
// kTargetBlocks of all routed rows, at least one chunk); then it is cut into that many blocks of
// about equal length (at most kMaxBlocksPerExpert), so that an overloaded expert does not leave the
// other threads idle. Each block accumulates its chunks' weight gradients in order; blocks after an
// expert's first write into partial sums (slots, one weight-sized buffer each) that are added in
// block order at the end. Balanced routing needs no slots: the experts themselves are the blocks.
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

void finish_weight_grad(at::Tensor &grad_w, const at::Tensor &partial, const std::vector<RowBlock> &blocks,
                        const std::vector<int64_t> &bounds) {
  // An expert's blocks are consecutive, its slot-0 block first. bf16 / f16 sums go through float32:
  // each addition rounded to an 8-bit mantissa would lose a share of the later blocks.
  const at::ScalarType sum_type = at::toOpMathType(grad_w.scalar_type());
  for (size_t i = 0; i < blocks.size();) {
    size_t end = i + 1;
    while (end < blocks.size() && blocks[end].expert == blocks[i].expert) ++end;
    if (end - i > 1) {
      at::Tensor g = grad_w.select(0, blocks[i].expert);
      at::Tensor sum = sum_type == g.scalar_type() ? g : g.to(sum_type);
      for (size_t j = i + 1; j < end; ++j) sum.add_(partial.select(0, blocks[j].slot - 1));
      if (!sum.is_same(g)) g.copy_(sum);
    }
    i = end;
  }
  for (int64_t e = 0; e + 1 < static_cast<int64_t>(bounds.size()); ++e)
    if (bounds[e + 1] == bounds[e]) grad_w.select(0, e).zero_();
}

void activate_out(at::Tensor &out, const at::Tensor &h, Activation act, int64_t d_hidden) {
  if (act == Activation::swiglu) {
    at::silu_out(out, h.narrow(1, 0, d_hidden));
    out.mul_(h.narrow(1, d_hidden, d_hidden));
  } else {
    at::gelu_out(out, h);
  }
}

namespace {

// ---- the router's product, bit-identical for any thread count -----------------------------------
//
// How a lone product is cut (cpu_runtime.h, SingleThreadedBlas, says why). Every piece repacks its
// operands for BLAS, so pieces are large: output tiles of 512 x 512, halved (rows first, to 128 x 256
// at least) only while the product has fewer than 4 of them, and the reduction split into blocks of
// at least 512 only when that still leaves fewer than 4 pieces (the router's [E, d] gradient).
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

// out = a @ b (a [M, K], b [K, N], out [M, N], any BLAS-compatible strides) in pieces cut by the
// shapes alone, each one single-threaded BLAS call, spread over torch's threads.
void reproducible_mm_out(at::Tensor &out, const at::Tensor &a, const at::Tensor &b) {
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

at::Tensor matmul_cpu(const at::Tensor &a, const at::Tensor &b) {
  check_matmul(a, b);
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  reproducible_mm_out(out, a, b);
  return out;
}

// The CPU's Schedule (experts.h): blocks side by side on torch's threads, each single-threaded.
struct SideBySide {
  static constexpr int backward_chunk_log2 = kChunkLog2;
  template <typename MakeScratch, typename Body>
  static void run(std::vector<RowBlock> blocks, MakeScratch make_scratch, Body body) {
    run_blocks_side_by_side(std::move(blocks), make_scratch, body);
  }
};

}  // namespace
}  // namespace softmoe

TORCH_LIBRARY_IMPL(softmoe, CPU, m) {
  m.impl("matmul", &softmoe::matmul_cpu);
  m.impl("grouped_mm", &softmoe::grouped_mm<softmoe::SideBySide>);
  m.impl("grouped_mm_weight_grad", &softmoe::grouped_mm_weight_grad<softmoe::SideBySide>);
  m.impl("expert_ffn", &softmoe::expert_ffn<softmoe::SideBySide>);
  m.impl("expert_ffn_backward", &softmoe::expert_ffn_backward<softmoe::SideBySide>);
}
