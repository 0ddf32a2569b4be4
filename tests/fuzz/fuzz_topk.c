/* libFuzzer target: LapSum soft top-k forward + backward (smoe_topk_fwd / smoe_topk_bwd).
 *
 * Decodes from the fuzz bytes: dtype (f32/f64/bf16/f16), E in 1..512, rows in 1..4, max_active in
 * [1, E], eps in [0, 0.5) (zero, uniform, log-uniform and edge values), k and alpha broadcast or
 * per row (fractions of the candidate count m, integers, exactly 0 / m, tiny, raw bits, out of
 * range), and scores with ties, near-ties (1 ulp), +-inf, NaN, subnormals, magnitudes up to 1e30
 * and raw bit patterns. Checks the contract of csrc/core/softmoe.h against an independent
 * reference solve in double (bisection on the threshold), see README.md for the list and the
 * tolerances. Build: see the Makefile targets fuzz / fuzz-smoke / fuzz-regress.
 */
#include "fuzz_common.h"

#define MAX_E 512
#define MAX_ROWS 4

/* ---- tolerances (see README.md, "Invariants and tolerances") ---------------------------------- */

/* All in units of u, the unit roundoff of the math type (2^-24 for float, 2^-53 for double), plus
 * the storage rounding of bf16 / f16 outputs and the reference's own uncertainty:
 *   sum:  |sum p - k| <= C_SUM u (max(1, k) + nnz eps / (1 - eps))
 *   p:    |p_j - p_ref_j| <= C_P u (p_j + eps / (1 - eps) + phi_j (1 + |x_j| + tau) + K' w_j)
 *   grad: |g_j - g_ref_j| <= C_G u (scale + scale_j (1 + |x_j| + tau + 2^-53 |b| / (u alpha))
 *                                    + K' w_j (|grad_p_j| + |s|) / ((1 - eps) alpha))
 * with phi_j = e^-|x_j| / (2 (1 - eps)) the kernel's density, K' = k + nnz eps / (1 - eps),
 * w_j = phi_j / sum_i phi_i over the active set, tau a bound on the kernel's pivot offset (the |x| of
 * the candidates next to the threshold), scale_j = phi_j / alpha (|grad_p_j| + |s|) and scale its
 * maximum, the size of the gradient's terms. Why: p_j itself is rounded (u p_j; the (F - eps)
 * cancellation adds u eps / (1 - eps)); x_j = (s_j - s_piv) / alpha + tau carries u (|x_j| + |tau|),
 * which moves p_j by phi_j times that (the backward takes x from the double threshold b instead,
 * adding 2^-53 |b| / alpha); and on the active set the truncated kernel is solved as plain
 * LapSum for K = k (1 - eps) + nnz eps, which float holds only to u K: the threshold then moves by
 * u K / sum_i phi_i, which moves p_j by phi_j times that and the gradient by a relative as much.
 * Near saturation (k -> m, sum phi -> m - k) that is the conditioning of the problem itself. */
#define C_SUM 1024.0
#define C_P 64.0
#define C_G 64.0
/* sum of grad_scores: |sum g| <= C_GSUM u sum_j phi_j / ((1 - eps) alpha) (|grad_p_j| + |s|) */
#define C_GSUM 256.0

/* ---- statistics (build with -DFZ_STATS to print the largest errors seen, for tuning) ---------- */
#ifdef FZ_STATS
static double st_p[2], st_sum[2], st_g[2], st_gsum[2];
static long st_rows[2], st_ref_rows[2], st_ref_good[2], st_bwd_rows[2];
static void st_print(void) {
  for (int f = 0; f < 2; ++f)
    fprintf(stderr,
            "[stats %s] rows %ld (reference %ld, well-conditioned %ld, backward %ld), in units of the tolerance "
            "formulas' u terms: "
            "p %.3g, sum %.3g, grad %.3g, grad sum %.3g\n",
            f ? "f64" : "f32", st_rows[f], st_ref_rows[f], st_ref_good[f], st_bwd_rows[f], st_p[f], st_sum[f], st_g[f], st_gsum[f]);
}
#define ST_MAX(arr, f, v)          \
  do {                             \
    if ((v) > arr[f]) arr[f] = (v); \
  } while (0)
#define ST_INC(arr, f) (++arr[f])
#else
#define ST_MAX(arr, f, v) ((void)0)
#define ST_INC(arr, f) ((void)0)
#endif

/* ---- the decoded case ------------------------------------------------------------------------- */

typedef struct {
  smoe_dtype dt;
  int f64; /* math type is double */
  int64_t rows, n, max_active;
  double eps;
  int k_per_row, alpha_per_row, backward;
  int64_t split; /* row split for the chunking check */
} topk_case;

/* Rounds to the math type. */
static double to_math(const topk_case *c, double v) { return c->f64 ? v : (double)(float)v; }

static double math_denorm_min(const topk_case *c) { return c->f64 ? 4.9406564584124654e-324 : 1.40129846e-45; }

static double next_toward(const topk_case *c, double v, double dir) {
  return c->f64 ? nextafter(v, dir) : (double)nextafterf((float)v, (float)dir);
}

static const double SCALES[16] = {1, 1e-3, 1e3, 1e-6, 1e6, 1e-20, 1e20, 1e30, 1e-30, 1e-38, 0.01, 100, 1e10, 1e-10, 1, 10};

/* One score from its code byte (see README.md for the encoding). prev: the previous score. */
static double decode_score(fz_reader *r, const topk_case *c, double scale, double prev) {
  const uint8_t code = fz_u8(r);
  if (code < 128) return ((int)code - 64) / 16.0 * scale;
  if (code < 192) return ((int)fz_u16(r) - 32768) / 4096.0 * scale;
  if (code < 200) {
    const double special[8] = {0.0, -0.0, INFINITY, -INFINITY, NAN, math_denorm_min(c), -math_denorm_min(c),
                               (double)FLT_MIN};
    return special[code - 192];
  }
  if (code < 208) {
    const double big[8] = {1e30, -1e30, 1e20, -1e20, (double)FLT_MAX, -(double)FLT_MAX, 3e38, -1e-30};
    return big[code - 200];
  }
  if (code < 224) return prev;                                          /* an exact tie */
  if (code < 240) return next_toward(c, prev, code < 232 ? INFINITY : -INFINITY); /* a 1-ulp near-tie */
  if (c->f64) {
    double v = fz_f64_bits(fz_u64(r));
    /* keep finite magnitudes within the double reference's range (|score| / alpha must not
     * overflow); the f32 paths see every bit pattern */
    if (v == v && fabs(v) < INFINITY && fabs(v) > 1e300) v = copysign(1e300, v);
    return v;
  }
  return (double)fz_f32_bits(fz_u32(r));
}

