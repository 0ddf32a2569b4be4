/* libFuzzer target: truncated dispatch (smoe_dispatch_plan and its three passes, smoe_gather_rows,
 * smoe_combine_rows with and without weights, smoe_combine_bwd).
 *
 * Decodes T in 0..64 tokens, E in 1..512 experts, M in [1, E], d in 0..8 features, the storage
 * dtypes of p and of the features, a chunk size, and routing weights p that are either given entry
 * by entry (+0, -0.0, NaN, +-inf, subnormals that a 16-bit dtype flushes), random sparse, or the
 * output of the soft top-k itself (truncated: eps > 0, max_active = M; or dense: eps = 0). Checks
 * the plan against its definition in csrc/core/softmoe.h, chunking independence, and gather /
 * combine / combine-backward bit for bit against a straightforward reimplementation of the
 * arithmetic contract of route_row.h. In "corrupt" mode it scribbles on the index arrays and checks
 * that the kernels report SMOE_ERR_ARG exactly when an index is out of range and never touch
 * memory out of bounds (ASan). See README.md.
 */
#include "fuzz_common.h"

#define MAX_T 64
#define MAX_E 512
#define MAX_D 8

typedef struct {
  int64_t T, E, M, P, d, chunk;
  smoe_dtype pdt, xdt;
  int mode, corrupt;
} dcase;

/* ---- inputs ------------------------------------------------------------------------------------ */

static double p_code(uint8_t code) {
  if (code < 96) return 0.0;
  if (code < 112) return -0.0;
  if (code < 120) return NAN;
  if (code < 128) return (code & 1) ? -INFINITY : INFINITY;
  if (code < 136) {
    /* tiny values: some are flushed to zero by a 16-bit (or f32) store, which must then not route */
    const double tiny[8] = {1e-45, 1e-40, 5.96e-8, 1e-8, 1e-300, 3e-39, 1e-310, 6e-5};
    return tiny[code - 128];
  }
  return (code - 135) / 120.0;
}

/* Fills p [T, E] (storage dtype c->pdt) per the decoded mode. */
static void make_p(fz_reader *r, const dcase *c, void *p) {
  const int64_t TE = c->T * c->E;
  if (c->mode == 0) {
    for (int64_t i = 0; i < TE; ++i) smoe_store_f64(p, c->pdt, i, p_code(fz_u8(r)));
    return;
  }
  if (c->mode == 2) { /* random sparse */
    fz_rng g = {fz_u32(r)};
    const double density = fz_u8(r) / 255.0;
    for (int64_t i = 0; i < TE; ++i) {
      double v = 0.0;
      if (fz_rng_unit(&g) < density) v = (fz_rng_next(&g) % 16 == 0) ? p_code((uint8_t)(96 + fz_rng_next(&g) % 40)) : fz_rng_unit(&g);
      smoe_store_f64(p, c->pdt, i, v);
    }
    return;
  }
  /* modes 1 and 3: the soft top-k of normal scores, truncated (eps > 0, max_active = M) or dense */
  fz_rng g = {fz_u32(r)};
  const uint8_t kb = fz_u8(r), eb = fz_u8(r);
  const int dense = c->mode == 3;
  const int64_t cap = dense ? c->E : c->M;
  const double eps_table[8] = {1e-1, 1e-2, 1e-3, 1e-6, 0.3, 0.49, 1e-12, 0.2};
  const double eps = dense ? 0.0 : eps_table[eb % 8];
  const double k = (kb + 1.0) / 257.0 * (double)cap; /* in (0, cap) */
  if (TE == 0) return;
  void *scores = harness_alloc((size_t)TE * smoe_dtype_size(c->pdt));
  for (int64_t i = 0; i < TE; ++i) smoe_store_f64(scores, c->pdt, i, fz_rng_normal(&g) * (1 + (eb >> 4)));
  const int f64 = c->pdt == SMOE_F64;
  const double kd = k, ad = 1.0;
  const float kf = (float)k, af = 1.0f;
  double *thr = (double *)harness_alloc((size_t)c->T * sizeof(double));
  smoe_topk_fwd_args a;
  memset(&a, 0, sizeof a);
  a.rows = c->T;
  a.n = c->E;
  a.dtype = c->pdt;
  a.scores = scores;
  a.k = f64 ? (const void *)&kd : (const void *)&kf;
  a.alpha = f64 ? (const void *)&ad : (const void *)&af;
  a.eps = eps;
  a.max_active = cap;
  a.p = p;
  a.threshold = thr;
  CHECK(smoe_topk_fwd(&a, 0, c->T) == SMOE_OK, "soft top-k status");
  /* soft_topk(..., max_active = M) never produces more than M nonzeros: the plan routes them all */
  if (!dense)
    for (int64_t t = 0; t < c->T; ++t) {
      int64_t nz = 0;
      for (int64_t e = 0; e < c->E; ++e) nz += smoe_load_f64(p, c->pdt, t * c->E + e) != 0;
      CHECK(nz <= c->M, "soft top-k row %lld has %lld nonzeros > max_active %lld", (long long)t, (long long)nz,
               (long long)c->M);
    }
  free(scores);
  free(thr);
}

