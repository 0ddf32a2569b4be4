/* Per-row LapSum soft top-k, forward and backward, generic over the math type.
 *
 * Include with SMOE_SUFFIX defined as f32 or f64; the file defines smoe_*_f32 / smoe_*_f64
 * functions and undefines its helper macros again, so it can be included once per type.
 * lapsum.c runs these functions in a loop over rows; csrc/cuda/lapsum.cu runs the very same
 * functions one thread per row. Scratch arrays are strided by `ss` (1 on the CPU; the number of
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

/* Order used to pick candidates: larger score first, lower index on ties. */
SMOE_HD int SMOE_FN(smoe_worse)(const R *val, const int32_t *idx, int64_t ss, int64_t a, int64_t b) {
  R va = SMOE_AT(val, a), vb = SMOE_AT(val, b);
  return va < vb || (va == vb && SMOE_AT(idx, a) > SMOE_AT(idx, b));
}

SMOE_HD void SMOE_FN(smoe_swap)(R *val, int32_t *idx, int64_t ss, int64_t a, int64_t b) {
  R tv = SMOE_AT(val, a);
  int32_t ti = SMOE_AT(idx, a);
  SMOE_AT(val, a) = SMOE_AT(val, b);
  SMOE_AT(idx, a) = SMOE_AT(idx, b);
  SMOE_AT(val, b) = tv;
  SMOE_AT(idx, b) = ti;
}

/* Min-heap (root = worst candidate) sift-down over the first `size` entries. */
SMOE_HD void SMOE_FN(smoe_sift)(R *val, int32_t *idx, int64_t ss, int64_t size, int64_t i) {
  for (;;) {
    int64_t l = 2 * i + 1, w = i;
    if (l < size && SMOE_FN(smoe_worse)(val, idx, ss, l, w)) w = l;
    if (l + 1 < size && SMOE_FN(smoe_worse)(val, idx, ss, l + 1, w)) w = l + 1;
    if (w == i) return;
    SMOE_FN(smoe_swap)(val, idx, ss, i, w);
    i = w;
  }
}

/* Up to this many candidates a sorted buffer with insertion beats a heap: a new score is usually
 * rejected by one well-predicted comparison, and an insertion is a short linear shift. */
#define SMOE_INSERTION_CAP 48

/* Best-first stable order of (val, idx) pairs: larger value first, lower index on ties. */
#define SMOE_BETTER(v1, i1, v2, i2) ((v1) > (v2) || ((v1) == (v2) && (i1) < (i2)))

/* Sorts val/idx[0..m) best first: insertion-sorted runs of 8, then bottom-up merges through
 * tv/ti. The merge step picks with conditional moves, not branches, so it runs at the same speed
 * whatever the data; this is what makes the uncapped (plain) case fast for large E. */
SMOE_HD void SMOE_FN(smoe_merge_sort)(R *val, int32_t *idx, R *tv, int32_t *ti, int64_t m, int64_t ss) {
  for (int64_t lo = 0; lo < m; lo += 8) {
    const int64_t hi = lo + 8 < m ? lo + 8 : m;
    for (int64_t i = lo + 1; i < hi; ++i) {
      const R v = SMOE_AT(val, i);
      const int32_t x = SMOE_AT(idx, i);
      int64_t j = i;
      for (; j > lo && SMOE_BETTER(v, x, SMOE_AT(val, j - 1), SMOE_AT(idx, j - 1)); --j) {
        SMOE_AT(val, j) = SMOE_AT(val, j - 1);
        SMOE_AT(idx, j) = SMOE_AT(idx, j - 1);
      }
      SMOE_AT(val, j) = v;
      SMOE_AT(idx, j) = x;
    }
  }
  R *sv = val, *dv = tv;
  int32_t *si = idx, *di = ti;
  for (int64_t width = 8; width < m; width *= 2) {
    for (int64_t lo = 0; lo < m; lo += 2 * width) {
      const int64_t mid = lo + width < m ? lo + width : m, hi = lo + 2 * width < m ? lo + 2 * width : m;
      int64_t i = lo, j = mid, o = lo;
      while (i < mid && j < hi) {
        const R lv = SMOE_AT(sv, i), rv = SMOE_AT(sv, j);
        const int32_t li = SMOE_AT(si, i), ri = SMOE_AT(si, j);
        const int take_left = SMOE_BETTER(lv, li, rv, ri);
        SMOE_AT(dv, o) = take_left ? lv : rv;
        SMOE_AT(di, o) = take_left ? li : ri;
        i += take_left;
        j += 1 - take_left;
        ++o;
      }
      for (; i < mid; ++i, ++o) {
        SMOE_AT(dv, o) = SMOE_AT(sv, i);
        SMOE_AT(di, o) = SMOE_AT(si, i);
      }
      for (; j < hi; ++j, ++o) {
        SMOE_AT(dv, o) = SMOE_AT(sv, j);
        SMOE_AT(di, o) = SMOE_AT(si, j);
      }
    }
    R *t = sv;
    sv = dv;
    dv = t;
    int32_t *u = si;
    si = di;
    di = u;
  }
  if (sv != val)
    for (int64_t i = 0; i < m; ++i) {
      SMOE_AT(val, i) = SMOE_AT(sv, i);
      SMOE_AT(idx, i) = SMOE_AT(si, i);
    }
}
#undef SMOE_BETTER

