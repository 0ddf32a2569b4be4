/* Per-token (and per-element) functions of the truncated dispatch, shared by the C kernels
 * (route.c) and the CUDA kernels (cuda/route.cu).
 *
 * Two parts. The first (include-guarded) part does not depend on the math type: expert selection
 * and bit copies. The second part is generic over the math type: include this file with
 * SMOE_SUFFIX defined as f32 or f64 to get smoe_route_*_f32 / smoe_route_*_f64 (route.c and
 * route.cu include it once per type; without SMOE_SUFFIX only the first part is defined).
 *
 * Arithmetic contract, identical on CPU and GPU (up to the GPU's fused multiply-add):
 *   combine   y[t, f] = 0, then y[t, f] += w_j * ys[s_j, f] for j = 0..M-1 (skipping padding);
 *   grad_ys   grad_ys[s, f] = w * grad_y[t, f] (one rounding: bit-identical everywhere);
 *   dot       <a, b> over d features: 32 lanes, lane l sums a[f] * b[f] over f = l, l + 32, ...
 *             in increasing f; then lane[l] += lane[l + w] for w = 16, 8, 4, 2, 1 (exactly the
 *             warp shuffle-down tree, so a warp per dot reproduces it); the result is lane 0.
 * The row functions used by the CPU hoist the storage-dtype switch out of the feature loops so
 * that they vectorise; they perform, per output element, the same operations in the same order
 * as the element functions the GPU runs (tests/c/test_route.c checks the two bit for bit).
 */
#ifndef SMOE_ROUTE_ROW_H
#define SMOE_ROUTE_ROW_H

#include "smoe_dtype.h"

/* Lanes of the fixed-order dot product (one warp on the GPU). */
#define SMOE_ROUTE_LANES 32

/* Selects token t's experts: the first M entries of row t of p [T, E] that are != 0 (NaN counts,
 * -0.0 does not), in expert order. Writes them to out[0..M), -1 after the last, returns how many.
 * The test is made in double so that no nonzero f64 weight is flushed to zero. */
SMOE_HD int64_t smoe_route_select(const void *p, smoe_dtype dtype, int64_t E, int64_t M, int64_t t, int64_t *out) {
  int64_t m = 0;
  const int64_t base = t * E;
  for (int64_t e = 0; e < E && m < M; ++e)
    if (smoe_load_f64(p, dtype, base + e) != 0.0) out[m++] = e;
  for (int64_t j = m; j < M; ++j) out[j] = -1;
  return m;
}

/* The GPU plan's per-thread steps (one thread per (chunk of tokens, expert)); te [T, M] holds
 * every token's smoe_route_select output.
 * Whether expert e is one of token t's routed experts: active, and within the first M actives (te's
 * row ascends; when it is full its last entry is the last routed expert). O(1). */
SMOE_HD int smoe_route_is_routed(const smoe_plan_args *a, const int64_t *te, int64_t t, int64_t e) {
  if (!(smoe_load_f64(a->p, a->dtype, t * a->experts + e) != 0.0)) return 0;
  const int64_t last = te[t * a->max_active + a->max_active - 1];
  return last < 0 || e <= last;
}

/* How many of the tokens [t0, t1) are routed to expert e. */
SMOE_HD int64_t smoe_route_count_chunk(const smoe_plan_args *a, const int64_t *te, int64_t t0, int64_t t1,
                                       int64_t e) {
  int64_t n = 0;
  for (int64_t t = t0; t < t1; ++t) n += smoe_route_is_routed(a, te, t, e);
  return n;
}

/* Places the pairs (t, e) of the tokens [t0, t1) routed to e at the slots s, s + 1, ... in token
 * order: pair_token, pair_expert and the matching entry of token_pairs. */
SMOE_HD void smoe_route_place_chunk(const smoe_plan_args *a, const int64_t *te, int64_t t0, int64_t t1, int64_t e,
                                   int64_t s) {
  const int64_t M = a->max_active;
  for (int64_t t = t0; t < t1; ++t) {
    if (!smoe_route_is_routed(a, te, t, e)) continue;
    a->pair_token[s] = t;
    a->pair_expert[s] = e;
    for (int64_t j = 0; j < M; ++j)
      if (te[t * M + j] == e) a->token_pairs[t * M + j] = s;
    ++s;
  }
}