/* Feature values: normal, with rare specials (NaN, +-inf, -0.0, subnormal). */
static void fill_values(fz_rng *g, void *buf, smoe_dtype dt, int64_t n, int specials) {
  for (int64_t i = 0; i < n; ++i) {
    double v = fz_rng_normal(g);
    if (specials && fz_rng_next(g) % 32 == 0) {
      const double sp[6] = {NAN, INFINITY, -INFINITY, -0.0, 1e-40, 7e4};
      v = sp[fz_rng_next(g) % 6];
    }
    smoe_store_f64(buf, dt, i, v);
  }
}

/* ---- plan definition check ---------------------------------------------------------------------- */

static void check_plan_definition(const dcase *c, const plan_t *pl, const void *p) {
  const int64_t T = c->T, E = c->E, M = c->M, P = c->P;
  char *kept = (char *)harness_calloc((size_t)(T * E));
  char *seen = (char *)harness_calloc((size_t)(T * E));
  int64_t N = 0;
  for (int64_t t = 0; t < T; ++t) {
    int64_t m = 0;
    /* active iff != 0 as stored: NaN is active, -0.0 is not; first M in expert order */
    for (int64_t e = 0; e < E && m < M; ++e)
      if (smoe_load_f64(p, c->pdt, t * E + e) != 0.0) kept[t * E + e] = 1, ++m;
    N += m;
  }
  CHECK(pl->offsets[0] == 0, "offsets[0] = %lld", (long long)pl->offsets[0]);
  CHECK(pl->offsets[E] == N, "offsets[E] = %lld but %lld pairs are routed", (long long)pl->offsets[E],
           (long long)N);
  for (int64_t e = 0; e < E; ++e) {
    int64_t count = 0;
    for (int64_t t = 0; t < T; ++t) count += kept[t * E + e];
    CHECK(pl->offsets[e + 1] - pl->offsets[e] == count, "expert %lld: offsets give %lld tokens, %lld routed",
             (long long)e, (long long)(pl->offsets[e + 1] - pl->offsets[e]), (long long)count);
  }
  for (int64_t s = 0; s < P; ++s) {
    const int64_t t = pl->pair_token[s], e = pl->pair_expert[s];
    if (s >= N) {
      CHECK(t == -1 && e == -1, "padding slot %lld holds (%lld, %lld), not -1", (long long)s, (long long)t,
               (long long)e);
      continue;
    }
    CHECK(t >= 0 && t < T && e >= 0 && e < E, "slot %lld: pair (%lld, %lld) out of range", (long long)s,
             (long long)t, (long long)e);
    CHECK(pl->offsets[e] <= s && s < pl->offsets[e + 1], "slot %lld of expert %lld outside its segment",
             (long long)s, (long long)e);
    CHECK(kept[t * E + e], "slot %lld routes (%lld, %lld), which is not an active pair", (long long)s, (long long)t,
             (long long)e);
    CHECK(!seen[t * E + e], "pair (%lld, %lld) appears twice", (long long)t, (long long)e);
    seen[t * E + e] = 1;
    if (s > 0) {
      const int64_t pt = pl->pair_token[s - 1], pe = pl->pair_expert[s - 1];
      CHECK(pe < e || (pe == e && pt < t), "slots %lld, %lld not sorted by (expert, token)", (long long)(s - 1),
               (long long)s);
    }
  }
  for (int64_t i = 0; i < T * E; ++i)
    CHECK(seen[i] == kept[i], "active pair (%lld, %lld) is missing from the plan", (long long)(i / E),
             (long long)(i % E));
  for (int64_t t = 0; t < T; ++t) {
    int64_t m = 0, last_e = -1;
    for (int64_t e = 0; e < E; ++e) m += kept[t * E + e];
    for (int64_t j = 0; j < M; ++j) {
      const int64_t s = pl->token_pairs[t * M + j];
      if (j >= m) {
        CHECK(s == -1, "token_pairs[%lld, %lld] = %lld, expected -1 padding", (long long)t, (long long)j,
                 (long long)s);
        continue;
      }
      CHECK(s >= 0 && s < N, "token_pairs[%lld, %lld] = %lld is not a routed slot", (long long)t, (long long)j,
               (long long)s);
      CHECK(pl->pair_token[s] == t, "token_pairs[%lld, %lld] = %lld belongs to token %lld", (long long)t,
               (long long)j, (long long)s, (long long)pl->pair_token[s]);
      CHECK(pl->pair_expert[s] > last_e, "token_pairs[%lld] not in increasing expert order", (long long)t);
      last_e = pl->pair_expert[s];
    }
  }
  free(kept);
  free(seen);
}