/* Loads one row and keeps its `cap` best finite scores, sorted best first, in val/idx (tv/ti:
 * cap more words each, for the merge sort). Returns the number of candidates, or -1 when the row
 * holds a NaN or +inf score. */
SMOE_HD int64_t SMOE_FN(smoe_select)(const void *scores, smoe_dtype dtype, int64_t base, int64_t n,
                                     int64_t cap, R *val, int32_t *idx, R *tv, int32_t *ti, int64_t ss) {
  int64_t m = 0;
  if (cap > SMOE_INSERTION_CAP && cap == n) { /* no cap: every finite score, merge-sorted */
    int bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      const R x = SMOE_LOAD(scores, dtype, base + i);
      bad |= !(x < (R)INFINITY);
      if (!(x > -(R)INFINITY)) continue;
      SMOE_AT(val, m) = x;
      SMOE_AT(idx, m) = (int32_t)i;
      ++m;
    }
    if (bad) return -1;
    SMOE_FN(smoe_merge_sort)(val, idx, tv, ti, m, ss);
    return m;
  }
  if (cap <= SMOE_INSERTION_CAP) {
    int bad = 0;
    for (int64_t i = 0; i < n; ++i) {
      const R x = SMOE_LOAD(scores, dtype, base + i);
      bad |= !(x < (R)INFINITY); /* NaN or +inf: checked once after the loop */
      if (m == cap) {
        if (!(x > SMOE_AT(val, cap - 1))) continue; /* ties keep the lower index; NaN fails too */
      } else if (!(x > -(R)INFINITY)) {
        continue;
      }
      int64_t j = m < cap ? m++ : cap - 1;
      for (; j > 0 && SMOE_AT(val, j - 1) < x; --j) {
        SMOE_AT(val, j) = SMOE_AT(val, j - 1);
        SMOE_AT(idx, j) = SMOE_AT(idx, j - 1);
      }
      SMOE_AT(val, j) = x;
      SMOE_AT(idx, j) = (int32_t)i;
    }
    return bad ? -1 : m;
  }
  for (int64_t i = 0; i < n; ++i) {
    R x = SMOE_LOAD(scores, dtype, base + i);
    if (x != x || x == (R)INFINITY) return -1;
    if (x == -(R)INFINITY) continue;
    if (m < cap) {
      SMOE_AT(val, m) = x;
      SMOE_AT(idx, m) = (int32_t)i;
      ++m;
      if (m == cap)
        for (int64_t j = cap / 2 - 1; j >= 0; --j) SMOE_FN(smoe_sift)(val, idx, ss, cap, j);
    } else if (x > SMOE_AT(val, 0)) { /* equal scores keep the earlier (lower) index */
      SMOE_AT(val, 0) = x;
      SMOE_AT(idx, 0) = (int32_t)i;
      SMOE_FN(smoe_sift)(val, idx, ss, cap, 0);
    }
  }
  if (m < cap)
    for (int64_t j = m / 2 - 1; j >= 0; --j) SMOE_FN(smoe_sift)(val, idx, ss, m, j);
  /* Heap-sort: moving the worst to the end each time leaves the best first. */
  for (int64_t end = m - 1; end > 0; --end) {
    SMOE_FN(smoe_swap)(val, idx, ss, 0, end);
    SMOE_FN(smoe_sift)(val, idx, ss, end, 0);
  }
  return m;
}