static void decode_row_scores(fz_reader *r, const topk_case *c, double *out) {
  const uint8_t mode = fz_u8(r);
  const double scale = SCALES[mode & 15];
  if (mode & 16) {
    /* bulk row from a PRNG: normal scores on a grid (ties), with sprinkled specials */
    fz_rng g = {fz_u32(r)};
    const uint8_t q = fz_u8(r);
    const double grid = (q & 8) ? 0.0 : ldexp(1.0, (q & 7) - 2);
    const double special_rate = (q >> 4) / 64.0;
    for (int64_t i = 0; i < c->n; ++i) {
      double v = fz_rng_normal(&g) * scale;
      if (grid > 0) v = round(v / scale * grid) / grid * scale;
      if (fz_rng_unit(&g) < special_rate) {
        const double special[6] = {-INFINITY, -INFINITY, INFINITY, NAN, 0.0, 1e30};
        v = special[fz_rng_next(&g) % 6];
      }
      out[i] = v;
    }
    return;
  }
  double prev = 0.0;
  for (int64_t i = 0; i < c->n; ++i) prev = out[i] = decode_score(r, c, scale, prev);
}

static double decode_k(fz_reader *r, const topk_case *c, int64_t m) {
  const uint8_t mode = fz_u8(r);
  const double dm = (double)m;
  switch (mode % 10) {
    case 0:
    case 1: return (fz_u16(r) + 1.0) / 65537.0 * dm;
    case 2: return (double)(fz_u8(r) % (m + 1));
    case 3: return 0.0;
    case 4: return dm;
    case 5: return next_toward(c, dm, 0.0);
    case 6: {
      const double tiny[8] = {math_denorm_min(c), (double)FLT_MIN, 1e-30, 1e-10, 1e-4, 0.5,
                              next_toward(c, 1.0, 0.0), next_toward(c, 1.0, 2.0)};
      return tiny[fz_u8(r) % 8];
    }
    case 7: return c->f64 ? fz_f64_bits(fz_u64(r)) : (double)fz_f32_bits(fz_u32(r));
    case 8: {
      const double bad[8] = {-math_denorm_min(c), -1.0, dm + 0.5, dm + 1.0, NAN, INFINITY, -INFINITY,
                             next_toward(c, dm, INFINITY)};
      return bad[fz_u8(r) % 8];
    }
    default: {
      const double frac[4] = {1e-6, 1e-3, 0.5, 1 - 1e-6};
      const uint8_t b = fz_u8(r);
      return m > 0 ? (double)(b % m) + frac[(b >> 6) & 3] : frac[(b >> 6) & 3];
    }
  }
}

static double decode_alpha(fz_reader *r) {
  const uint8_t mode = fz_u8(r);
  switch (mode % 8) {
    case 0:
    case 1:
    case 2: return pow(10.0, fz_u16(r) / 65535.0 * 12.0 - 6.0);
    case 3: {
      const double edge[8] = {1e-30, 1e-37, (double)FLT_MIN, 3e-39, 1e30, 1e38, (double)FLT_MAX, 1e-300};
      return edge[fz_u8(r) % 8];
    }
    case 4: return (mode & 8) ? fz_f64_bits(fz_u64(r)) : (double)fz_f32_bits(fz_u32(r));
    case 5: {
      const double bad[8] = {0.0, -0.0, -1.0, INFINITY, -INFINITY, NAN, 1e-45, 2e-39};
      return bad[fz_u8(r) % 8];
    }
    case 6: return 1.0;
    default: return (1.0 + fz_u8(r)) / 16.0;
  }
}

static double decode_eps(fz_reader *r) {
  const uint8_t mode = fz_u8(r);
  switch (mode % 4) {
    case 0: return 0.0;
    case 1: return fz_u16(r) / 65536.0 * 0.5;
    case 2: {
      const double edge[8] = {1e-300, 1e-45, 1e-38, 1e-30, 1e-8, 1e-2, 0.25, 0.49999999999999994};
      return edge[fz_u8(r) % 8];
    }
    default: return 0.5 * pow(10.0, -(1.0 + fz_u8(r) / 8.0));
  }
}

/* grad_p of one row: |values| <= 1e4, so the true gradient is representable (checked). */
static void decode_grad_row(fz_reader *r, int64_t n, double *out) {
  const uint8_t mode = fz_u8(r);
  switch (mode % 4) {
    case 0: { /* constant: the true gradient is exactly 0 */
      const double v = ((int)fz_u8(r) - 128) / 8.0;
      for (int64_t i = 0; i < n; ++i) out[i] = v;
      break;
    }
    case 1: { /* one-hot */
      const int64_t at = fz_u16(r) % n;
      const double v = ((int)fz_u8(r) - 128) / 8.0;
      for (int64_t i = 0; i < n; ++i) out[i] = i == at ? v : 0.0;
      break;
    }
    case 2: {
      fz_rng g = {fz_u32(r)};
      const double scale = pow(10.0, (int)(fz_u8(r) % 8) - 3);
      for (int64_t i = 0; i < n; ++i) out[i] = fz_rng_normal(&g) * scale;
      break;
    }
    default:
      for (int64_t i = 0; i < n; ++i) out[i] = ((int)fz_u8(r) - 128) / 16.0;
  }
}

/* ---- independent reference in double ----------------------------------------------------------- */

typedef struct {
  double eps, cut; /* math-type eps, and cut = -ln(2 eps) (+inf for the plain kernel) */
  int truncated;
} kernel;

/* a * b with 0 * inf = 0 (a zero density times an unbounded factor contributes nothing) */
static double mul0(double a, double b) { return a == 0 ? 0.0 : a * b; }

static double lap_cdf(double x) { return x <= 0 ? 0.5 * exp(x) : 1.0 - 0.5 * exp(-x); }

static double kernel_g(const kernel *K, double x) {
  if (!K->truncated) return lap_cdf(x);
  if (x <= -K->cut) return 0.0;
  const double v = (lap_cdf(x) - K->eps) / (1.0 - K->eps);
  return v > 0 ? v : 0.0;
}

/* sum_j G((s_j - s_piv) / alpha - u) over the m sorted candidates */
static double soft_count(const kernel *K, const double *s, int64_t m, double alpha, int64_t piv, double u) {
  double sum = 0;
  for (int64_t j = 0; j < m; ++j) sum += kernel_g(K, (s[j] - s[piv]) / alpha - u);
  return sum;
}

static uint64_t order_key(double v) {
  uint64_t u;
  memcpy(&u, &v, sizeof u);
  return (u >> 63) ? ~u : (u | 0x8000000000000000ull);
}