/* ---- reference arithmetic (route_row.h's contract) --------------------------------------------- */

static int bits_equal_value(const void *a, const void *b, smoe_dtype dt, int64_t i) {
  return fz_same_value(smoe_load_f64(a, dt, i), smoe_load_f64(b, dt, i));
}

/* One step of the math type: float unless f64. */
#define MATH_MUL_ADD(f64, acc, w, v) ((f64) ? ((acc) + (w) * (v)) : (double)((float)(acc) + (float)(w) * (float)(v)))

static double math_round(int f64, double v) { return f64 ? v : (double)(float)v; }

/* a + b in the math type (float arithmetic itself: rounding the double sum could round twice) */
static double math_add(int f64, double a, double b) { return f64 ? a + b : (double)((float)a + (float)b); }

static void ref_combine(const dcase *c, const void *ys, const void *p, const plan_t *pl, void *y) {
  const int f64 = c->xdt == SMOE_F64 || (p && c->pdt == SMOE_F64);
  for (int64_t t = 0; t < c->T; ++t)
    for (int64_t f = 0; f < c->d; ++f) {
      double acc = 0;
      for (int64_t j = 0; j < c->M; ++j) {
        const int64_t s = pl->token_pairs[t * c->M + j];
        if (s < 0) continue;
        const double w = p ? math_round(f64, smoe_load_f64(p, c->pdt, t * c->E + pl->pair_expert[s])) : 1.0;
        acc = MATH_MUL_ADD(f64, acc, w, math_round(f64, smoe_load_f64(ys, c->xdt, s * c->d + f)));
      }
      smoe_store_f64(y, c->xdt, t * c->d + f, acc);
    }
}

/* the fixed-order 32-lane dot product */
static double ref_dot(int f64, const void *a, const void *b, smoe_dtype dt, int64_t aoff, int64_t boff, int64_t d) {
  double lane[32];
  for (int l = 0; l < 32; ++l) lane[l] = 0;
  for (int64_t f = 0; f < d; ++f)
    lane[f % 32] = MATH_MUL_ADD(f64, lane[f % 32], math_round(f64, smoe_load_f64(a, dt, aoff + f)),
                                math_round(f64, smoe_load_f64(b, dt, boff + f)));
  for (int w = 16; w > 0; w /= 2)
    for (int l = 0; l < w; ++l) lane[l] = math_add(f64, lane[l], lane[l + w]);
  return lane[0];
}

/* ---- corrupt-index mode --------------------------------------------------------------------------- */

static int64_t scribble_value(fz_reader *r, const dcase *c) {
  const uint8_t code = fz_u8(r);
  switch (code % 10) {
    case 0: return -2;
    case 1: return -1;
    case 2: return c->T;
    case 3: return c->P;
    case 4: return c->E;
    case 5: return INT64_MIN;
    case 6: return INT64_MAX;
    case 7: return c->P + (code >> 4);
    default: return c->P > 0 ? (int64_t)(fz_u16(r) % (uint64_t)c->P) : 0; /* in range, inconsistent */
  }
}

