// What every op family of the torch binding shares: the C API's dtype of a tensor, the math type,
// errors for the C core's statuses, and a device check. The binding (csrc/torch) is the only code
// that includes torch: checks, allocation, the dtype switch, the CPU thread pool or the CUDA
// stream, and calls into the C core (csrc/core) or the CUDA launchers (csrc/cuda).
#pragma once

#include <ATen/ATen.h>

#include "core/softmoe.h"

namespace softmoe {

// The storage dtype of t for the C API; TypeError naming `name` for any other dtype.
smoe_dtype to_smoe_dtype(const at::Tensor &t, const char *name);

// float64 for float64 scores, float32 for the 32- and 16-bit types (the C core's math type).
at::ScalarType math_type(const at::Tensor &scores);

// Raises "softmoe: <what>: <smoe_status_string(status)>" for a status other than SMOE_OK.
void check_status(smoe_status status, const char *what);

// check_status for the ops that read a plan's indices, whose CPU entry points report an index out
// of range as SMOE_ERR_ARG (the binding has checked everything else): that error names `indices`.
void check_index_status(smoe_status status, const char *op, const char *indices);

// RuntimeError "softmoe: <op>: <name> must be on the device of <ref_name> (...)".
void check_same_device(const char *op, const at::Tensor &t, const char *name, const at::Tensor &ref,
                       const char *ref_name);

}  // namespace softmoe