static double from_key(uint64_t k) {
  uint64_t u = (k >> 63) ? (k & 0x7fffffffffffffffull) : ~k;
  double v;
  memcpy(&v, &u, sizeof v);
  return v;
}

/* Solves sum_j G(x_j) = k with x_j = (s_j - s_piv) / alpha - u for descending candidates s[0..m),
 * 0 < k < m, by bisection over u in the ordered-bits space of doubles (so every binade gets
 * resolved), with the pivot at the candidate next to the solution so that x stays accurate for huge
 * scores. Writes x_j and p_j = G(x_j); returns the uncertainty of every p_j (the change of the soft
 * count across the final bracket), or -1 when the reference cannot be trusted (overflow). */
static double reference(const kernel *K, const double *s, int64_t m, double k, double alpha, double stop, double *x,
                        double *p, double *xunc) {
  for (int64_t j = 0; j < m; ++j)
    if (!isfinite((s[j] - s[0]) / alpha)) return -1;
  const double L = 1600.0; /* G(-L) = 0 and G(L) = 1 in double, for every eps */
  /* the soft count decreases as the threshold rises: C_i (threshold at s_i) increases with i */
  int64_t piv;
  double ulo, uhi; /* threshold (in units of alpha) = (s_piv / alpha) + u; count(ulo) >= k >= count(uhi) */
  if (soft_count(K, s, m, alpha, 0, 0.0) >= k) {
    piv = 0, ulo = 0.0, uhi = L; /* threshold at or above the best candidate */
  } else if (soft_count(K, s, m, alpha, m - 1, 0.0) <= k) {
    piv = m - 1, ulo = -L, uhi = 0.0; /* threshold at or below the worst candidate */
  } else {
    int64_t lo = 0, hi = m - 1; /* C_lo < k < C_hi */
    while (hi - lo > 1) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (soft_count(K, s, m, alpha, mid, 0.0) < k)
        lo = mid;
      else
        hi = mid;
    }
    /* the threshold lies between s_hi and s_lo: pivot on the nearer end of that gap */
    const double gap = (s[lo] - s[hi]) / alpha;
    if (soft_count(K, s, m, alpha, hi, 0.5 * gap) >= k)
      piv = lo, ulo = -0.5 * gap, uhi = 0.0;
    else
      piv = hi, ulo = 0.0, uhi = 0.5 * gap;
  }
  uint64_t klo = order_key(ulo), khi = order_key(uhi);
  double clo = soft_count(K, s, m, alpha, piv, ulo), chi = soft_count(K, s, m, alpha, piv, uhi);
  for (int it = 0; it < 80 && khi - klo > 1 && clo - chi > stop; ++it) {
    const uint64_t kmid = klo + (khi - klo) / 2;
    const double cm = soft_count(K, s, m, alpha, piv, from_key(kmid));
    if (cm >= k)
      klo = kmid, clo = cm;
    else
      khi = kmid, chi = cm;
  }
  const double u = fabs(clo - k) <= fabs(chi - k) ? from_key(klo) : from_key(khi);
  /* how well the threshold itself is pinned down (in units of alpha): wide where the count is flat,
   * e.g. an integer k in a huge gap, which does not move p but does move the gradient's weights */
  *xunc = from_key(khi) - from_key(klo);
  for (int64_t j = 0; j < m; ++j) {
    x[j] = (s[j] - s[piv]) / alpha - u;
    p[j] = kernel_g(K, x[j]);
  }
  return clo - chi;
}

/* ---- the row checks ----------------------------------------------------------------------------- */

typedef struct {
  int64_t m;            /* candidates */
  int64_t cand[MAX_E];  /* candidate indices, best first */
  double cval[MAX_E];   /* their scores (math type) */
  int bad_scores;       /* a NaN or +inf score */
  int expect_nan;
  int may_overflow;     /* float64: the threshold s - alpha * tau may pass the double range (then a NaN row) */
  double k, alpha;      /* math-type values */
  /* reference, when ok */
  int ref_ok;
  double ref_unc, ref_xunc; /* uncertainty of every p_ref, and of the threshold in units of alpha */
  double x[MAX_E], pref[MAX_E]; /* by candidate rank */
  double w[MAX_E];              /* phi_j / sum phi over the reference's active candidates */
  double keff;                  /* K' = k + nnz eps / (1 - eps) */
  double kxunc;                 /* the kernel's threshold uncertainty in units of alpha, u K' / density */
  double tb;                    /* bound on |tau|: |x| of the candidates next to the threshold */
} row_info;

static const double *sort_values; /* qsort has no context argument */

static int cmp_desc_index(const void *a, const void *b) {
  const int64_t i = *(const int64_t *)a, j = *(const int64_t *)b;
  if (sort_values[i] > sort_values[j]) return -1;
  if (sort_values[i] < sort_values[j]) return 1;
  return i < j ? -1 : (i > j);
}

/* by (score desc, index asc): the contract's candidate order */
static void sort_candidates(int64_t *idx, int64_t count, const double *v) {
  sort_values = v;
  qsort(idx, (size_t)count, sizeof *idx, cmp_desc_index);
}

