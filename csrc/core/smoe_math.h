/* Scalar math shared by the C kernels and the CUDA kernels.
 *
 * Everything here is an inline function that nvcc compiles for host and device, so the CPU tests
 * exercise exactly the arithmetic the GPU runs. No allocation, no libc beyond <math.h>/<string.h>.
 */
#ifndef SMOE_MATH_H
#define SMOE_MATH_H

#include <float.h>
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

/* ---- branch-free building blocks for the per-row loops ---------------------------------------
 *
 * The row functions work in blocks of SMOE_LANES consecutive entries. A loop over the lanes of a
 * block has a fixed trip count and no branches, so the C compiler turns it into vector
 * instructions (any x86-64 or ARM baseline; wider ones in lapsum_avx2.c's build of the same code),
 * and on the GPU it is a short unrolled loop of one thread. Row sums are accumulated per lane and
 * the lanes added in one fixed tree, and a lane computes exactly what a scalar would (the same
 * operations; x86-64 builds have no fused multiply-add to contract into), so the bits never depend
 * on the vector width, the row's position in a chunk or the number of threads. */
#define SMOE_LANES 8

/* Marks a loop over the lanes of a block for the vectoriser (OpenMP's simd directive: the
 * extension is built with -fopenmp; elsewhere, and under nvcc, the loops are plain loops).
 * SMOE_SIMD_REDUCE names integer reductions (|, +), which are exact in any order; floating-point
 * row sums never go through a reduction clause but through per-lane arrays. */
#if defined(_OPENMP) && !defined(__CUDACC__)
#define SMOE_PRAGMA(x) _Pragma(#x)
#define SMOE_SIMD SMOE_PRAGMA(omp simd)
#define SMOE_SIMD_REDUCE(op, ...) SMOE_PRAGMA(omp simd reduction(op : __VA_ARGS__))
#else
#define SMOE_SIMD
#define SMOE_SIMD_REDUCE(op, ...)
#endif

/* x rounded up to a whole number of blocks. */
SMOE_HD int64_t smoe_pad_lanes(int64_t x) { return (x + SMOE_LANES - 1) / SMOE_LANES * SMOE_LANES; }

/* c ? a : b through bit masks. GCC keeps a float `?:` whose condition compares floats as a branch
 * under its default -ftrapping-math, which stops the vectoriser; and / or on the bits do not. */
SMOE_HD float smoe_where_f32(int c, float a, float b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  const uint32_t m = 0u - (uint32_t)(c != 0);
  return smoe_bits_to_float((smoe_float_to_bits(a) & m) | (smoe_float_to_bits(b) & ~m));
#endif
}

SMOE_HD double smoe_where_f64(int c, double a, double b) {
#if defined(__CUDA_ARCH__)
  return c ? a : b;
#else
  const uint64_t m = 0u - (uint64_t)(c != 0);
  uint64_t ua, ub;
  memcpy(&ua, &a, sizeof ua);
  memcpy(&ub, &b, sizeof ub);
  ua = (ua & m) | (ub & ~m);
  double r;
  memcpy(&r, &ua, sizeof r);
  return r;
#endif
}

/* exp(x) in float: a fixed polynomial, the same bits on every CPU (no libm, no FMA) and in a
 * vector lane as in a scalar. x = n ln2 + r with |r| <= ln2 / 2 (Cody-Waite, n ln2_hi exact), then
 * e^r = 1 + r + r^2 P(r) with P of degree 4 fitted for the least maximal relative error on that
 * interval, and 2^n applied in two exact halves so that results below FLT_MIN round once into the
 * subnormals. Error <= 0.99 ulp for every float in [-104, 88.7] (tests/c/test_lapsum.c checks a
 * sweep against the float64 exp); 0 below e^-104 (under half the smallest subnormal), +inf above
 * 88.73, NaN stays NaN. The only floats it meets are exp(-|x|) and exp(-gap) of the soft top-k. */
SMOE_HD float smoe_exp_f32(float x) {
  const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer, kept in the low bits */
  x = smoe_where_f32(x < -104.0f, -104.0f, x);
  x = smoe_where_f32(x > 89.0f, 89.0f, x);
  const float t = x * 1.44269504088896341f + magic;
  const int32_t n = (int32_t)(smoe_float_to_bits(t) - smoe_float_to_bits(magic)); /* round(x / ln2) */
  const float nf = t - magic;
  const float r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;
  const float y = (((0.001381432f * r + 0.008368852f) * r + 0.0416684f) * r + 0.1666652f) * r + 0.49999994f;
  const float p = (y * (r * r) + r) + 1.0f;
  const int32_t n1 = n / 2, n2 = n - n1; /* n in [-150, 129]: both halves are normal exponents */
  return (p * smoe_bits_to_float((uint32_t)(n1 + 127) << 23)) * smoe_bits_to_float((uint32_t)(n2 + 127) << 23);
}