/* dst[di] = src[si] as a bit copy (NaN payloads and -0.0 survive). */
SMOE_HD void smoe_route_copy(void *dst, int64_t di, const void *src, int64_t si, smoe_dtype dtype) {
  switch (dtype) {
    case SMOE_F64: ((uint64_t *)dst)[di] = ((const uint64_t *)src)[si]; break;
    case SMOE_F32: ((uint32_t *)dst)[di] = ((const uint32_t *)src)[si]; break;
    default: ((uint16_t *)dst)[di] = ((const uint16_t *)src)[si]; break;
  }
}

/* dst[di] = +0 (all-zero bits, +0.0 in every storage dtype). */
SMOE_HD void smoe_route_zero(void *dst, int64_t di, smoe_dtype dtype) {
  switch (dtype) {
    case SMOE_F64: ((uint64_t *)dst)[di] = 0u; break;
    case SMOE_F32: ((uint32_t *)dst)[di] = 0u; break;
    default: ((uint16_t *)dst)[di] = 0u; break;
  }
}

/* Conversions used by the hoisted loops below; they match smoe_load_* / smoe_store_* exactly. */
#define SMOE_ROUTE_LD_ID(q) (q)
#define SMOE_ROUTE_ST_F32(v) ((float)(v))
#define SMOE_ROUTE_ST_F64(v) ((double)(v))
#define SMOE_ROUTE_ST_BF16(v) smoe_float_to_bf16((float)(v))
#define SMOE_ROUTE_ST_F16(v) smoe_float_to_f16((float)(v))

/* Expands BODY(storage type, load conversion, store conversion) for the storage dtype dt. */
#define SMOE_ROUTE_DISPATCH(dt, BODY)                                  \
  switch (dt) {                                                        \
    case SMOE_F64: BODY(double, SMOE_ROUTE_LD_ID, SMOE_ROUTE_ST_F64) break;        \
    case SMOE_BF16: BODY(uint16_t, smoe_bf16_to_float, SMOE_ROUTE_ST_BF16) break;  \
    case SMOE_F16: BODY(uint16_t, smoe_f16_to_float, SMOE_ROUTE_ST_F16) break;     \
    default: BODY(float, SMOE_ROUTE_LD_ID, SMOE_ROUTE_ST_F32) break;               \
  }

#endif /* SMOE_ROUTE_ROW_H */

/* ---- generic over the math type ------------------------------------------------------------ */
#ifdef SMOE_SUFFIX

/* The weight of slot s for token t: p[t, pair_expert[s]], or 1 without p.
 * Returns 1 for a routed slot, 0 for padding (s = -1), -1 for an index out of range. */
SMOE_HD int SMOE_FN(smoe_route_weight)(const smoe_combine_args *a, int64_t t, int64_t s, SMOE_REAL *w) {
  if (s == -1) return 0;
  if (s < 0 || s >= a->slots) return -1;
  if (!a->p) {
    *w = (SMOE_REAL)1;
    return 1;
  }
  const int64_t e = a->pair_expert[s];
  if (e < 0 || e >= a->experts) return -1;
  *w = SMOE_LOAD(a->p, a->p_dtype, t * a->experts + e);
  return 1;
}

/* ---- element functions (one GPU thread per output element) ---- */

/* y[t, f] of combine. Sets *bad when an index was out of range (that pair is skipped). */
SMOE_HD SMOE_REAL SMOE_FN(smoe_route_combine_elem)(const smoe_combine_args *a, int64_t t, int64_t f, int *bad) {
  SMOE_REAL acc = 0;
  for (int64_t j = 0; j < a->max_active; ++j) {
    const int64_t s = a->token_pairs[t * a->max_active + j];
    SMOE_REAL w = 0;
    const int ok = SMOE_FN(smoe_route_weight)(a, t, s, &w);
    if (ok < 0) *bad = 1;
    if (ok <= 0) continue;
    acc += w * SMOE_LOAD(a->ys, a->ys_dtype, s * a->d + f);
  }
  return acc;
}