static void analyse_row(const topk_case *c, const kernel *K, const double *sv, double k, double alpha, row_info *ri) {
  int64_t count = 0;
  static int64_t all[MAX_E];
  ri->bad_scores = 0;
  for (int64_t i = 0; i < c->n; ++i) {
    if (sv[i] != sv[i] || sv[i] == INFINITY) ri->bad_scores = 1;
    if (sv[i] > -INFINITY && sv[i] < INFINITY) all[count++] = i;
  }
  sort_candidates(all, count, sv);
  ri->m = count < c->max_active ? count : c->max_active;
  for (int64_t j = 0; j < ri->m; ++j) {
    ri->cand[j] = all[j];
    ri->cval[j] = sv[all[j]];
  }
  ri->k = k;
  ri->alpha = alpha;
  /* the contract: NaN row iff a NaN / +inf score, k outside [0, m] or alpha not in (0, inf); alpha
   * so small that 1 / alpha overflows the math type counts as out of range */
  int alpha_ok;
  if (c->f64)
    alpha_ok = alpha > 0 && alpha < INFINITY && 1.0 / alpha < INFINITY;
  else {
    const float af = (float)alpha;
    alpha_ok = af > 0 && af < INFINITY && 1.0f / af < INFINITY;
  }
  ri->expect_nan = ri->bad_scores || !alpha_ok || !(k >= 0 && k <= (double)ri->m);
  /* |tau| < 1024 for any float64 k (|ln k| <= 745 plus ln m): below this bound on alpha the
   * threshold stays finite; at or above it the row may be out of range (the contract's NaN row) */
  double top = 0;
  for (int64_t j = 0; j < ri->m; ++j) top = fmax(top, fabs(ri->cval[j]));
  ri->may_overflow = c->f64 && !ri->expect_nan && alpha * 1024 >= DBL_MAX - top;
  ri->ref_ok = 0;
  if (!ri->expect_nan && k > 0 && k < (double)ri->m) {
    const double stop = 1e-17 * k; /* relative: tiny k needs tiny p accurate too */
    ri->ref_unc = reference(K, ri->cval, ri->m, k, alpha, stop, ri->x, ri->pref, &ri->ref_xunc);
    ri->ref_ok = ri->ref_unc >= 0;
    if (ri->ref_ok) {
      double mu = INFINITY, z = 0;
      int64_t nnz = 0;
      for (int64_t j = 0; j < ri->m; ++j)
        if (ri->pref[j] > 0 || !K->truncated) mu = fmin(mu, fabs(ri->x[j]));
      for (int64_t j = 0; j < ri->m; ++j) {
        const int on = ri->pref[j] > 0 || !K->truncated;
        ri->w[j] = on ? exp(-(fabs(ri->x[j]) - mu)) : 0.0;
        z += ri->w[j];
        nnz += on;
      }
      for (int64_t j = 0; j < ri->m; ++j) ri->w[j] = z > 0 ? ri->w[j] / z : 0.0;
      /* the reference's own conditioning: its double count is only known to ~2^-53 (k + m), which
       * pins the threshold down only to that over the density sum_j phi_j = e^-mu z / 2 (an integer
       * k in a wide gap: every p is 0 or 1 in double, the count is flat, the threshold anywhere) */
      if (z > 0) ri->ref_xunc = fmax(ri->ref_xunc, 4 * 0x1p-53 * (fmax(1.0, k) + (double)ri->m) * exp(mu) / (0.5 * z));
      else ri->ref_xunc = INFINITY;
      ri->keff = k + (double)nnz * K->eps / (1.0 - K->eps);
      /* the kernel holds K' only to u K' in its math type (eps below u vanishes from k (1 - eps) +
       * nnz eps), which moves its threshold by that over the density e^-mu z / (2 (1 - eps)) */
      ri->kxunc = z > 0 ? (c->f64 ? 0x1p-53 : 0x1p-24) * ri->keff * 2.0 * (1.0 - K->eps) * exp(mu) / z : INFINITY;
      /* the kernel's pivot is one of the two candidates around the threshold, so |tau| <= tb */
      double above = INFINITY, below = INFINITY;
      for (int64_t j = 0; j < ri->m; ++j) {
        if (ri->x[j] > 0) above = fmin(above, ri->x[j]);
        else below = fmin(below, -ri->x[j]);
      }
      ri->tb = above < INFINITY && below < INFINITY ? fmax(above, below) : fmin(above, below);
    }
  }
}

static void check_forward_row(const topk_case *c, const kernel *K, const row_info *ri, const void *pbuf, int64_t row,
                              double threshold) {
  const int64_t n = c->n, base = row * n;
  const int f = c->f64;
  if (ri->expect_nan) {
    for (int64_t i = 0; i < n; ++i) {
      const double p = smoe_load_f64(pbuf, c->dt, base + i);
      CHECK(p != p, "row %lld: expected a NaN row (contract), p[%lld] = %g", (long long)row, (long long)i, p);
    }
    CHECK(threshold != threshold, "row %lld: expected threshold NaN, got %g", (long long)row, threshold);
    return;
  }
  static char is_cand[MAX_E];
  memset(is_cand, 0, (size_t)n);
  for (int64_t j = 0; j < ri->m; ++j) is_cand[ri->cand[j]] = 1;
  int64_t nnz = 0;
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double p = smoe_load_f64(pbuf, c->dt, base + i);
    CHECK(p >= 0 && p <= 1, "row %lld: p[%lld] = %g is outside [0, 1] (valid row)", (long long)row, (long long)i, p);
    CHECK(is_cand[i] || p == 0, "row %lld: p[%lld] = %g but %lld is not a candidate", (long long)row, (long long)i,
             p, (long long)i);
    nnz += p != 0;
    sum += p;
  }
  CHECK(nnz <= c->max_active, "row %lld: %lld nonzeros > max_active %lld", (long long)row, (long long)nnz,
           (long long)c->max_active);
  if (ri->k == 0) {
    CHECK(nnz == 0, "row %lld: k = 0 must give p = 0", (long long)row);
    CHECK(threshold == INFINITY, "row %lld: k = 0 must give threshold +inf, got %g", (long long)row, threshold);
    return;
  }
  if (ri->k == (double)ri->m) {
    for (int64_t j = 0; j < ri->m; ++j)
      CHECK(smoe_load_f64(pbuf, c->dt, base + ri->cand[j]) == 1, "row %lld: k = m must give p = 1 on candidate %lld",
               (long long)row, (long long)ri->cand[j]);
    CHECK(threshold == -INFINITY, "row %lld: k = m must give threshold -inf, got %g", (long long)row, threshold);
    return;
  }
  /* 0 < k < m */
  ST_INC(st_rows, f);
  CHECK(isfinite(threshold), "row %lld: 0 < k < m must give a finite threshold, got %g", (long long)row, threshold);
  const double su = fz_storage_u(c->dt), tiny = fz_storage_tiny(c->dt);
  const double um = f ? 0x1p-53 : 0x1p-24, epsr = K->eps / (1.0 - K->eps);
  const double sum_unit = um * (fmax(1.0, ri->k) + (double)nnz * epsr);
  const double tol_sum = C_SUM * sum_unit + 2 * su * ri->k + (double)n * tiny;
  CHECK(fabs(sum - ri->k) <= tol_sum, "row %lld: |sum p - k| = |%.17g - %.17g| = %.3g > %.3g", (long long)row, sum,
           ri->k, fabs(sum - ri->k), tol_sum);
  ST_MAX(st_sum, f, fabs(sum - ri->k) / sum_unit * (c->dt == SMOE_F32 || c->dt == SMOE_F64));
#ifdef FZ_DEBUG_DUMP
  fprintf(stderr, "row %lld before checks: k %.9g alpha %.9g m %lld threshold %.17g\n", (long long)row, ri->k,
          ri->alpha, (long long)ri->m, threshold);
  for (int64_t j = 0; j < ri->m; ++j)
    fprintf(stderr, "  cand %lld: score %.9g p %.9g\n", (long long)ri->cand[j], ri->cval[j],
            smoe_load_f64(pbuf, c->dt, base + ri->cand[j]));