SMOE_HD double smoe_exp_f64(double x) { return exp(x); }

SMOE_HD float smoe_lap_cdf_f32(float x) {
  const float h = 0.5f * smoe_exp_f32(-fabsf(x));
  return smoe_where_f32(x <= 0.0f, h, 1.0f - h);
}

SMOE_HD double smoe_lap_cdf_f64(double x) {
  double h = 0.5 * exp(-fabs(x));
  return x <= 0.0 ? h : 1.0 - h;
}

/* The index of the lowest set bit of a nonzero mask. */
SMOE_HD int smoe_low_bit(uint32_t mask) {
#if defined(__CUDA_ARCH__)
  return __ffs((int)mask) - 1;
#elif defined(__GNUC__)
  return __builtin_ctz(mask);
#else
  int l = 0;
  while (!((mask >> l) & 1u)) ++l;
  return l;
#endif
}

/* (value, index) as one unsigned key whose order is the candidate order of the soft top-k: larger
 * value first, lower index on equal values (-0 and +0 are equal: -0 is read as +0, which changes
 * no difference of scores). The high word maps the float bits to an unsigned integer of the same
 * order; the low word is the bitwise complement of the index. NaN gets some key (such rows are
 * rejected before their order matters). */
SMOE_HD uint64_t smoe_order_key_f32(float v, int32_t i) {
  const uint32_t u = smoe_float_to_bits(v + 0.0f);
  const uint32_t o = u ^ ((uint32_t)(0u - (u >> 31)) | 0x80000000u);
  return ((uint64_t)o << 32) | (uint32_t)~(uint32_t)i;
}

SMOE_HD float smoe_order_key_value_f32(uint64_t key) {
  const uint32_t o = (uint32_t)(key >> 32);
  return smoe_bits_to_float(o & 0x80000000u ? o ^ 0x80000000u : ~o);
}

SMOE_HD int32_t smoe_order_key_index(uint64_t key) { return (int32_t)~(uint32_t)key; }

/* The 19-comparator sorting network for 8 inputs (Knuth, TAOCP vol. 3, 5.3.4), as a list of
 * cx(i, j) steps, each putting the larger of slots i < j first: applied to order keys by
 * lapsum_select.h and to eight rows of scores at once by lapsum_rows8.h. */
#define SMOE_SORT8_NETWORK(cx)                          \
  cx(0, 2) cx(1, 3) cx(4, 6) cx(5, 7)                   \
  cx(0, 4) cx(1, 5) cx(2, 6) cx(3, 7)                   \
  cx(0, 1) cx(2, 3) cx(4, 5) cx(6, 7)                   \
  cx(2, 4) cx(3, 5)                                     \
  cx(1, 4) cx(3, 6)                                     \
  cx(1, 2) cx(3, 4) cx(5, 6)

/* The active count of a truncated row from its m sorted candidates (research/lapsum.md §6.4):
 * candidate j stays active iff the truncated count at the cut of j is below k, `below(j)`, which is
 * nondecreasing in j, so a galloping search (the active set is usually small) followed by bisection
 * finds the boundary; then at least floor(k) + 1 candidates (sum p = k needs more than k, rounding
 * must not break that), and a tie group kept whole (`tied(j)`: candidate j equals candidate j - 1;
 * tied candidates have one x, and cutting the group would give equal scores different p). Sets the
 * integer lvalue `active`. One definition for the per-row function and the eight-row lanes, so both
 * test the same counts in the same order. */
#define SMOE_ACTIVE_COUNT(m, k, below, tied, active)                                  \
  do {                                                                                \
    int64_t lo_ = 0, hi_ = 1; /* invariant: below(lo); below(m) is taken as false */  \
    while (hi_ < (m) && below(hi_)) lo_ = hi_, hi_ *= 2;                              \
    if (hi_ > (m)) hi_ = (m);                                                         \
    while (hi_ - lo_ > 1) {                                                           \
      const int64_t mid_ = lo_ + (hi_ - lo_) / 2;                                     \
      if (below(mid_))                                                                \
        lo_ = mid_;                                                                   \
      else                                                                            \
        hi_ = mid_;                                                                   \
    }                                                                                 \
    int64_t n_ = lo_ + 1;                                                             \
    const int64_t need_ = (int64_t)(k) + 1;                                           \
    if (n_ < need_) n_ = need_ < (m) ? need_ : (m);                                   \
    while (n_ < (m) && tied(n_)) ++n_;                                                \
    (active) = n_;                                                                    \
  } while (0)

/* The cut c of the left-truncated kernel for a given eps = F(-c); +inf for the plain kernel. */
SMOE_HD double smoe_cut_from_eps(double eps) { return eps > 0.0 ? -log(2.0 * eps) : INFINITY; }

#endif /* SMOE_MATH_H */
