/* Per-row LapSum soft top-k, forward and backward, generic over the math type.
 *
 * Include with SMOE_SUFFIX defined as f32 or f64; the file defines smoe_*_f32 / smoe_*_f64
 * functions and undefines its helper macros again, so it can be included once per type.
 * The CPU's row loops (lapsum_loops_def.h) run these functions in a loop over rows;
 * csrc/cuda/lapsum.cu runs the very same functions one thread per row. Scratch arrays are strided by `ss` (1 on the CPU; the number of
 * threads on the GPU, so that neighbouring threads touch neighbouring words).
 *
 * The math follows research/lapsum.md: §1.4-1.5 for the threshold solve (sorted candidates,
 * prefix/suffix exponential sums, a quadratic solved with the cancellation-free branch for the
 * sign of D, and the threshold kept relative to a pivot score), §6.4 for the left-truncated kernel
 * and §2.2 for the vector-Jacobian product.
 */
#ifndef SMOE_SUFFIX
#error "define SMOE_SUFFIX (f32 or f64) before including lapsum_row.h"
#endif

#include "smoe_dtype.h" /* SMOE_FN, SMOE_REAL, SMOE_LOAD, SMOE_EXP, ... */

#define SMOE_AT(arr, j) (arr)[(j) * ss]
#define R SMOE_REAL
#define SMOE_CDF SMOE_FN(smoe_lap_cdf)

/* ---- blocks of SMOE_LANES entries (smoe_math.h: why, and why the bits never depend on it) ---- */

#ifndef SMOE_TOPK_SMALL_CAP
/* Up to this many candidates a row's candidates, their exponential sums and its weights live in
 * arrays local to the row function (registers and the stack) rather than in the scratch. */
#define SMOE_TOPK_SMALL_CAP 16
#endif