#endif
  /* monotone in the score among candidates (exact: every step of the kernel is monotone) */
  for (int64_t j = 1; j < ri->m; ++j) {
    const double pa = smoe_load_f64(pbuf, c->dt, base + ri->cand[j - 1]), pb = smoe_load_f64(pbuf, c->dt, base + ri->cand[j]);
    CHECK(pa >= pb, "row %lld: p not monotone in the score: p[%lld] = %.9g < p[%lld] = %.9g", (long long)row,
             (long long)ri->cand[j - 1], pa, (long long)ri->cand[j], pb);
    if (ri->cval[j - 1] == ri->cval[j])
      CHECK(pa == pb, "row %lld: tied candidates %lld and %lld get different p", (long long)row,
               (long long)ri->cand[j - 1], (long long)ri->cand[j]);
  }
  /* exact zeros where the truncated kernel is 0, judged by the kernel's own threshold b: x_j =
   * (s_j - b) / alpha <= -c gives p_j = 0, x_j > -c gives p_j > 0 unless p_j underflows. The slack
   * is the float error of x_j = (s_j - s_piv) / alpha + tau, |tau| <= the |x| of the candidates
   * around b, plus the rounding of b itself (2^-53 |b| / alpha) and of c */
  if (K->truncated) {
    double above = INFINITY, below = INFINITY;
    for (int64_t j = 0; j < ri->m; ++j) {
      const double x = (ri->cval[j] - threshold) / ri->alpha;
      if (x > 0) above = fmin(above, x);
      else below = fmin(below, -x);
    }
    const double tb = above < INFINITY && below < INFINITY ? fmax(above, below) : fmin(above, below);
    const double slack = 16 * um * (1.0 + K->cut + 2 * tb) + 4 * 0x1p-53 * fabs(threshold) / ri->alpha;
    for (int64_t j = 0; j < ri->m; ++j) {
      const double p = smoe_load_f64(pbuf, c->dt, base + ri->cand[j]);
      const double x = (ri->cval[j] - threshold) / ri->alpha;
      CHECK(!(x <= -K->cut - slack) || p == 0,
               "row %lld: p[%lld] = %.9g but x = %.9g is below the cut -c = %.9g (must be exactly 0)", (long long)row,
               (long long)ri->cand[j], p, x, -K->cut);
    }
  }
  if (!ri->ref_ok) return;
  ST_INC(st_ref_rows, f);
#ifdef FZ_DEBUG_DUMP
  fprintf(stderr, "forward row %lld: k %.9g alpha %.9g m %lld threshold %.17g cut %.9g xunc %.3g\n", (long long)row,
          ri->k, ri->alpha, (long long)ri->m, threshold, K->cut, ri->ref_xunc);
  for (int64_t j = 0; j < ri->m; ++j)
    fprintf(stderr, "  cand %lld: score %.9g p %.9g p_ref %.9g x_ref %.9g\n", (long long)ri->cand[j], ri->cval[j],
            smoe_load_f64(pbuf, c->dt, base + ri->cand[j]), ri->pref[j], ri->x[j]);
#endif
  /* an ill-conditioned threshold (a flat count: an integer k in a wide gap) pins p only through the
   * sum check above. That holds for the reference's double count and for the kernel's own count in
   * its math type: with one candidate at x = 16 its p is 1 in float32, so for k within an ulp of 1
   * every threshold across the gap solves the float32 count, and a candidate at the far end of the
   * gap may sit just inside the cut (a p of 1e-10 where the reference gives 0) */
  if (!(ri->ref_xunc < 1e-3) || !(ri->kxunc < 1e-3)) return;
  ST_INC(st_ref_good, f);
  for (int64_t j = 0; j < ri->m; ++j) {
    const double p = smoe_load_f64(pbuf, c->dt, base + ri->cand[j]);
    const double err = fabs(p - ri->pref[j]);
    const double on = !K->truncated || ri->x[j] > -K->cut, phi = 0.5 * exp(-fabs(ri->x[j])) / (1.0 - K->eps);
    const double p_unit =
        um * (ri->pref[j] + epsr * on + mul0(phi, 1.0 + fabs(ri->x[j]) + ri->tb) + mul0(ri->w[j], ri->keff));
    const double floor_ = 64 * (f ? 0x1p-1074 : 0x1p-149); /* subnormal results */
    /* the reference's own threshold uncertainty (its count is known to ~2^-53 (k + m)) moves p_ref
     * along the density */
    const double tol_p = C_P * p_unit + ri->ref_unc + mul0(phi, ri->ref_xunc) + floor_;
    CHECK(err <= tol_p + 2 * su * ri->pref[j] + tiny,
             "row %lld: p[%lld] = %.9g but the reference gives %.9g (x = %.9g), error %.3g", (long long)row,
             (long long)ri->cand[j], p, ri->pref[j], ri->x[j], err);
    ST_MAX(st_p, f, fmax(0.0, err - ri->ref_unc - mul0(phi, ri->ref_xunc) - floor_) / p_unit * (c->dt == SMOE_F32 || c->dt == SMOE_F64));
  }
}