static void corrupt_run(fz_reader *r, const dcase *c, const plan_t *good, const void *p, const void *x,
                        const void *ys, const void *gy) {
  if (c->P == 0) return;
  plan_t pl = plan_alloc(c->T, c->E, c->M);
  memcpy(pl.pair_token, good->pair_token, (size_t)c->P * sizeof(int64_t));
  memcpy(pl.pair_expert, good->pair_expert, (size_t)c->P * sizeof(int64_t));
  memcpy(pl.token_pairs, good->token_pairs, (size_t)c->P * sizeof(int64_t));
  memcpy(pl.offsets, good->offsets, (size_t)(c->E + 1) * sizeof(int64_t));
  const int edits = 1 + fz_u8(r) % 8;
  for (int i = 0; i < edits; ++i) {
    const uint8_t which = fz_u8(r) % 3;
    const int64_t at = fz_u16(r) % c->P;
    const int64_t v = scribble_value(r, c);
    if (which == 0) pl.pair_token[at] = v;
    if (which == 1) pl.pair_expert[at] = v;
    if (which == 2) pl.token_pairs[at] = v;
  }
  snprintf(fz_case + strlen(fz_case), sizeof fz_case - strlen(fz_case), ", corrupted with %d edits", edits);
  /* expected statuses, straight from the header's rules */
  int bad_gather = 0, bad_combine = 0, bad_combine_nop = 0, bad_pair_token = 0;
  for (int64_t s = 0; s < c->P; ++s) {
    const int64_t t = pl.pair_token[s];
    if (!(t >= -1 && t < c->T)) bad_gather = bad_pair_token = 1;
  }
  for (int64_t i = 0; i < c->P; ++i) {
    const int64_t s = pl.token_pairs[i];
    if (s == -1) continue;
    if (s < 0 || s >= c->P) {
      bad_combine = bad_combine_nop = 1;
      continue;
    }
    const int64_t e = pl.pair_expert[s];
    if (e < 0 || e >= c->E) bad_combine = 1;
  }
  const size_t xe = smoe_dtype_size(c->xdt);
  void *xs = harness_alloc((size_t)(c->P * c->d) * xe), *y = harness_alloc((size_t)(c->T * c->d) * xe);
  void *gys = harness_alloc((size_t)(c->P * c->d) * xe), *gp = harness_alloc((size_t)(c->T * c->E) * smoe_dtype_size(c->pdt));
  smoe_gather_args ga = {c->T, c->P, c->d, c->xdt, x, pl.pair_token, xs};
  const smoe_status sg = smoe_gather_rows(&ga, 0, c->P);
  if (c->d > 0)
    CHECK(sg == (bad_gather ? SMOE_ERR_ARG : SMOE_OK), "gather with corrupt pair_token: status %d, expected %d",
             (int)sg, bad_gather);
  smoe_combine_args ca = {c->T, c->E, c->M, c->d, c->xdt, ys, c->pdt, p, pl.pair_expert, pl.token_pairs, y, c->P};
  const smoe_status sc = smoe_combine_rows(&ca, 0, c->T);
  CHECK(sc == (bad_combine ? SMOE_ERR_ARG : SMOE_OK), "combine with corrupt indices: status %d, expected %d",
           (int)sc, bad_combine);
  smoe_combine_args cn = {c->T, c->E, c->M, c->d, c->xdt, ys, c->pdt, NULL, NULL, pl.token_pairs, y, c->P};
  const smoe_status sn = smoe_combine_rows(&cn, 0, c->T);
  CHECK(sn == (bad_combine_nop ? SMOE_ERR_ARG : SMOE_OK),
           "combine without p, corrupt token_pairs: status %d, expected %d", (int)sn, bad_combine_nop);
  smoe_combine_bwd_args ba = {c->T,  c->E, c->M,          c->d,           c->xdt,         gy, ys,
                              c->pdt, p,    pl.pair_token, pl.pair_expert, pl.token_pairs, gys, gp, c->P};
  const smoe_status sb = smoe_combine_bwd(&ba, 0, c->T);
  const int bad_bwd = bad_combine || bad_pair_token;
  CHECK(sb == (bad_bwd ? SMOE_ERR_ARG : SMOE_OK), "combine backward with corrupt indices: status %d, expected %d",
           (int)sb, bad_bwd);

  /* the place pass with corrupted scan results: must stay in bounds and flag what it cannot place */
  plan_t pl2 = plan_alloc(c->T, c->E, c->M);
  smoe_plan_args a = plan_args(&pl2, c->pdt, p);
  int64_t *counts = (int64_t *)harness_alloc((size_t)c->E * sizeof(int64_t));
  CHECK(smoe_plan_count(&a, 0, c->T, counts) == SMOE_OK, "count status");
  CHECK(smoe_plan_scan(&a, 1, counts) == SMOE_OK, "scan status");
  const uint8_t how = fz_u8(r);
  if (how & 1) counts[fz_u16(r) % c->E] += (int64_t)(fz_u8(r) % 5) - 2;
  if (how & 2) pl2.token_pairs[fz_u16(r) % c->P] = scribble_value(r, c);
  if (how & 4) pl2.offsets[c->E] = scribble_value(r, c);
  const smoe_status sp = smoe_plan_place(&a, 0, c->T, counts);
  if (pl2.offsets[c->E] < 0 || pl2.offsets[c->E] > c->P)
    CHECK(sp == SMOE_ERR_ARG, "place accepted offsets[E] = %lld outside [0, %lld]", (long long)pl2.offsets[c->E],
             (long long)c->P);
  else
    CHECK(sp == SMOE_OK || sp == SMOE_ERR_ARG, "place status %d", (int)sp);
  free(counts);
  plan_free(&pl2);
  free(xs);
  free(y);
  free(gys);
  free(gp);
  plan_free(&pl);
}

