/* Status codes as text, for the error messages of the callers (the torch binding). */
#include "softmoe.h"

const char *smoe_status_string(smoe_status status) {
  switch (status) {
    case SMOE_OK: return "ok";
    case SMOE_ERR_ARG: return "invalid argument: a size, index, pointer or option out of its documented range";
    case SMOE_ERR_ALLOC: return "out of memory for scratch";
    case SMOE_ERR_DEVICE: return "CUDA launch or runtime error";
  }
  return "unknown status";
}