static void check_backward_row(const topk_case *c, const kernel *K, const row_info *ri, const void *sbuf,
                               const void *pbuf, const double *gp, const void *gbuf, int64_t row, double threshold,
                               double gk, double ga) {
  const int64_t n = c->n, base = row * n;
  const int f = c->f64;
  if (threshold != threshold) {
    for (int64_t i = 0; i < n; ++i)
      CHECK(smoe_load_f64(gbuf, c->dt, base + i) != smoe_load_f64(gbuf, c->dt, base + i),
               "row %lld: NaN row must get NaN gradients", (long long)row);
    CHECK(gk != gk && ga != ga, "row %lld: NaN row must get NaN grad_k / grad_alpha", (long long)row);
    return;
  }
  if (threshold == INFINITY || threshold == -INFINITY) {
    for (int64_t i = 0; i < n; ++i)
      CHECK(smoe_load_f64(gbuf, c->dt, base + i) == 0, "row %lld: a row at a limit (k = 0 or m) must get zero gradients",
               (long long)row);
    CHECK(gk == 0 && ga == 0, "row %lld: a row at a limit must get grad_k = grad_alpha = 0", (long long)row);
    return;
  }
  ST_INC(st_bwd_rows, f);
  const int every_finite = c->eps == 0 && c->max_active >= n;
  double gmin = INFINITY, gmax = -INFINITY, gabs = 0, sum = 0, sum_abs = 0, terms = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double r = smoe_load_f64(sbuf, c->dt, base + i);
    const int active = every_finite ? (r > -INFINITY && r < INFINITY) : smoe_load_f64(pbuf, c->dt, base + i) != 0;
    const double g = smoe_load_f64(gbuf, c->dt, base + i);
    CHECK(active || g == 0, "row %lld: grad_scores[%lld] = %g on an inactive entry", (long long)row, (long long)i, g);
    if (!active) continue;
    gmin = fmin(gmin, gp[base + i]);
    gmax = fmax(gmax, gp[base + i]);
    gabs = fmax(gabs, fabs(gp[base + i]));
    sum += g;
    sum_abs += fabs(g);
    /* the size of the terms phi_j / ((1 - eps) alpha) (grad_p_j - s) that cancel in the sum, with
     * x_j from the threshold as the kernel computes it */
    const double x = (r - threshold) / ri->alpha;
    terms += 0.5 * exp(-fabs(x)) / ((1.0 - K->eps) * ri->alpha) * (fabs(gp[base + i]) + fabs(gk));
  }
  /* the true gradient is at most 2 max|grad_p| / (2 (1 - eps) alpha) in size */
  const double bound = 2.0 * gabs * 0.5 / ((1.0 - K->eps) * ri->alpha);
  const double limit = fmin(fz_storage_max(c->dt), f ? DBL_MAX : (double)FLT_MAX) / 4;
  if (bound < limit) {
    for (int64_t i = 0; i < n; ++i)
      CHECK(isfinite(smoe_load_f64(gbuf, c->dt, base + i)), "row %lld: grad_scores[%lld] = %g is not finite",
               (long long)row, (long long)i, smoe_load_f64(gbuf, c->dt, base + i));
    CHECK(isfinite(gk), "row %lld: grad_k = %g is not finite", (long long)row, gk);
    CHECK(isfinite(ga), "row %lld: grad_alpha = %g is not finite (grad_scores finite)", (long long)row, ga);
    const double su = fz_storage_u(c->dt), tiny = fz_storage_tiny(c->dt);
    const double um = f ? 0x1p-53 : 0x1p-24;
    const double sub = 64 * (f ? 0x1p-1074 : 0x1p-149) * (1.0 + 2 * gabs) * (1.0 + 1.0 / ((1.0 - K->eps) * ri->alpha));
    const double tol = C_GSUM * um * terms + 2 * su * sum_abs + (double)n * (tiny + sub);
    CHECK(fabs(sum) <= tol, "row %lld: sum of grad_scores = %.3g, size of its terms %.3g (must be ~0)",
             (long long)row, sum, terms);
    if (um * terms > 1e3 * (double)n * (tiny + sub)) ST_MAX(st_gsum, f, fabs(sum) / (um * terms) * (c->dt == SMOE_F32 || c->dt == SMOE_F64));
    if (gmax >= gmin) {
      const double slack = (f ? 1e-12 : 1e-5) * gabs;
      CHECK(gk >= gmin - slack && gk <= gmax + slack,
               "row %lld: grad_k = %.9g is not a weighted mean of the active grad_p in [%.9g, %.9g]", (long long)row,
               gk, gmin, gmax);
    }
  }
  /* reference gradient: only where the kernel's double threshold pins x down to ~1e-7 */
  if (!ri->ref_ok || !(fabs(threshold) / ri->alpha < 1e8) || !(bound < limit) || !(ri->ref_xunc < 1e-3)) return;
  static double phi[MAX_E], gg[MAX_E], ax[MAX_E];
  static int64_t idx[MAX_E];
  int64_t count = 0;
  double mu = INFINITY;
  /* the reference's x by score index (non-candidates: from the threshold; they are only active in
   * the every-finite mode, where their x is far below the threshold) */
  for (int64_t i = 0; i < n; ++i) {
    const double r = smoe_load_f64(sbuf, c->dt, base + i);
    const int active = every_finite ? (r > -INFINITY && r < INFINITY) : smoe_load_f64(pbuf, c->dt, base + i) != 0;
    if (!active) continue;
    double x = (r - threshold) / ri->alpha;
    for (int64_t j = 0; j < ri->m; ++j)
      if (ri->cand[j] == i) x = ri->x[j];
    idx[count] = i;
    ax[count] = phi[count] = fabs(x);
    mu = fmin(mu, fabs(x));
    ++count;
  }
  if (count == 0) return;
  double Z = 0, gw = 0;
  for (int64_t j = 0; j < count; ++j) {
    phi[j] = exp(-(phi[j] - mu));
    Z += phi[j];
    gw += gp[base + idx[j]] * phi[j];
  }
  const double s = gw / Z, scale0 = 0.5 * exp(-mu) / ((1.0 - K->eps) * ri->alpha);
#ifdef FZ_DEBUG_DUMP
  fprintf(stderr, "reference row %lld: count %lld mu %.9g Z %.9g s %.9g scale0 %.9g xunc %.3g unc %.3g\n",
          (long long)row, (long long)count, mu, Z, s, scale0, ri->ref_xunc, ri->ref_unc);
  for (int64_t j = 0; j < ri->m; ++j)
    fprintf(stderr, "  cand %lld: score %.17g x_ref %.17g x_kernel %.17g p_ref %.17g\n", (long long)ri->cand[j],
            ri->cval[j], ri->x[j], (ri->cval[j] - threshold) / ri->alpha, ri->pref[j]);
  for (int64_t j = 0; j < count; ++j)
    fprintf(stderr, "  [%lld] w %.9g grad_p %.9g\n", (long long)idx[j], phi[j], gp[base + idx[j]]);