/* The fixed tree in which the per-lane partial sums of a row are added. */
SMOE_HD R SMOE_FN(smoe_lane_sum)(const R *acc) {
#if SMOE_LANES != 8
#error "smoe_lane_sum adds 8 lanes"
#endif
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* Entries [i0, i0 + SMOE_LANES) of a row (the row starts at element `base` of src) in the math
 * type: a pointer into the row itself where it is stored in the math type and the block is whole
 * (the lane loops then read it straight from memory), else buf, filled (`fill` past the row's n
 * entries). */
SMOE_HD const R *SMOE_FN(smoe_block)(const void *src, smoe_dtype dtype, int64_t base, int64_t i0, int64_t n, R fill,
                                     R *buf) {
  if (dtype == (SMOE_IS_F64 ? SMOE_F64 : SMOE_F32) && i0 + SMOE_LANES <= n) return (const R *)src + base + i0;
  for (int l = 0; l < SMOE_LANES; ++l) buf[l] = i0 + l < n ? SMOE_LOAD(src, dtype, base + i0 + l) : fill;
  return buf;
}

/* Stores the lanes of v that fall inside the row (entries i0 + l < n) to dst. */
SMOE_HD void SMOE_FN(smoe_store_block)(void *dst, smoe_dtype dtype, int64_t base, int64_t i0, int64_t n,
                                       const R *v) {
  if (dtype == (SMOE_IS_F64 ? SMOE_F64 : SMOE_F32) && i0 + SMOE_LANES <= n) {
    R *p = (R *)dst + base + i0;
    SMOE_SIMD
    for (int l = 0; l < SMOE_LANES; ++l) p[l] = v[l];
  } else {
    for (int l = 0; l < SMOE_LANES && i0 + l < n; ++l) SMOE_STORE(dst, dtype, base + i0 + l, v[l]);
  }
}

SMOE_HD void SMOE_FN(smoe_fill_row)(void *out, smoe_dtype dtype, int64_t base, int64_t n, R v) {
  R block[SMOE_LANES];
  for (int l = 0; l < SMOE_LANES; ++l) block[l] = v;
  for (int64_t i0 = 0; i0 < n; i0 += SMOE_LANES) SMOE_FN(smoe_store_block)(out, dtype, base, i0, n, block);
}

#include "lapsum_select.h" /* selection: smoe_select and the paths it picks */

/* (a - b) / alpha as (a - b) * inv_alpha. Scores of opposite sign near the top of the range
 * overflow a - b while the quotient is finite for an alpha as large (f32 [3e38, -3e38] with
 * alpha = FLT_MAX is a gap of 1.76): then each score is divided first (the rounding of two
 * divisions, only in that case; bit-identical otherwise). */
SMOE_HD R SMOE_FN(smoe_scaled_gap)(R a, R b, R inv_alpha, R alpha) {
  const R d = a - b;
  return SMOE_FABS(d) <= SMOE_RMAX ? d * inv_alpha : a / alpha - b / alpha;
}

/* out[l] = smoe_scaled_gap(a[l * sa], b[l * sb]) for a block (sb = 0: one b for all lanes). The
 * rare overflowing difference is redone lane by lane, so the common block stays branch-free. */
SMOE_HD void SMOE_FN(smoe_scaled_gap_block)(const R *a, int64_t sa, const R *b, int64_t sb, R inv_alpha, R alpha,
                                            R *out) {
  int wide = 0;
  SMOE_SIMD_REDUCE(|, wide)
  for (int l = 0; l < SMOE_LANES; ++l) {
    const R d = a[l * sa] - b[l * sb];
    wide |= !(SMOE_FABS(d) <= SMOE_RMAX);
    out[l] = d * inv_alpha;
  }
  if (wide)
    for (int l = 0; l < SMOE_LANES; ++l) out[l] = SMOE_FN(smoe_scaled_gap)(a[l * sa], b[l * sb], inv_alpha, alpha);
}

/* Plain LapSum threshold for a descending s[0..a) and a target 0 < K < a:
 * b = s[piv] - alpha * tau with sum_j F((s_j - b) / alpha) = K.
 * s must be readable SMOE_LANES words past a (finite values); U and V hold smoe_pad_lanes(a) +
 * SMOE_LANES words. */
SMOE_HD void SMOE_FN(smoe_lapsum_solve)(const R *s, int64_t a, R K, R alpha, R *U, R *V, int64_t ss,
                                        int64_t *piv, R *tau) {
  const R inv_alpha = 1 / alpha;
  const int64_t w = smoe_pad_lanes(a);
  /* V first holds the factors e^{-gap_i} (all a - 1 of them at vector speed; the lanes past them
   * are overwritten below), then is turned into the suffix sums in place. */
  for (int64_t i0 = 0; i0 + 1 < a; i0 += SMOE_LANES) {
    R e[SMOE_LANES];
    SMOE_FN(smoe_scaled_gap_block)(s + (i0 + 1) * ss, ss, s + i0 * ss, ss, inv_alpha, alpha, e);
    SMOE_SIMD
    for (int l = 0; l < SMOE_LANES; ++l) SMOE_AT(V, i0 + l) = SMOE_FN(smoe_exp)(e[l]);
  }
  SMOE_AT(U, 0) = 0;
  for (int64_t i = 0; i + 1 < a; ++i) SMOE_AT(U, i + 1) = SMOE_AT(V, i) * (1 + SMOE_AT(U, i));
  SMOE_AT(V, a - 1) = 0;
  for (int64_t i = a - 1; i > 0; --i) SMOE_AT(V, i - 1) = SMOE_AT(V, i - 1) * (1 + SMOE_AT(V, i));
  for (int64_t i = a; i < w; ++i) SMOE_AT(U, i) = SMOE_AT(V, i) = 0;

  /* Soft count at b = s_i: C_i = i + 1/2 + (V_i - U_i) / 2, nondecreasing in i. */
#define SMOE_COUNT_AT(i) ((R)(i) + (R)0.5 + (R)0.5 * (SMOE_AT(V, i) - SMOE_AT(U, i)))
  if (K <= SMOE_COUNT_AT(0)) {
    *piv = 0;
    const R q = 2 * K / (1 + SMOE_AT(V, 0));
    /* a tiny K (subnormal k) underflows q to 0 (tau = -inf, threshold +inf as if k = 0) */
    *tau = q > (R)1e-30 ? SMOE_LOG(q) : SMOE_LOG(2 * K) - SMOE_LOG(1 + SMOE_AT(V, 0));
    return;
  }
  if (K >= SMOE_COUNT_AT(a - 1)) {
    *piv = a - 1;
    *tau = SMOE_LOG((1 + SMOE_AT(U, a - 1)) / (2 * ((R)a - K)));
    return;
  }
  /* The bracket C_l < K <= C_{l+1}: l is the last i with C_i < K (C_0 < K <= C_{a-1} here, so
   * 0 <= l <= a - 2, and the bracket holds even where rounding broke the monotonicity of C). */
  int32_t last = 0;
  for (int64_t i0 = 0; i0 < a; i0 += SMOE_LANES)
    SMOE_SIMD_REDUCE(max, last)
    for (int32_t l = 0; l < SMOE_LANES; ++l) {
      const int32_t i = (int32_t)i0 + l; /* candidate indices are int32 */
      const int below = (SMOE_COUNT_AT(i) < K) & (i < a);
      last = (below & (i > last)) ? i : last;
    }
#undef SMOE_COUNT_AT
  const int64_t l = last;
  const R gap_d = SMOE_AT(s, l) - SMOE_AT(s, l + 1);
  const R gap = SMOE_FABS(gap_d) <= SMOE_RMAX ? gap_d / alpha : SMOE_AT(s, l) / alpha - SMOE_AT(s, l + 1) / alpha;
  const R E = SMOE_FN(smoe_exp)(-gap);
  const R Q = 1 + SMOE_AT(U, l), P = 1 + SMOE_AT(V, l + 1);
  const R D = K - (R)(l + 1);
  const R root = SMOE_SQRT(D * D + P * Q * E);
  if (D > 0) {
    *piv = l + 1;
    *tau = SMOE_LOG((D + root) / P);
  } else if (D < 0) {
    *piv = l;
    *tau = SMOE_LOG(Q) - SMOE_LOG(root - D);
  } else { /* integer K: E may underflow, so the other branches would take log(0) */
    *piv = l;
    /* a gap that overflowed (|s| / alpha near the top of the range) would make tau = +inf and
     * x = -inf + inf = NaN below the pivot: any threshold inside the gap gives the same p */
    *tau = (R)0.5 * ((gap < SMOE_RMAX ? gap : SMOE_RMAX) + SMOE_LOG(Q) - SMOE_LOG(P));
  }
}

/* Truncated count (times 1 - eps, plus j * eps) at b = s_j + c * alpha, where candidate j sits
 * exactly on the cut: sum over i < j of F((s_i - s_j) / alpha - c). s is readable SMOE_LANES
 * words past j. */
SMOE_HD R SMOE_FN(smoe_count_at_cut)(const R *s, int64_t j, R inv_alpha, R alpha, R c, int64_t ss) {
  R acc[SMOE_LANES];
  for (int l = 0; l < SMOE_LANES; ++l) acc[l] = 0;
  for (int64_t i0 = 0; i0 < j; i0 += SMOE_LANES) {
    R x[SMOE_LANES];
    SMOE_FN(smoe_scaled_gap_block)(s + i0 * ss, ss, s + j * ss, 0, inv_alpha, alpha, x);
    SMOE_SIMD
    for (int l = 0; l < SMOE_LANES; ++l) acc[l] += SMOE_FN(smoe_where)(i0 + l < j, SMOE_CDF(x[l] - c), 0);
  }
  return SMOE_FN(smoe_lane_sum)(acc);
}

/* Number of active candidates of the left-truncated kernel: candidate j is active iff the
 * truncated count at b = s_j + c * alpha is still below k. That count is nondecreasing in j, so a
 * galloping search (the active set is usually small) followed by bisection finds the boundary. */
SMOE_HD int64_t SMOE_FN(smoe_active_count)(const R *s, int64_t m, R k, R alpha, R eps, R c, int64_t ss) {
  const R target = k * (1 - eps);
  const R inv_alpha = 1 / alpha;
#define SMOE_BELOW_K(j) (SMOE_FN(smoe_count_at_cut)(s, j, inv_alpha, alpha, c, ss) < target + (R)(j) * eps)
#define SMOE_TIED(j) (SMOE_AT(s, j) == SMOE_AT(s, (j) - 1))
  int64_t active;
  SMOE_ACTIVE_COUNT(m, k, SMOE_BELOW_K, SMOE_TIED, active);
#undef SMOE_TIED
#undef SMOE_BELOW_K
  return active;
}

/* The forward after the selection: m candidates s/idx (s readable SMOE_LANES words past m; U, V:
 * smoe_pad_lanes(m) + SMOE_LANES words each). */
SMOE_HD void SMOE_FN(smoe_topk_fwd_candidates)(const smoe_topk_fwd_args *a, int64_t row, R *s, const int32_t *idx,
                                               int64_t m, R *U, R *V, int64_t ss) {
  const int64_t n = a->n, base = row * n;
  const R k = ((const R *)a->k)[row * a->k_stride];
  const R alpha = ((const R *)a->alpha)[row * a->alpha_stride];
  const R eps = (R)a->eps;
  /* alpha must be positive, finite and not so small that 1 / alpha overflows */
  if (m < 0 || !(alpha > 0 && alpha < (R)INFINITY && 1 / alpha < (R)INFINITY) || !(k >= 0 && k <= (R)m)) {
    SMOE_FN(smoe_fill_row)(a->p, a->dtype, base, n, (R)NAN);
    a->threshold[row] = NAN;
    return;
  }
  if (k == 0) {
    SMOE_FN(smoe_fill_row)(a->p, a->dtype, base, n, 0);
    a->threshold[row] = INFINITY;
    return;
  }
  if (k == (R)m) {
    SMOE_FN(smoe_fill_row)(a->p, a->dtype, base, n, 0);
    for (int64_t j = 0; j < m; ++j) SMOE_STORE(a->p, a->dtype, base + SMOE_AT(idx, j), 1);
    a->threshold[row] = -INFINITY;
    return;
  }
  /* the blocked loops read up to SMOE_LANES - 1 candidates past m: make them copies of the last */
  for (int64_t j = m; j < m + SMOE_LANES; ++j) SMOE_AT(s, j) = SMOE_AT(s, m - 1);

  const int truncated = eps > 0;
  const R inv_alpha = 1 / alpha;
  /* On the active set the truncated kernel is (F - eps) / (1 - eps): solve plain LapSum for
   * sum F = k (1 - eps) + active * eps. First with every candidate active: if the worst one then
   * gets p > 0 (it is above the cut x = -c, where F = eps), that is the solution (the truncated
   * count is strictly decreasing in b, and this b gives it the value k), and a truncated row costs
   * what a plain one does. Otherwise the search finds the active set, and the solve runs again. */
  int64_t active = m, piv = 0;
  R tau = 0, s_piv = 0;
  R *P = U; /* p of the active candidates, in U once the solve is done with it */
  /* Every entry of the row active (a dense row: E <= 8 at max_active = E, and any row where
   * nothing is truncated or capped): p is computed in the row's own order, a block at a time,
   * straight into the output; otherwise in candidate order into P, then scattered. Both compute
   * the same x = (r - s_piv) / alpha + tau from the same numbers, so the bits are the same. */
  int dense = 0;
  for (int attempt = 0; attempt < 2; ++attempt) {
    R K = truncated ? k * (1 - eps) + (R)active * eps : k;
    /* K < active exactly (active > k), but k within an ulp of active can round K up to it, and the
     * solve would then return tau = +inf (threshold -inf, as if k = m): keep K below active. */
    if (!(K < (R)active)) K = SMOE_NEXTAFTER((R)active, (R)0);
    SMOE_FN(smoe_lapsum_solve)(s, active, K, alpha, U, V, ss, &piv, &tau);
    s_piv = SMOE_AT(s, piv);
    dense = active == n;
    int above_cut = 1; /* every active p > 0: the worst candidate is above the cut */
    for (int64_t j0 = 0; j0 < active; j0 += SMOE_LANES) {
      R buf[SMOE_LANES], x[SMOE_LANES], p[SMOE_LANES];
      if (dense) {
        const R *r = SMOE_FN(smoe_block)(a->scores, a->dtype, base, j0, n, s_piv, buf);
        SMOE_FN(smoe_scaled_gap_block)(r, 1, &s_piv, 0, inv_alpha, alpha, x);
      } else {
        SMOE_FN(smoe_scaled_gap_block)(s + j0 * ss, ss, &s_piv, 0, inv_alpha, alpha, x);
      }
      if (!truncated) {
        SMOE_SIMD
        for (int l = 0; l < SMOE_LANES; ++l) p[l] = SMOE_CDF(x[l] + tau);
      } else {
        /* 0 at and below the cut (F <= eps), where the kernel is 0 */
        SMOE_SIMD_REDUCE(&, above_cut)
        for (int l = 0; l < SMOE_LANES; ++l) {
          const R pl = (SMOE_CDF(x[l] + tau) - eps) / (1 - eps);
          above_cut &= (pl > 0) | (j0 + l >= active);
          p[l] = SMOE_FN(smoe_where)(pl > 0, pl, 0);
        }
      }
      if (dense) {
        SMOE_FN(smoe_store_block)(a->p, a->dtype, base, j0, n, p);
      } else {
        SMOE_SIMD
        for (int l = 0; l < SMOE_LANES; ++l) SMOE_AT(P, j0 + l) = p[l];
      }
    }
    if (!truncated || attempt == 1 || above_cut) break;
    const int64_t searched = SMOE_FN(smoe_active_count)(s, m, k, alpha, eps, (R)smoe_cut_from_eps(a->eps), ss);
    if (searched == m) break; /* rounding at the cut: the solve for all m stands */
    active = searched;
  }
  /* The one active expert carries all of k. Exact, where (F - eps) / (1 - eps) would cancel for
   * k << eps (F = eps + k (1 - eps)): the usual case of a tiny k, where a second expert is active
   * only within ~k / eps * alpha of a tie. */
  if (active == 1) SMOE_AT(P, 0) = k;
  if (dense) {
    if (active == 1) SMOE_STORE(a->p, a->dtype, base + SMOE_AT(idx, 0), k);
  } else {
    if (active < n) SMOE_FN(smoe_fill_row)(a->p, a->dtype, base, n, 0);
    if (a->dtype == (SMOE_IS_F64 ? SMOE_F64 : SMOE_F32)) {
      R *out = (R *)a->p + base;
      for (int64_t j = 0; j < active; ++j) out[SMOE_AT(idx, j)] = SMOE_AT(P, j);
    } else {
      for (int64_t j = 0; j < active; ++j) SMOE_STORE(a->p, a->dtype, base + SMOE_AT(idx, j), SMOE_AT(P, j));
    }
  }
  /* float64 only (a float32 row's threshold is exact in double): alpha * tau overflows for an
   * alpha above about 1e305 with tau finite. The backward could not place the scores against an
   * infinite threshold (it would read it as k at a limit: zero gradients), so the row is out of
   * range, as an infinite alpha is. An infinite tau (a subnormal k: as if k = 0) stays. */
  const double threshold = (double)s_piv - (double)alpha * (double)tau;
  if (sizeof(R) == sizeof(double) && tau > -(R)INFINITY && tau < (R)INFINITY &&
      !(threshold > -INFINITY && threshold < INFINITY)) { /* (a constant 0 for float rows) */
    SMOE_FN(smoe_fill_row)(a->p, a->dtype, base, n, (R)NAN);
    a->threshold[row] = NAN;
    return;
  }
  a->threshold[row] = threshold;
}

/* Forward of one row. rs: real scratch of smoe_topk_real_words(n, max_active) strided words
 * (lapsum.c's); is: index scratch of 2 * max_active strided words. A row with at most
 * SMOE_TOPK_SMALL_CAP candidates uses neither. */
SMOE_HD void SMOE_FN(smoe_topk_fwd_row)(const smoe_topk_fwd_args *a, int64_t row, R *rs, int32_t *is,
                                        int64_t ss) {
  const int64_t n = a->n, cap = a->max_active;
  if (cap <= SMOE_TOPK_SMALL_CAP) {
    R s[SMOE_TOPK_SMALL_CAP + SMOE_LANES], U[SMOE_TOPK_SMALL_CAP + SMOE_LANES], V[SMOE_TOPK_SMALL_CAP + SMOE_LANES];
    int32_t idx[SMOE_TOPK_SMALL_CAP];
    /* (the merge buffers are not used below SMOE_INSERTION_CAP candidates) */
    const int64_t m = SMOE_FN(smoe_select)(a->scores, a->dtype, row * n, n, cap, s, idx, U, idx, 1);
    SMOE_FN(smoe_topk_fwd_candidates)(a, row, s, idx, m, U, V, 1);
    return;
  }
  const int64_t w = smoe_pad_lanes(cap) + SMOE_LANES;
  R *s = rs, *U = rs + w * ss, *V = rs + 2 * w * ss;
  /* U and the second half of the index scratch are free while the candidates are sorted. */
  const int64_t m = SMOE_FN(smoe_select)(a->scores, a->dtype, row * n, n, cap, s, is, U, is + cap * ss, ss);
  SMOE_FN(smoe_topk_fwd_candidates)(a, row, s, is, m, U, V, ss);
}

/* Backward of one row. rs: real scratch of 3 * smoe_pad_lanes(n) strided words, is: index scratch
 * of n strided words (neither is used for n <= SMOE_TOPK_SMALL_CAP). Writes grad_scores and returns
 * the row's gradient contributions for k and alpha through *gk and *ga. */
SMOE_HD void SMOE_FN(smoe_topk_bwd_row)(const smoe_topk_bwd_args *a, int64_t row, R *rs, int32_t *is,
                                        int64_t ss, R *gk, R *ga) {
  const int64_t n = a->n, base = row * n;
  const double b = a->threshold[row];
  const R alpha = ((const R *)a->alpha)[row * a->alpha_stride];
  const R eps = (R)a->eps;
  if (b != b) {
    SMOE_FN(smoe_fill_row)(a->grad_scores, a->dtype, base, n, (R)NAN);
    *gk = (R)NAN;
    *ga = (R)NAN;
    return;
  }
  SMOE_FN(smoe_fill_row)(a->grad_scores, a->dtype, base, n, 0);
  if (b == INFINITY || b == -INFINITY) { /* k at a limit: p is saturated */
    *gk = 0;
    *ga = 0;
    return;
  }
  /* Which entries are active: with the plain kernel and no cap every finite score is (even where
   * p underflowed to 0); otherwise exactly those with p != 0. They are compacted, a block at a
   * time, into X (their scores, then x), G (upstream gradient), W (weights, then the gradient) and
   * I (index); a block without one is only tested (most of a truncated row at large E). */
  const int every_finite = a->eps == 0 && a->max_active >= n;
  const int small = n <= SMOE_TOPK_SMALL_CAP;
  const int64_t w = smoe_pad_lanes(n);
  R xs[SMOE_TOPK_SMALL_CAP], gs[SMOE_TOPK_SMALL_CAP], ws[SMOE_TOPK_SMALL_CAP];
  int32_t ids[SMOE_TOPK_SMALL_CAP];
  R *X = small ? xs : rs, *G = small ? gs : rs + w * ss, *W = small ? ws : rs + 2 * w * ss;
  int32_t *I = small ? ids : is;
  const int64_t st = small ? 1 : ss;
#define SMOE_AX(arr, j) (arr)[(j) * st]
  int64_t count = 0;
  for (int64_t i0 = 0; i0 < n; i0 += SMOE_LANES) {
    R rbuf[SMOE_LANES], pbuf[SMOE_LANES], gbuf[SMOE_LANES];
    const R *r = 0, *pv = 0;
    int any = 0, all = 1;
    if (every_finite) {
      r = SMOE_FN(smoe_block)(a->scores, a->dtype, base, i0, n, -(R)INFINITY, rbuf);
      SMOE_SIMD_REDUCE(|, any)
      for (int l = 0; l < SMOE_LANES; ++l) any |= (r[l] > -(R)INFINITY) & (r[l] < (R)INFINITY);
      SMOE_SIMD_REDUCE(&, all)
      for (int l = 0; l < SMOE_LANES; ++l) all &= (r[l] > -(R)INFINITY) & (r[l] < (R)INFINITY);
    } else {
      pv = SMOE_FN(smoe_block)(a->p, a->dtype, base, i0, n, 0, pbuf);
      SMOE_SIMD_REDUCE(|, any)
      for (int l = 0; l < SMOE_LANES; ++l) any |= pv[l] != 0;
      SMOE_SIMD_REDUCE(&, all)
      for (int l = 0; l < SMOE_LANES; ++l) all &= pv[l] != 0;
    }
    if (!any) continue;
    if (!every_finite) r = SMOE_FN(smoe_block)(a->scores, a->dtype, base, i0, n, 0, rbuf);
    const R *g = SMOE_FN(smoe_block)(a->grad_p, a->dtype, base, i0, n, 0, gbuf);
    if (all) { /* a whole block of active entries (a dense row) is copied as a block */
      SMOE_SIMD
      for (int l = 0; l < SMOE_LANES; ++l) {
        SMOE_AX(I, count + l) = (int32_t)(i0 + l);
        SMOE_AX(X, count + l) = r[l];
        SMOE_AX(G, count + l) = g[l];
      }
      count += SMOE_LANES;
      continue;
    }
    for (int l = 0; l < SMOE_LANES && i0 + l < n; ++l) { /* written always, kept when active */
      SMOE_AX(I, count) = (int32_t)(i0 + l);
      SMOE_AX(X, count) = r[l];
      SMOE_AX(G, count) = g[l];
      count += every_finite ? (r[l] > -(R)INFINITY) & (r[l] < (R)INFINITY) : pv[l] != 0;
    }
  }
  if (count == 0) {
    *gk = 0;
    *ga = 0;
    return;
  }
  const int64_t cw = smoe_pad_lanes(count);
  for (int64_t j = count; j < cw; ++j) SMOE_AX(X, j) = SMOE_AX(G, j) = 0; /* lanes past the active ones */
  /* x = (r - b) / alpha; the threshold is kept in double so that x stays accurate for large logits */
  R mu_lane[SMOE_LANES];
  for (int l = 0; l < SMOE_LANES; ++l) mu_lane[l] = (R)INFINITY;
  for (int64_t j0 = 0; j0 < count; j0 += SMOE_LANES) {
    int wide = 0;
    SMOE_SIMD_REDUCE(|, wide)
    for (int l = 0; l < SMOE_LANES; ++l) {
      const R xl = (R)((double)SMOE_AX(X, j0 + l) - b) / alpha;
      wide |= !(SMOE_FABS(xl) < (R)INFINITY);
      SMOE_AX(X, j0 + l) = xl;
    }
    /* r - b can overflow the math type while (r - b) / alpha does not (a huge alpha): divide in double */
    if (wide)
      for (int l = 0; l < SMOE_LANES && j0 + l < count; ++l)
        if (!(SMOE_FABS(SMOE_AX(X, j0 + l)) < (R)INFINITY))
          SMOE_AX(X, j0 + l) = (R)(((double)SMOE_LOAD(a->scores, a->dtype, base + SMOE_AX(I, j0 + l)) - b) / (double)alpha);
    SMOE_SIMD
    for (int l = 0; l < SMOE_LANES; ++l) {
      /* keep x finite where (r - b) / alpha overflows: phi is 0 there either way, and an infinite
       * x would give 0 * inf = NaN in grad_alpha (and inf - inf in the shift mu) */
      R xl = SMOE_FN(smoe_where)(SMOE_AX(X, j0 + l) > SMOE_RMAX, SMOE_RMAX, SMOE_AX(X, j0 + l));
      xl = SMOE_FN(smoe_where)(xl < -SMOE_RMAX, -SMOE_RMAX, xl);
      SMOE_AX(X, j0 + l) = xl;
      mu_lane[l] = SMOE_FN(smoe_where)((j0 + l < count) & (SMOE_FABS(xl) < mu_lane[l]), SMOE_FABS(xl), mu_lane[l]);
    }
  }
  R mu = mu_lane[0];
  for (int l = 1; l < SMOE_LANES; ++l) mu = mu_lane[l] < mu ? mu_lane[l] : mu;
  /* w = phi / sum(phi) = softmax(-|x|) over the active set, shifted by mu so it never underflows
   * as a whole (alpha -> 0); phi itself may underflow, which is then the true value. */
  R z_lane[SMOE_LANES], gw_lane[SMOE_LANES], ga_lane[SMOE_LANES];
  for (int l = 0; l < SMOE_LANES; ++l) z_lane[l] = gw_lane[l] = ga_lane[l] = 0;
  for (int64_t j0 = 0; j0 < count; j0 += SMOE_LANES) {
    SMOE_SIMD
    for (int l = 0; l < SMOE_LANES; ++l) {
      const R e = SMOE_FN(smoe_where)(j0 + l < count, SMOE_FN(smoe_exp)(-(SMOE_FABS(SMOE_AX(X, j0 + l)) - mu)), 0);
      SMOE_AX(W, j0 + l) = e;
      z_lane[l] += e;
      gw_lane[l] += SMOE_AX(G, j0 + l) * e;
    }
  }
  const R s = SMOE_FN(smoe_lane_sum)(gw_lane) / SMOE_FN(smoe_lane_sum)(z_lane);
  const R phi_scale = (R)0.5 * SMOE_FN(smoe_exp)(-mu) / ((1 - eps) * alpha);
  for (int64_t j0 = 0; j0 < count; j0 += SMOE_LANES) {
    SMOE_SIMD
    for (int l = 0; l < SMOE_LANES; ++l) {
      /* lanes past the active ones have weight 0 and x finite: they add 0 */
      const R gr = phi_scale * SMOE_AX(W, j0 + l) * (SMOE_AX(G, j0 + l) - s);
      SMOE_AX(W, j0 + l) = gr;
      /* p depends on r / alpha only, so d/dalpha = -(1/alpha) sum_j r_j d/dr_j = -sum_j x_j d/dr_j
       * (the r_j -> x_j step uses sum_j d/dr_j = 0). */
      ga_lane[l] -= gr * SMOE_AX(X, j0 + l);
    }
  }
  if (a->dtype == (SMOE_IS_F64 ? SMOE_F64 : SMOE_F32)) {
    R *out = (R *)a->grad_scores + base;
    for (int64_t j = 0; j < count; ++j) out[SMOE_AX(I, j)] = SMOE_AX(W, j);
  } else {
    for (int64_t j = 0; j < count; ++j) SMOE_STORE(a->grad_scores, a->dtype, base + SMOE_AX(I, j), SMOE_AX(W, j));
  }
#undef SMOE_AX
  *gk = s;
  *ga = SMOE_FN(smoe_lane_sum)(ga_lane);
}

#undef R
#undef SMOE_CDF
#undef SMOE_AT