/* dst[di] = w * src[si] in the math type, rounded once to the storage dtype (grad_ys). */
SMOE_HD void SMOE_FN(smoe_route_scale_elem)(void *dst, int64_t di, SMOE_REAL w, const void *src, int64_t si,
                                            smoe_dtype dtype) {
  SMOE_STORE(dst, dtype, di, w * SMOE_LOAD(src, dtype, si));
}

/* Lane `lane` of the dot product of a[aoff .. aoff + d) and b[boff .. boff + d) (same dtype). */
SMOE_HD SMOE_REAL SMOE_FN(smoe_route_dot_lane)(const void *a, const void *b, smoe_dtype dtype, int64_t aoff,
                                             int64_t boff, int64_t d, int64_t lane) {
  SMOE_REAL acc = 0;
  for (int64_t f = lane; f < d; f += SMOE_ROUTE_LANES)
    acc += SMOE_LOAD(a, dtype, aoff + f) * SMOE_LOAD(b, dtype, boff + f);
  return acc;
}

/* ---- row functions (the CPU; one call per token or slot) ---- */

/* The whole dot product (see the contract at the top of the file). */
SMOE_HD SMOE_REAL SMOE_FN(smoe_route_dot)(const void *a, const void *b, smoe_dtype dtype, int64_t aoff, int64_t boff,
                                        int64_t d) {
  SMOE_REAL lane[SMOE_ROUTE_LANES];
  for (int l = 0; l < SMOE_ROUTE_LANES; ++l) lane[l] = 0;
#define SMOE_ROUTE_DOT_BODY(TYPE, LD, ST)                                                   \
  {                                                                                         \
    const TYPE *qa = (const TYPE *)a + aoff, *qb = (const TYPE *)b + boff;                  \
    int64_t f0 = 0;                                                                         \
    for (; f0 + SMOE_ROUTE_LANES <= d; f0 += SMOE_ROUTE_LANES)                              \
      for (int l = 0; l < SMOE_ROUTE_LANES; ++l)                                            \
        lane[l] += (SMOE_REAL)LD(qa[f0 + l]) * (SMOE_REAL)LD(qb[f0 + l]);                       \
    for (int l = 0; f0 + l < d; ++l) lane[l] += (SMOE_REAL)LD(qa[f0 + l]) * (SMOE_REAL)LD(qb[f0 + l]); \
  }
  SMOE_ROUTE_DISPATCH(dtype, SMOE_ROUTE_DOT_BODY)
#undef SMOE_ROUTE_DOT_BODY
  for (int w = SMOE_ROUTE_LANES / 2; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
  return lane[0];
}

/* acc[f] += w * src[off + f] for f < d. */
SMOE_HD void SMOE_FN(smoe_route_axpy)(SMOE_REAL *acc, SMOE_REAL w, const void *src, smoe_dtype dtype, int64_t off,
                                      int64_t d) {
#define SMOE_ROUTE_AXPY_BODY(TYPE, LD, ST)                                      \
  {                                                                             \
    const TYPE *q = (const TYPE *)src + off;                                    \
    for (int64_t f = 0; f < d; ++f) acc[f] += w * (SMOE_REAL)LD(q[f]);            \
  }
  SMOE_ROUTE_DISPATCH(dtype, SMOE_ROUTE_AXPY_BODY)
#undef SMOE_ROUTE_AXPY_BODY
}

/* dst[doff + f] = w * src[soff + f] for f < d (src and dst of one storage dtype). */
SMOE_HD void SMOE_FN(smoe_route_scale)(void *dst, int64_t doff, SMOE_REAL w, const void *src, int64_t soff,
                                       smoe_dtype dtype, int64_t d) {
#define SMOE_ROUTE_SCALE_BODY(TYPE, LD, ST)                                     \
  {                                                                             \
    TYPE *o = (TYPE *)dst + doff;                                               \
    const TYPE *q = (const TYPE *)src + soff;                                   \
    for (int64_t f = 0; f < d; ++f) o[f] = ST(w * (SMOE_REAL)LD(q[f]));           \
  }
  SMOE_ROUTE_DISPATCH(dtype, SMOE_ROUTE_SCALE_BODY)
#undef SMOE_ROUTE_SCALE_BODY
}

/* dst[off + f] = acc[f] for f < d, rounded to the storage dtype. */
SMOE_HD void SMOE_FN(smoe_route_store_row)(void *dst, int64_t off, const SMOE_REAL *acc, smoe_dtype dtype,
                                           int64_t d) {
#define SMOE_ROUTE_STORE_BODY(TYPE, LD, ST)                                     \
  {                                                                             \
    TYPE *o = (TYPE *)dst + off;                                                \
    for (int64_t f = 0; f < d; ++f) o[f] = ST(acc[f]);                          \
  }
  SMOE_ROUTE_DISPATCH(dtype, SMOE_ROUTE_STORE_BODY)
#undef SMOE_ROUTE_STORE_BODY
}

/* combine for token t, accumulated in acc[0..d) (scratch) and stored to y.
 * Returns 1 when an index was out of range (that pair is skipped), else 0. */
SMOE_HD int SMOE_FN(smoe_route_combine_row)(const smoe_combine_args *a, int64_t t, SMOE_REAL *acc) {
  int bad = 0;
  const int64_t d = a->d;
  for (int64_t f = 0; f < d; ++f) acc[f] = 0;
  for (int64_t j = 0; j < a->max_active; ++j) {
    const int64_t s = a->token_pairs[t * a->max_active + j];
    SMOE_REAL w = 0;
    const int ok = SMOE_FN(smoe_route_weight)(a, t, s, &w);
    if (ok < 0) bad = 1;
    if (ok <= 0) continue;
    if (d > 0) SMOE_FN(smoe_route_axpy)(acc, w, a->ys, a->ys_dtype, s * d, d);
  }
  if (d > 0) SMOE_FN(smoe_route_store_row)(a->y, t * d, acc, a->ys_dtype, d);
  return bad;
}

/* Backward of combine for token t: grad_ys rows of t's slots and row t of grad_p (zeros except
 * at the routed pairs). Padding rows of grad_ys are not touched here. Returns 1 on a bad index. */
SMOE_HD int SMOE_FN(smoe_route_combine_bwd_row)(const smoe_combine_bwd_args *b, int64_t t) {
  smoe_combine_args a;
  a.tokens = b->tokens;
  a.experts = b->experts;
  a.max_active = b->max_active;
  a.d = b->d;
  a.ys_dtype = b->ys_dtype;
  a.ys = b->ys;
  a.p_dtype = b->p_dtype;
  a.p = b->p;
  a.pair_expert = b->pair_expert;
  a.token_pairs = b->token_pairs;
  a.y = 0;
  a.slots = b->slots;
  int bad = 0;
  const int64_t d = b->d, E = b->experts;
  for (int64_t e = 0; e < E; ++e) smoe_route_zero(b->grad_p, t * E + e, b->p_dtype);
  for (int64_t j = 0; j < b->max_active; ++j) {
    const int64_t s = b->token_pairs[t * b->max_active + j];
    SMOE_REAL w = 0;
    const int ok = SMOE_FN(smoe_route_weight)(&a, t, s, &w);
    if (ok < 0) bad = 1;
    if (ok <= 0) continue;
    SMOE_REAL g = 0;
    if (d > 0) {
      SMOE_FN(smoe_route_scale)(b->grad_ys, s * d, w, b->grad_y, t * d, b->ys_dtype, d);
      g = SMOE_FN(smoe_route_dot)(b->grad_y, b->ys, b->ys_dtype, t * d, s * d, d);
    }
    SMOE_STORE(b->grad_p, b->p_dtype, t * E + b->pair_expert[s], g);
  }
  return bad;
}

#endif /* SMOE_SUFFIX */