/* (a - b) / alpha as (a - b) * inv_alpha. Scores of opposite sign near the top of the range
 * overflow a - b while the quotient is finite for an alpha as large (f32 [3e38, -3e38] with
 * alpha = FLT_MAX is a gap of 1.76): then each score is divided first (the rounding of two
 * divisions, only in that case; bit-identical otherwise). */
SMOE_HD R SMOE_FN(smoe_scaled_gap)(R a, R b, R inv_alpha, R alpha) {
  const R d = a - b;
  return SMOE_FABS(d) <= SMOE_RMAX ? d * inv_alpha : a / alpha - b / alpha;
}

/* Plain LapSum threshold for a descending s[0..a) and a target 0 < K < a:
 * b = s[piv] - alpha * tau with sum_j F((s_j - b) / alpha) = K. */
SMOE_HD void SMOE_FN(smoe_lapsum_solve)(const R *s, int64_t a, R K, R alpha, R *U, R *V, int64_t ss,
                                        int64_t *piv, R *tau) {
  const R inv_alpha = 1 / alpha;
  /* V first holds the factors e^{-gap_i}, then is turned into the suffix sums in place. */
  SMOE_AT(U, 0) = 0;
  for (int64_t i = 0; i + 1 < a; ++i) {
    R e = SMOE_EXP(SMOE_FN(smoe_scaled_gap)(SMOE_AT(s, i + 1), SMOE_AT(s, i), inv_alpha, alpha));
    SMOE_AT(V, i) = e;
    SMOE_AT(U, i + 1) = e * (1 + SMOE_AT(U, i));
  }
  SMOE_AT(V, a - 1) = 0;
  for (int64_t i = a - 1; i > 0; --i) SMOE_AT(V, i - 1) = SMOE_AT(V, i - 1) * (1 + SMOE_AT(V, i));

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
  int64_t lo = 0, hi = a - 1; /* C_lo < K <= C_hi */
  while (hi - lo > 1) {
    int64_t mid = lo + (hi - lo) / 2;
    if (SMOE_COUNT_AT(mid) < K)
      lo = mid;
    else
      hi = mid;
  }
#undef SMOE_COUNT_AT
  const int64_t l = lo;
  const R gap_d = SMOE_AT(s, l) - SMOE_AT(s, l + 1);
  const R gap = SMOE_FABS(gap_d) <= SMOE_RMAX ? gap_d / alpha : SMOE_AT(s, l) / alpha - SMOE_AT(s, l + 1) / alpha;
  const R E = SMOE_EXP(-gap);
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
 * exactly on the cut: sum over i < j of F((s_i - s_j) / alpha - c). */
SMOE_HD R SMOE_FN(smoe_count_at_cut)(const R *s, int64_t j, R inv_alpha, R alpha, R c, int64_t ss) {
  R sum = 0;
  for (int64_t i = 0; i < j; ++i)
    sum += SMOE_CDF(SMOE_FN(smoe_scaled_gap)(SMOE_AT(s, i), SMOE_AT(s, j), inv_alpha, alpha) - c);
  return sum;
}

/* Number of active candidates of the left-truncated kernel: candidate j is active iff the
 * truncated count at b = s_j + c * alpha is still below k. That count is nondecreasing in j, so a
 * galloping search (the active set is usually small) followed by bisection finds the boundary. */
SMOE_HD int64_t SMOE_FN(smoe_active_count)(const R *s, int64_t m, R k, R alpha, R eps, R c, int64_t ss) {
  const R target = k * (1 - eps);
  const R inv_alpha = 1 / alpha;
#define SMOE_BELOW_K(j) (SMOE_FN(smoe_count_at_cut)(s, j, inv_alpha, alpha, c, ss) < target + (R)(j) * eps)
  int64_t lo = 0, hi = 1; /* invariant: count(lo) < k; count(m) is taken as +inf */
  while (hi < m && SMOE_BELOW_K(hi)) {
    lo = hi;
    hi *= 2;
  }
  if (hi > m) hi = m;
  while (hi - lo > 1) {
    int64_t mid = lo + (hi - lo) / 2;
    if (SMOE_BELOW_K(mid))
      lo = mid;
    else
      hi = mid;
  }
#undef SMOE_BELOW_K
  int64_t active = lo + 1;
  /* sum p = k needs more than k active entries; rounding must not break that. */
  int64_t need = (int64_t)k + 1;
  if (active < need) active = need < m ? need : m;
  /* tied candidates have one x: keep a tie group whole (the minimum above, or rounding in the
   * search, could otherwise cut it and give equal scores different p, one of them 0) */
  while (active < m && SMOE_AT(s, active) == SMOE_AT(s, active - 1)) ++active;
  return active;
}

SMOE_HD void SMOE_FN(smoe_fill_row)(void *out, smoe_dtype dtype, int64_t base, int64_t n, R v) {
  for (int64_t i = 0; i < n; ++i) SMOE_STORE(out, dtype, base + i, v);
}

/* Forward of one row. rs: real scratch of 3 * max_active strided words; is: index scratch of
 * 2 * max_active strided words. */
SMOE_HD void SMOE_FN(smoe_topk_fwd_row)(const smoe_topk_fwd_args *a, int64_t row, R *rs, int32_t *is,
                                        int64_t ss) {
  const int64_t n = a->n, cap = a->max_active, base = row * n;
  const R k = ((const R *)a->k)[row * a->k_stride];
  const R alpha = ((const R *)a->alpha)[row * a->alpha_stride];
  const R eps = (R)a->eps;
  R *s = rs, *U = rs + cap * ss, *V = rs + 2 * cap * ss;

  /* U and the second half of the index scratch are free while the candidates are sorted. */
  const int64_t m = SMOE_FN(smoe_select)(a->scores, a->dtype, base, n, cap, s, is, U, is + cap * ss, ss);
  /* alpha must be positive, finite and not so small that 1 / alpha overflows */
  if (m < 0 || !(alpha > 0 && alpha < (R)INFINITY && 1 / alpha < (R)INFINITY) || !(k >= 0 && k <= (R)m)) {
    SMOE_FN(smoe_fill_row)(a->p, a->dtype, base, n, (R)NAN);
    a->threshold[row] = NAN;
    return;
  }
  SMOE_FN(smoe_fill_row)(a->p, a->dtype, base, n, 0);
  if (k == 0) {
    a->threshold[row] = INFINITY;
    return;
  }
  if (k == (R)m) {
    for (int64_t j = 0; j < m; ++j) SMOE_STORE(a->p, a->dtype, base + SMOE_AT(is, j), 1);
    a->threshold[row] = -INFINITY;
    return;
  }

  const int truncated = eps > 0;
  const R c = truncated ? (R)smoe_cut_from_eps(a->eps) : (R)INFINITY;
  const int64_t active = truncated ? SMOE_FN(smoe_active_count)(s, m, k, alpha, eps, c, ss) : m;
  /* On the active set the truncated kernel is (F - eps) / (1 - eps): solve plain LapSum for
   * sum F = k (1 - eps) + active * eps. */
  R K = truncated ? k * (1 - eps) + (R)active * eps : k;
  /* K < active exactly (active > k), but k within an ulp of active can round K up to it, and the
   * solve would then return tau = +inf (threshold -inf, as if k = m): keep K below active. */
  if (!(K < (R)active)) K = SMOE_NEXTAFTER((R)active, (R)0);
  int64_t piv;
  R tau;
  SMOE_FN(smoe_lapsum_solve)(s, active, K, alpha, U, V, ss, &piv, &tau);

  const R s_piv = SMOE_AT(s, piv), inv_alpha = 1 / alpha;
  for (int64_t j = 0; j < active; ++j) {
    const R x = SMOE_FN(smoe_scaled_gap)(SMOE_AT(s, j), s_piv, inv_alpha, alpha) + tau;
    R p;
    if (active == 1) {
      /* The one active expert carries all of k. Exact, where (F - eps) / (1 - eps) would cancel
       * for k << eps (F = eps + k (1 - eps)): the usual case of a tiny k, where a second expert is
       * active only within ~k / eps * alpha of a tie. */
      p = k;
    } else if (!truncated) {
      p = SMOE_CDF(x);
    } else if (x <= -c) {
      p = 0;
    } else {
      p = (SMOE_CDF(x) - eps) / (1 - eps);
      if (p < 0) p = 0;
    }
    SMOE_STORE(a->p, a->dtype, base + SMOE_AT(is, j), p);
  }
  a->threshold[row] = (double)s_piv - (double)alpha * (double)tau;
}

/* Backward of one row. rs: real scratch of 2 * n strided words, is: index scratch of n strided
 * words. Writes grad_scores and returns the
 * row's gradient contributions for k and alpha through *gk and *ga. */
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
  if (b == INFINITY || b == -INFINITY) { /* k at a limit: p is saturated */
    SMOE_FN(smoe_fill_row)(a->grad_scores, a->dtype, base, n, 0);
    *gk = 0;
    *ga = 0;
    return;
  }
  /* Which entries are active: with the plain kernel and no cap every finite score is (even where
   * p underflowed to 0); otherwise exactly those with p != 0. The active entries are compacted
   * (index in Xi, x in X, weight in W) so the later passes touch only them. */
  const int every_finite = a->eps == 0 && a->max_active >= n;
  R *X = rs, *W = rs + n * ss;
  int32_t *Xi = is;
  R mu = (R)INFINITY;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    const R r = SMOE_LOAD(a->scores, a->dtype, base + i);
    const int active = every_finite ? (r > -(R)INFINITY && r < (R)INFINITY)
                                    : SMOE_LOAD(a->p, a->dtype, base + i) != 0;
    if (!active) continue;
    /* The threshold is kept in double so that x stays accurate for large logits. */
    const double d = (double)r - b;
    R x = (R)d / alpha;
    /* r - b can overflow the math type while (r - b) / alpha does not (a huge alpha): divide in double */
    if (!(SMOE_FABS(x) < (R)INFINITY)) x = (R)(d / (double)alpha);
    /* keep x finite where (r - b) / alpha overflows: phi is 0 there either way, and an infinite x
     * would give 0 * inf = NaN in grad_alpha (and inf - inf in the shift mu) */
    if (x > SMOE_RMAX) x = SMOE_RMAX;
    if (x < -SMOE_RMAX) x = -SMOE_RMAX;
    SMOE_AT(X, count) = x;
    SMOE_AT(Xi, count) = (int32_t)i;
    if (SMOE_FABS(x) < mu) mu = SMOE_FABS(x);
    ++count;
  }
  SMOE_FN(smoe_fill_row)(a->grad_scores, a->dtype, base, n, 0);
  if (count == 0) {
    *gk = 0;
    *ga = 0;
    return;
  }
  /* w = phi / sum(phi) = softmax(-|x|) over the active set, shifted by mu so it never underflows
   * as a whole (alpha -> 0); phi itself may underflow, which is then the true value. */
  R Z = 0, gw = 0;
  for (int64_t j = 0; j < count; ++j) {
    const R e = SMOE_EXP(-(SMOE_FABS(SMOE_AT(X, j)) - mu));
    SMOE_AT(W, j) = e;
    Z += e;
    gw += SMOE_LOAD(a->grad_p, a->dtype, base + SMOE_AT(Xi, j)) * e;
  }
  const R s = gw / Z;
  const R phi_scale = (R)0.5 * SMOE_EXP(-mu) / ((1 - eps) * alpha);
  R galpha = 0;
  for (int64_t j = 0; j < count; ++j) {
    const int64_t i = base + SMOE_AT(Xi, j);
    const R gr = phi_scale * SMOE_AT(W, j) * (SMOE_LOAD(a->grad_p, a->dtype, i) - s);
    SMOE_STORE(a->grad_scores, a->dtype, i, gr);
    /* p depends on r / alpha only, so d/dalpha = -(1/alpha) sum_j r_j d/dr_j = -sum_j x_j d/dr_j
     * (the r_j -> x_j step uses sum_j d/dr_j = 0). */
    galpha -= gr * SMOE_AT(X, j);
  }
  *gk = s;
  *ga = galpha;
}

#undef R
#undef SMOE_CDF
#undef SMOE_AT
