/* Storage dtypes and the math type: which dtypes are valid, their sizes, and the one macro
 * vocabulary for code that is generic over the math type.
 *
 * The math type is float for f32, bf16 and f16 storage and double for f64. A generic file
 * (lapsum_row.h, route_row.h) is included once per math type with SMOE_SUFFIX defined as f32 or
 * f64; inside it
 *   SMOE_FN(name)       the variant name_f32 / name_f64 (of a function it defines or calls);
 *   SMOE_REAL           the math type;
 *   SMOE_IS_F64         1 for f64, 0 for f32 (usable in #if);
 *   SMOE_LOAD(base, dtype, i) / SMOE_STORE(base, dtype, i, v)   storage <-> math type;
 *   SMOE_EXP, SMOE_LOG, SMOE_SQRT, SMOE_FABS, SMOE_NEXTAFTER      <math.h> for the math type;
 *   SMOE_RMAX           the largest finite value of the math type.
 * Every macro expands SMOE_SUFFIX where it is used, so the vocabulary is defined once, here, and a
 * generic file neither defines nor undefines any of it.
 */
#ifndef SMOE_DTYPE_H
#define SMOE_DTYPE_H

#include "smoe_math.h"

/* Whether d is one of the four storage dtypes of softmoe.h. */
SMOE_HD int smoe_valid_dtype(smoe_dtype d) {
  return d == SMOE_F32 || d == SMOE_F64 || d == SMOE_BF16 || d == SMOE_F16;
}

/* Bytes of one element of a storage dtype. */
SMOE_HD size_t smoe_dtype_size(smoe_dtype dtype) {
  return dtype == SMOE_F64 ? 8u : (dtype == SMOE_F32 ? 4u : 2u);
}

/* Bytes of one value of the math type of a storage dtype. */
SMOE_HD size_t smoe_real_size(smoe_dtype dtype) { return dtype == SMOE_F64 ? sizeof(double) : sizeof(float); }

/* ---- the generic vocabulary ------------------------------------------------------------------ */

#define SMOE_CAT2(a, b) a##_##b
#define SMOE_CAT(a, b) SMOE_CAT2(a, b)
#define SMOE_FN(name) SMOE_CAT(name, SMOE_SUFFIX)

typedef float smoe_real_f32;
typedef double smoe_real_f64;
#define SMOE_REAL SMOE_FN(smoe_real)

#define SMOE_LOAD SMOE_FN(smoe_load)
#define SMOE_STORE SMOE_FN(smoe_store)

/* Per-suffix tables behind the names above. */
#define SMOE_GEN_F64_f32 0
#define SMOE_GEN_F64_f64 1
#define SMOE_GEN_MATH_f32(fn) fn##f
#define SMOE_GEN_MATH_f64(fn) fn
#define SMOE_GEN_MAX_f32 3.40282347e38f
#define SMOE_GEN_MAX_f64 1.7976931348623157e308

#define SMOE_IS_F64 SMOE_FN(SMOE_GEN_F64)
#define SMOE_MATH(fn) SMOE_FN(SMOE_GEN_MATH)(fn)
#define SMOE_EXP SMOE_MATH(exp)
#define SMOE_LOG SMOE_MATH(log)
#define SMOE_SQRT SMOE_MATH(sqrt)
#define SMOE_FABS SMOE_MATH(fabs)
#define SMOE_NEXTAFTER SMOE_MATH(nextafter)
#define SMOE_RMAX SMOE_FN(SMOE_GEN_MAX)

#endif /* SMOE_DTYPE_H */
