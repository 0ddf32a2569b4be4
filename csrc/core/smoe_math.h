/* Scalar math shared by the C kernels and the CUDA kernels.
 *
 * Everything here is an inline function that nvcc compiles for host and device, so the CPU tests
 * exercise exactly the arithmetic the GPU runs. No allocation, no libc beyond <math.h>/<string.h>.
 */
#ifndef SMOE_MATH_H
#define SMOE_MATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "softmoe.h"

#if defined(__CUDACC__)
#define SMOE_HD __host__ __device__ __forceinline__
#elif defined(__cplusplus)
#define SMOE_HD inline
#else
#define SMOE_HD static inline
#endif

/* ---- bit casts ---------------------------------------------------------------------------- */

SMOE_HD float smoe_bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

SMOE_HD uint32_t smoe_float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

/* ---- 16-bit storage types (round to nearest even, NaN stays NaN) -------------------------- */

SMOE_HD float smoe_bf16_to_float(uint16_t h) { return smoe_bits_to_float((uint32_t)h << 16); }

SMOE_HD uint16_t smoe_float_to_bf16(float x) {
  uint32_t u = smoe_float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* quiet NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

SMOE_HD float smoe_f16_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t expo = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (expo == 0) {
    /* zero or subnormal: mant * 2^-24 is exact in float */
    float v = (float)mant * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  if (expo == 31) return smoe_bits_to_float(sign | 0x7f800000u | (mant << 13));
  return smoe_bits_to_float(sign | ((expo + 112u) << 23) | (mant << 13));
}

SMOE_HD uint16_t smoe_float_to_f16(float x) {
  uint32_t u = smoe_float_to_bits(x);
  uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);  /* NaN */
  if (u >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to or is beyond 65520: inf */
  if (u < 0x38800000u) {                                   /* below 2^-14: f16 subnormal or 0 */
    if (u < 0x33000000u) return sign;                      /* below 2^-25: rounds to 0 */
    uint32_t e = u >> 23;
    uint32_t m = (u & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126u - e; /* value / 2^-24 = m >> shift, shift in [14, 24] */
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) q++;
    return (uint16_t)(sign | q);
  }
  u += 0xfffu + ((u >> 13) & 1u);
  u -= 0x38000000u; /* rebias the exponent from 127 to 15 */
  return (uint16_t)(sign | (u >> 13));
}

/* ---- loads and stores of a storage dtype into the math type -------------------------------- */

SMOE_HD float smoe_load_f32(const void *base, smoe_dtype dtype, int64_t i) {
  switch (dtype) {
    case SMOE_BF16: return smoe_bf16_to_float(((const uint16_t *)base)[i]);
    case SMOE_F16: return smoe_f16_to_float(((const uint16_t *)base)[i]);
    case SMOE_F64: return (float)((const double *)base)[i];
    default: return ((const float *)base)[i];
  }
}

SMOE_HD void smoe_store_f32(void *base, smoe_dtype dtype, int64_t i, float v) {
  switch (dtype) {
    case SMOE_BF16: ((uint16_t *)base)[i] = smoe_float_to_bf16(v); break;
    case SMOE_F16: ((uint16_t *)base)[i] = smoe_float_to_f16(v); break;
    case SMOE_F64: ((double *)base)[i] = (double)v; break;
    default: ((float *)base)[i] = v; break;
  }
}

SMOE_HD double smoe_load_f64(const void *base, smoe_dtype dtype, int64_t i) {
  if (dtype == SMOE_F64) return ((const double *)base)[i];
  return (double)smoe_load_f32(base, dtype, i);
}

SMOE_HD void smoe_store_f64(void *base, smoe_dtype dtype, int64_t i, double v) {
  if (dtype == SMOE_F64)
    ((double *)base)[i] = v;
  else
    smoe_store_f32(base, dtype, i, (float)v);
}

/* ---- Laplace kernel, evaluated through exp(-|x|) only so nothing overflows ----------------- */

SMOE_HD float smoe_lap_cdf_f32(float x) {
  float h = 0.5f * expf(-fabsf(x));
  return x <= 0.0f ? h : 1.0f - h;
}

SMOE_HD double smoe_lap_cdf_f64(double x) {
  double h = 0.5 * exp(-fabs(x));
  return x <= 0.0 ? h : 1.0 - h;
}

/* The cut c of the left-truncated kernel for a given eps = F(-c); +inf for the plain kernel. */
SMOE_HD double smoe_cut_from_eps(double eps) { return eps > 0.0 ? -log(2.0 * eps) : INFINITY; }

#endif /* SMOE_MATH_H */