#endif
  double gscale = 0;
  for (int64_t j = 0; j < count; ++j) {
    gg[j] = scale0 * phi[j] * (gp[base + idx[j]] - s);
    gscale = fmax(gscale, scale0 * phi[j] * (fabs(gp[base + idx[j]]) + fabs(s)));
  }
  const double su = fz_storage_u(c->dt), tiny = fz_storage_tiny(c->dt);
  /* x is known to ~1e-7 (float) from the double threshold; phi'/phi = 1, so a relative error ~1e-6 */
  const double um = f ? 0x1p-53 : 0x1p-24;
  for (int64_t j = 0; j < count; ++j) {
    const double g = smoe_load_f64(gbuf, c->dt, base + idx[j]);
    const double err = fabs(g - gg[j]);
    const double gj = scale0 * phi[j] * (fabs(gp[base + idx[j]]) + fabs(s));
    const double cond = mul0(phi[j] / Z, ri->keff * (fabs(gp[base + idx[j]]) + fabs(s)) / ((1.0 - K->eps) * ri->alpha));
    /* the backward recovers x from the double threshold b: an absolute error of 2^-53 |b| / alpha */
    const double unit = um * (gscale + mul0(gj, 1.0 + ax[j] + ri->tb + 0x1p-53 / um * fabs(threshold) / ri->alpha) + cond) +
                        2 * gscale * ri->ref_xunc; /* the reference's own threshold uncertainty */
    /* subnormal range: the weight e^-(|x| - mu) underflows before it is multiplied by the scale
     * 1 / (2 (1 - eps) alpha) and by grad_p - s, so only an absolute accuracy is left there */
    const double floor_ = 64 * (f ? 0x1p-1074 : 0x1p-149) * (1.0 + fabs(gp[base + idx[j]]) + fabs(s)) *
                          (1.0 + 1.0 / ((1.0 - K->eps) * ri->alpha));
    const double tol = C_G * unit + floor_;
    CHECK(err <= tol + 2 * su * fabs(gg[j]) + tiny,
             "row %lld: grad_scores[%lld] = %.9g but the reference gives %.9g (scale %.3g)", (long long)row,
             (long long)idx[j], g, gg[j], gscale);
    if (unit > 0) ST_MAX(st_g, f, fmax(0.0, err - floor_) / unit * (c->dt == SMOE_F32 || c->dt == SMOE_F64));
  }
  /* grad_k is the mean of grad_p under the weights e^-|x_j|: a threshold off by dx reweights it by
   * e^(+-dx), moving it by up to 2 gabs dx */
  CHECK(fabs(gk - s) <= (f ? 1e-9 : 1e-4) * gabs + (4 * ri->ref_xunc + C_G * ri->kxunc) * gabs + 1e-30,
           "row %lld: grad_k = %.9g but the reference gives %.9g",
           (long long)row, gk, s);
}

/* ---- argument validation (cheap; exercises the SMOE_ERR_ARG paths) ------------------------------ */

static void check_bad_arguments(const smoe_topk_fwd_args *good, const smoe_topk_bwd_args *goodb, uint8_t which) {
  smoe_topk_fwd_args a = *good;
  smoe_topk_bwd_args b = *goodb;
  switch (which % 8) {
    case 0: a.eps = 0.5, b.eps = 0.5; break;
    case 1: a.eps = NAN, b.eps = -1e-300; break;
    case 2: a.max_active = 0, b.max_active = a.n + 1; break;
    case 3: a.max_active = a.n + 1, b.max_active = 0; break;
    case 4: a.dtype = (smoe_dtype)7, b.dtype = (smoe_dtype)-1; break;
    case 5: a.n = 0, b.n = -3; break;
    case 6: a.k_stride = -1, b.alpha_stride = -1; break;
    default: a.p = NULL, b.grad_scores = NULL; break;
  }
  CHECK(smoe_topk_fwd(&a, 0, 1) == SMOE_ERR_ARG,
           "forward accepted bad argument set %d", which % 8);
  CHECK(smoe_topk_bwd(&b, 0, 1) == SMOE_ERR_ARG, "backward accepted bad argument set %d", which % 8);
  CHECK(smoe_topk_fwd(good, 1, 0) == SMOE_ERR_ARG, "forward accepted row_begin > row_end");
  CHECK(smoe_topk_fwd(good, 0, good->rows + 1) == SMOE_ERR_ARG, "forward accepted row_end > rows");
}

/* ---- the target --------------------------------------------------------------------------------- */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
#ifdef FZ_STATS
  static int registered = 0;
  if (!registered) registered = 1, atexit(st_print);
