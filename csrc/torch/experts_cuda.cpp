// The expert compute ops on a GPU: today experts.h's compute with its row blocks in order on the
// current stream (cuBLAS products, deterministic for fixed shapes); the seam where a GPU grouped
// GEMM replaces them behind the same op names and schemas. Compiled in a CUDA build only.
#include <torch/library.h>

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

// A GPU's Schedule (experts.h): one set of buffers, the blocks in order on the current stream. A
// GPU pays a launch per product, so its backward takes chunks four times as long as the CPU's.
struct InOrder {
  static constexpr int backward_chunk_log2 = kDeviceBackwardChunkLog2;
  template <typename MakeScratch, typename Body>
  static void run(const std::vector<RowBlock> &blocks, MakeScratch make_scratch, Body body) {
    if (blocks.empty()) return;
    auto scratch = make_scratch();
    for (const RowBlock &block : blocks) body(block, scratch);
  }
};

}  // namespace
}  // namespace softmoe

TORCH_LIBRARY_IMPL(softmoe, CUDA, m) {
  m.impl("matmul", &softmoe::matmul_cuda);
  m.impl("grouped_mm", &softmoe::grouped_mm<softmoe::InOrder>);
  m.impl("grouped_mm_weight_grad", &softmoe::grouped_mm_weight_grad<softmoe::InOrder>);
  m.impl("expert_ffn", &softmoe::expert_ffn<softmoe::InOrder>);
  m.impl("expert_ffn_backward", &softmoe::expert_ffn_backward<softmoe::InOrder>);
}
