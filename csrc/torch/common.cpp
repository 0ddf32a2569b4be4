#include "common.h"

namespace softmoe {

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

void check_status(smoe_status status, const char *what) {
  TORCH_CHECK(status == SMOE_OK, "softmoe: ", what, ": ", smoe_status_string(status));
}

void check_index_status(smoe_status status, const char *op, const char *indices) {
  TORCH_CHECK(status != SMOE_ERR_ARG, "softmoe: ", op, ": ", indices,
              " hold an index out of range; pass the tensors of one dispatch_plan (", smoe_status_string(status), ")");
  check_status(status, op);
}

void check_same_device(const char *op, const at::Tensor &t, const char *name, const at::Tensor &ref,
                       const char *ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "softmoe: ", op, ": ", name, " must be on the device of ", ref_name, " (",
              ref.device(), "), got ", t.device());
}

}  // namespace softmoe
