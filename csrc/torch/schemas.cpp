// The schemas of every softmoe op, in one place; the implementations register per dispatch key in
// topk.cpp, route.cpp, experts.cpp (CPU) and their *_cuda.cpp counterparts (CUDA, compiled in a
// CUDA build only). softmoe/ops.py adds the fake (meta) kernels and autograd.
#include <Python.h>

#include <torch/library.h>

// `import softmoe._C` loads this library, which runs the TORCH_LIBRARY registrations of its files.
extern "C" PyObject *PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

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