/* ---- argument validation -------------------------------------------------------------------------- */

static void check_bad_arguments(const dcase *c, plan_t *pl, const void *p) {
  smoe_plan_args a = plan_args(pl, c->pdt, p);
  smoe_plan_args b = a;
  b.experts = 0;
  CHECK(smoe_dispatch_plan(&b, 1) == SMOE_ERR_ARG, "plan accepted E = 0");
  b = a, b.max_active = c->E + 1;
  CHECK(smoe_dispatch_plan(&b, 1) == SMOE_ERR_ARG, "plan accepted M > E");
  b = a, b.max_active = 0;
  CHECK(smoe_dispatch_plan(&b, 1) == SMOE_ERR_ARG, "plan accepted M = 0");
  b = a, b.tokens = -1;
  CHECK(smoe_dispatch_plan(&b, 1) == SMOE_ERR_ARG, "plan accepted T < 0");
  b = a, b.dtype = (smoe_dtype)9;
  CHECK(smoe_dispatch_plan(&b, 1) == SMOE_ERR_ARG, "plan accepted a bad dtype");
  CHECK(smoe_dispatch_plan(&a, 0) == SMOE_ERR_ARG, "plan accepted chunk = 0");
  b = a, b.offsets = NULL;
  CHECK(smoe_dispatch_plan(&b, 1) == SMOE_ERR_ARG, "plan accepted offsets = NULL");
  b = a, b.tokens = INT64_MAX / 2, b.experts = 4, b.max_active = 2;
  CHECK(smoe_plan_count(&b, 0, 1, pl->offsets) == SMOE_ERR_ARG, "plan accepted T * E overflowing int64");
  if (c->T > 0) {
    b = a, b.p = NULL;
    CHECK(smoe_dispatch_plan(&b, 1) == SMOE_ERR_ARG, "plan accepted p = NULL");
    CHECK(smoe_plan_count(&a, 1, 0, pl->offsets) == SMOE_ERR_ARG, "count accepted begin > end");
    CHECK(smoe_plan_count(&a, 0, c->T + 1, pl->offsets) == SMOE_ERR_ARG, "count accepted end > T");
  }
}