#endif
  fz_reader rd = {data, size, 0};
  fz_reader *r = &rd;
  topk_case c;
  const uint8_t flags = fz_u8(r);
  c.dt = (smoe_dtype)(flags & 3);
  c.f64 = c.dt == SMOE_F64;
  c.k_per_row = (flags >> 2) & 1;
  c.alpha_per_row = (flags >> 3) & 1;
  c.backward = !((flags >> 4) & 1); /* on unless the bit is set */
  const int arg_checks = (flags >> 5) & 1;
  c.n = 1 + fz_u16(r) % MAX_E;
  c.rows = 1 + fz_u8(r) % MAX_ROWS;
  const uint16_t ma = fz_u16(r);
  c.max_active = ma >= 0x8000 ? c.n : 1 + ma % c.n; /* half the time uncapped */
  c.eps = decode_eps(r);
  c.split = fz_u8(r) % (c.rows + 1);

  const int64_t total = c.rows * c.n;
  double *sv_in = (double *)harness_alloc((size_t)total * sizeof(double));
  for (int64_t row = 0; row < c.rows; ++row) decode_row_scores(r, &c, sv_in + row * c.n);
  void *sbuf = harness_alloc((size_t)total * smoe_dtype_size(c.dt));
  double *sv = (double *)harness_alloc((size_t)total * sizeof(double)); /* the stored (= math) values */
  for (int64_t i = 0; i < total; ++i) {
    smoe_store_f64(sbuf, c.dt, i, sv_in[i]);
    sv[i] = smoe_load_f64(sbuf, c.dt, i);
  }

  kernel K;
  K.eps = to_math(&c, c.eps);
  K.truncated = K.eps > 0;
  K.cut = K.truncated ? -log(2.0 * K.eps) : INFINITY;

  /* per-row candidates first (k is decoded relative to m), then k and alpha */
  static row_info info[MAX_ROWS];
  double kv[MAX_ROWS], av[MAX_ROWS];
  int64_t m_of[MAX_ROWS];
  for (int64_t row = 0; row < c.rows; ++row) {
    int64_t cnt = 0;
    for (int64_t i = 0; i < c.n; ++i) cnt += sv[row * c.n + i] > -INFINITY && sv[row * c.n + i] < INFINITY;
    m_of[row] = cnt < c.max_active ? cnt : c.max_active;
  }
  const int64_t nk = c.k_per_row ? c.rows : 1, na = c.alpha_per_row ? c.rows : 1;
  for (int64_t i = 0; i < nk; ++i) kv[i] = to_math(&c, decode_k(r, &c, m_of[i]));
  for (int64_t i = 0; i < na; ++i) av[i] = to_math(&c, decode_alpha(r));
  double *gp = NULL;
  if (c.backward) {
    gp = (double *)harness_alloc((size_t)total * sizeof(double));
    for (int64_t row = 0; row < c.rows; ++row) decode_grad_row(r, c.n, gp + row * c.n);
  }
  const uint8_t bad_arg_set = fz_u8(r);

  snprintf(fz_case, sizeof fz_case,
           "dtype %s, E %lld, rows %lld, max_active %lld, eps %.17g, k%s %.17g, alpha%s %.17g, backward %d",
           fz_dtype_name(c.dt), (long long)c.n, (long long)c.rows, (long long)c.max_active, c.eps,
           c.k_per_row ? "[0]" : "", kv[0], c.alpha_per_row ? "[0]" : "", av[0], c.backward);

  /* math-type parameter buffers */
  const size_t mw = c.f64 ? sizeof(double) : sizeof(float);
  void *kbuf = harness_alloc((size_t)nk * mw), *abuf = harness_alloc((size_t)na * mw);
  for (int64_t i = 0; i < nk; ++i) {
    if (c.f64) ((double *)kbuf)[i] = kv[i];
    else ((float *)kbuf)[i] = (float)kv[i];
  }
  for (int64_t i = 0; i < na; ++i) {
    if (c.f64) ((double *)abuf)[i] = av[i];
    else ((float *)abuf)[i] = (float)av[i];
  }

  /* ---- forward: whole range, then split at c.split, then row by row: bit-identical ---- */
  void *p = harness_alloc((size_t)total * smoe_dtype_size(c.dt));
  void *p2 = harness_alloc((size_t)total * smoe_dtype_size(c.dt));
  double *thr = (double *)harness_alloc((size_t)c.rows * sizeof(double));
  double *thr2 = (double *)harness_alloc((size_t)c.rows * sizeof(double));
  smoe_topk_fwd_args fa;
  memset(&fa, 0, sizeof fa);
  fa.rows = c.rows;
  fa.n = c.n;
  fa.dtype = c.dt;
  fa.scores = sbuf;
  fa.k = kbuf;
  fa.k_stride = c.k_per_row;
  fa.alpha = abuf;
  fa.alpha_stride = c.alpha_per_row;
  fa.eps = c.eps;
  fa.max_active = c.max_active;
  fa.p = p;
  fa.threshold = thr;
  CHECK(smoe_topk_fwd(&fa, 0, c.rows) == SMOE_OK, "forward status");
  smoe_topk_fwd_args fb = fa;
  fb.p = p2;
  fb.threshold = thr2;
  CHECK(smoe_topk_fwd(&fb, 0, c.split) == SMOE_OK && smoe_topk_fwd(&fb, c.split, c.rows) == SMOE_OK,
           "split forward status");
  CHECK(memcmp(p, p2, (size_t)total * smoe_dtype_size(c.dt)) == 0 && memcmp(thr, thr2, (size_t)c.rows * 8) == 0,
           "forward differs when the rows are split at %lld", (long long)c.split);

  for (int64_t row = 0; row < c.rows; ++row) {
    analyse_row(&c, &K, sv + row * c.n, kv[c.k_per_row ? row : 0], av[c.alpha_per_row ? row : 0], &info[row]);
    if (info[row].may_overflow && thr[row] != thr[row]) info[row].expect_nan = 1; /* out of range, as allowed */
    check_forward_row(&c, &K, &info[row], p, row, thr[row]);
  }

  /* ---- backward ---- */
  if (c.backward) {
    void *gpbuf = harness_alloc((size_t)total * smoe_dtype_size(c.dt));
    double *gpv = (double *)harness_alloc((size_t)total * sizeof(double));
    for (int64_t i = 0; i < total; ++i) {
      smoe_store_f64(gpbuf, c.dt, i, gp[i]);
      gpv[i] = smoe_load_f64(gpbuf, c.dt, i);
    }
    void *gs = harness_alloc((size_t)total * smoe_dtype_size(c.dt)), *gs2 = harness_alloc((size_t)total * smoe_dtype_size(c.dt));
    void *gk = harness_alloc((size_t)c.rows * mw), *ga = harness_alloc((size_t)c.rows * mw);
    void *gk2 = harness_alloc((size_t)c.rows * mw), *ga2 = harness_alloc((size_t)c.rows * mw);
    smoe_topk_bwd_args ba;
    memset(&ba, 0, sizeof ba);
    ba.rows = c.rows;
    ba.n = c.n;
    ba.dtype = c.dt;
    ba.grad_p = gpbuf;
    ba.scores = sbuf;
    ba.p = p;
    ba.threshold = thr;
    ba.alpha = abuf;
    ba.alpha_stride = c.alpha_per_row;
    ba.eps = c.eps;
    ba.max_active = c.max_active;
    ba.grad_scores = gs;
    ba.grad_k_rows = gk;
    ba.grad_alpha_rows = ga;
    CHECK(smoe_topk_bwd(&ba, 0, c.rows) == SMOE_OK, "backward status");
    smoe_topk_bwd_args bb = ba;
    bb.grad_scores = gs2;
    bb.grad_k_rows = gk2;
    bb.grad_alpha_rows = ga2;
    CHECK(smoe_topk_bwd(&bb, 0, c.split) == SMOE_OK && smoe_topk_bwd(&bb, c.split, c.rows) == SMOE_OK,
             "split backward status");
    CHECK(memcmp(gs, gs2, (size_t)total * smoe_dtype_size(c.dt)) == 0 && memcmp(gk, gk2, (size_t)c.rows * mw) == 0 &&
                 memcmp(ga, ga2, (size_t)c.rows * mw) == 0,
             "backward differs when the rows are split at %lld", (long long)c.split);
    for (int64_t row = 0; row < c.rows; ++row) {
      const double gkr = c.f64 ? ((double *)gk)[row] : (double)((float *)gk)[row];
      const double gar = c.f64 ? ((double *)ga)[row] : (double)((float *)ga)[row];
#ifdef FZ_DEBUG_DUMP
      fprintf(stderr, "row %lld: threshold %.17g k %.9g alpha %.9g m %lld grad_k %.9g grad_alpha %.9g\n",
              (long long)row, thr[row], info[row].k, info[row].alpha, (long long)info[row].m, gkr, gar);
      for (int64_t i = 0; i < c.n; ++i)
        if (smoe_load_f64(p, c.dt, row * c.n + i) != 0 || smoe_load_f64(gs, c.dt, row * c.n + i) != 0)
          fprintf(stderr, "  [%lld] score %.9g p %.9g grad_p %.9g grad %.9g\n", (long long)i, sv[row * c.n + i],
                  smoe_load_f64(p, c.dt, row * c.n + i), gpv[row * c.n + i], smoe_load_f64(gs, c.dt, row * c.n + i));
#endif
      check_backward_row(&c, &K, &info[row], sbuf, p, gpv, gs, row, thr[row], gkr, gar);
    }
    if (arg_checks) check_bad_arguments(&fa, &ba, bad_arg_set);
    free(gpbuf);
    free(gpv);
    free(gs);
    free(gs2);
    free(gk);
    free(ga);
    free(gk2);
    free(ga2);
  }

  free(sv_in);
  free(sbuf);
  free(sv);
  free(gp);
  free(kbuf);
  free(abuf);
  free(p);
  free(p2);
  free(thr);
  free(thr2);
  return 0;
}