/* ---- the target ----------------------------------------------------------------------------------- */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  fz_reader rd = {data, size, 0};
  fz_reader *r = &rd;
  dcase c;
  const uint8_t flags = fz_u8(r);
  c.pdt = (smoe_dtype)(flags & 3);
  c.xdt = (smoe_dtype)((flags >> 2) & 3);
  c.mode = (flags >> 4) & 3;
  c.corrupt = (flags >> 6) & 1;
  const int arg_checks = (flags >> 7) & 1;
  c.T = fz_u8(r) % (MAX_T + 1);
  c.E = 1 + fz_u16(r) % MAX_E;
  c.M = 1 + fz_u16(r) % c.E;
  c.d = fz_u8(r) % (MAX_D + 1);
  c.chunk = 1 + fz_u8(r) % (c.T + 1);
  c.P = c.T * c.M;
  snprintf(fz_case, sizeof fz_case, "p %s, features %s, T %lld, E %lld, M %lld, d %lld, mode %d, chunk %lld",
           fz_dtype_name(c.pdt), fz_dtype_name(c.xdt), (long long)c.T, (long long)c.E, (long long)c.M,
           (long long)c.d, c.mode, (long long)c.chunk);

  void *p = harness_alloc((size_t)(c.T * c.E) * smoe_dtype_size(c.pdt));
  make_p(r, &c, p);
  fz_rng g = {fz_u32(r)};
  const size_t xe = smoe_dtype_size(c.xdt);
  void *x = harness_alloc((size_t)(c.T * c.d) * xe), *ys = harness_alloc((size_t)(c.P * c.d) * xe);
  void *gy = harness_alloc((size_t)(c.T * c.d) * xe);
  fill_values(&g, x, c.xdt, c.T * c.d, 1);
  fill_values(&g, ys, c.xdt, c.P * c.d, 1);
  fill_values(&g, gy, c.xdt, c.T * c.d, 1);

  /* ---- the plan: definition, and independence of the chunking ---- */
  plan_t pl = plan_alloc(c.T, c.E, c.M);
  smoe_plan_args a = plan_args(&pl, c.pdt, p);
  CHECK(smoe_dispatch_plan(&a, c.chunk) == SMOE_OK, "plan status");
  check_plan_definition(&c, &pl, p);
  {
    const int64_t chunks_to_try[2] = {1, c.T > 0 ? c.T : 1};
    for (int i = 0; i < 2; ++i) {
      plan_t q = plan_alloc(c.T, c.E, c.M);
      smoe_plan_args b = plan_args(&q, c.pdt, p);
      CHECK(smoe_dispatch_plan(&b, chunks_to_try[i]) == SMOE_OK, "plan status (chunk %lld)",
               (long long)chunks_to_try[i]);
      CHECK(plan_equal(&q, &pl), "plan with chunk %lld differs from chunk %lld", (long long)chunks_to_try[i],
               (long long)c.chunk);
      plan_free(&q);
    }
    /* the passes as a thread pool may run them: chunks in reverse order */
    const int64_t ch = c.chunk, chunks = (c.T + ch - 1) / ch;
    plan_t q = plan_alloc(c.T, c.E, c.M);
    smoe_plan_args b = plan_args(&q, c.pdt, p);
    int64_t *counts = (int64_t *)harness_alloc((size_t)(chunks * c.E) * sizeof(int64_t));
    for (int64_t k = chunks - 1; k >= 0; --k)
      CHECK(smoe_plan_count(&b, k * ch, (k + 1) * ch < c.T ? (k + 1) * ch : c.T, counts + k * c.E) == SMOE_OK,
               "count pass status");
    CHECK(smoe_plan_scan(&b, chunks, counts) == SMOE_OK, "scan pass status");
    for (int64_t k = chunks - 1; k >= 0; --k)
      CHECK(smoe_plan_place(&b, k * ch, (k + 1) * ch < c.T ? (k + 1) * ch : c.T, counts + k * c.E) == SMOE_OK,
               "place pass status");
    CHECK(plan_equal(&q, &pl), "reverse-order passes differ from the one-call plan");
    free(counts);
    plan_free(&q);
  }

  /* ---- gather ---- */
  void *xs = harness_alloc((size_t)(c.P * c.d) * xe), *xs2 = harness_alloc((size_t)(c.P * c.d) * xe);
  smoe_gather_args ga = {c.T, c.P, c.d, c.xdt, x, pl.pair_token, xs};
  CHECK(smoe_gather_rows(&ga, 0, c.P) == SMOE_OK, "gather status");
  const int64_t N = pl.offsets[c.E];
  for (int64_t s = 0; s < c.P; ++s)
    for (int64_t f = 0; f < c.d; ++f) {
      if (s < N)
        CHECK(memcmp((char *)xs + (size_t)(s * c.d + f) * xe, (char *)x + (size_t)(pl.pair_token[s] * c.d + f) * xe,
                        xe) == 0,
                 "xs[%lld, %lld] is not a bit copy of x[%lld, %lld]", (long long)s, (long long)f,
                 (long long)pl.pair_token[s], (long long)f);
      else {
        static const uint8_t zero[8] = {0};
        CHECK(memcmp((char *)xs + (size_t)(s * c.d + f) * xe, zero, xe) == 0, "padding row %lld of xs is not +0",
                 (long long)s);
      }
    }
  ga.xs = xs2;
  const int64_t slot_split = c.P > 0 ? (int64_t)(fz_u16(r) % (uint64_t)(c.P + 1)) : 0;
  CHECK(smoe_gather_rows(&ga, 0, slot_split) == SMOE_OK && smoe_gather_rows(&ga, slot_split, c.P) == SMOE_OK,
           "split gather status");
  CHECK(memcmp(xs, xs2, (size_t)(c.P * c.d) * xe) == 0, "gather differs when split at slot %lld",
           (long long)slot_split);

  /* ---- combine with p, without p (the backward of gather), and its backward ---- */
  const int64_t tok_split = (int64_t)(fz_u8(r) % (uint64_t)(c.T + 1));
  void *y = harness_alloc((size_t)(c.T * c.d) * xe), *y2 = harness_alloc((size_t)(c.T * c.d) * xe);
  void *yref = harness_alloc((size_t)(c.T * c.d) * xe);
  for (int with_p = 0; with_p < 2; ++with_p) {
    smoe_combine_args ca = {c.T,   c.E,          c.M,           c.d, c.xdt, ys, c.pdt, with_p ? p : NULL,
                            pl.pair_expert, pl.token_pairs, y,    c.P};
    CHECK(smoe_combine_rows(&ca, 0, c.T) == SMOE_OK, "combine status (with p: %d)", with_p);
    ref_combine(&c, ys, with_p ? p : NULL, &pl, yref);
    for (int64_t i = 0; i < c.T * c.d; ++i)
      CHECK(bits_equal_value(y, yref, c.xdt, i), "combine (with p: %d) y[%lld] = %.9g, reference %.9g", with_p,
               (long long)i, smoe_load_f64(y, c.xdt, i), smoe_load_f64(yref, c.xdt, i));
    ca.y = y2;
    CHECK(smoe_combine_rows(&ca, 0, tok_split) == SMOE_OK && smoe_combine_rows(&ca, tok_split, c.T) == SMOE_OK,
             "split combine status");
    CHECK(memcmp(y, y2, (size_t)(c.T * c.d) * xe) == 0, "combine differs when split at token %lld",
             (long long)tok_split);
    /* over the routed prefix only (slots = N, the eager layer's trimmed buffers): the same bytes */
    ca.slots = N;
    CHECK(smoe_combine_rows(&ca, 0, c.T) == SMOE_OK, "combine status over the routed prefix");
    CHECK(memcmp(y, y2, (size_t)(c.T * c.d) * xe) == 0, "combine over the routed prefix differs (with p: %d)",
             with_p);
  }
  {
    const size_t pe = smoe_dtype_size(c.pdt);
    void *gys = harness_alloc((size_t)(c.P * c.d) * xe), *gp = harness_alloc((size_t)(c.T * c.E) * pe);
    void *gys2 = harness_alloc((size_t)(c.P * c.d) * xe), *gp2 = harness_alloc((size_t)(c.T * c.E) * pe);
    memset(gys, 0x5a, (size_t)(c.P * c.d) * xe); /* poison: every element must be written */
    memset(gp, 0x5a, (size_t)(c.T * c.E) * pe);
    smoe_combine_bwd_args ba = {c.T,  c.E, c.M,          c.d,            c.xdt,          gy, ys,
                                c.pdt, p,   pl.pair_token, pl.pair_expert, pl.token_pairs, gys, gp, c.P};
    CHECK(smoe_combine_bwd(&ba, 0, c.T) == SMOE_OK, "combine backward status");
    const int f64 = c.xdt == SMOE_F64 || c.pdt == SMOE_F64;
    char *routed = (char *)harness_calloc((size_t)(c.T * c.E));
    for (int64_t s = 0; s < c.P; ++s) {
      const int64_t t = pl.pair_token[s];
      if (t < 0) {
        static const uint8_t zero[8] = {0};
        for (int64_t f = 0; f < c.d; ++f)
          CHECK(memcmp((char *)gys + (size_t)(s * c.d + f) * xe, zero, xe) == 0,
                   "padding row %lld of grad_ys is not +0", (long long)s);
        continue;
      }
      const int64_t e = pl.pair_expert[s];
      routed[t * c.E + e] = 1;
      const double w = math_round(f64, smoe_load_f64(p, c.pdt, t * c.E + e));
      double one[1]; /* one element of any storage dtype, rounded as the kernels store it */
      for (int64_t f = 0; f < c.d; ++f) {
        const double want = math_round(f64, w * math_round(f64, smoe_load_f64(gy, c.xdt, t * c.d + f)));
        smoe_store_f64(one, c.xdt, 0, want);
        CHECK(fz_same_value(smoe_load_f64(gys, c.xdt, s * c.d + f), smoe_load_f64(one, c.xdt, 0)),
                 "grad_ys[%lld, %lld] = %.9g, reference %.9g", (long long)s, (long long)f,
                 smoe_load_f64(gys, c.xdt, s * c.d + f), smoe_load_f64(one, c.xdt, 0));
      }
      const double dot = ref_dot(f64, gy, ys, c.xdt, t * c.d, s * c.d, c.d);
      smoe_store_f64(one, c.pdt, 0, dot);
      CHECK(fz_same_value(smoe_load_f64(gp, c.pdt, t * c.E + e), smoe_load_f64(one, c.pdt, 0)),
               "grad_p[%lld, %lld] = %.9g, reference %.9g", (long long)t, (long long)e, smoe_load_f64(gp, c.pdt, t * c.E + e),
               smoe_load_f64(one, c.pdt, 0));
    }
    for (int64_t i = 0; i < c.T * c.E; ++i) {
      if (routed[i]) continue;
      static const uint8_t zero[8] = {0};
      CHECK(memcmp((char *)gp + (size_t)i * pe, zero, pe) == 0, "grad_p[%lld, %lld] is not +0 off the plan",
               (long long)(i / c.E), (long long)(i % c.E));
    }
    ba.grad_ys = gys2;
    ba.grad_p = gp2;
    CHECK(smoe_combine_bwd(&ba, 0, tok_split) == SMOE_OK && smoe_combine_bwd(&ba, tok_split, c.T) == SMOE_OK,
             "split combine backward status");
    CHECK(memcmp(gys, gys2, (size_t)(c.P * c.d) * xe) == 0 && memcmp(gp, gp2, (size_t)(c.T * c.E) * pe) == 0,
             "combine backward differs when split at token %lld", (long long)tok_split);
    memset(gys2, 0x5a, (size_t)(c.P * c.d) * xe);
    ba.slots = N;
    CHECK(smoe_combine_bwd(&ba, 0, c.T) == SMOE_OK, "combine backward status over the routed prefix");
    CHECK(memcmp(gys, gys2, (size_t)(N * c.d) * xe) == 0 && memcmp(gp, gp2, (size_t)(c.T * c.E) * pe) == 0,
             "combine backward over the routed prefix differs");
    free(routed);
    free(gys);
    free(gp);
    free(gys2);
    free(gp2);
  }

  if (c.corrupt) corrupt_run(r, &c, &pl, p, x, ys, gy);
  if (arg_checks) check_bad_arguments(&c, &pl, p);

  free(p);
  free(x);
  free(ys);
  free(gy);
  free(xs);
  free(xs2);
  free(y);
  free(y2);
  free(yref);
  plan_free(&pl);
  return 0;
}
