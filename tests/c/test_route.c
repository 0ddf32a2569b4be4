/* C-only tests of the truncated dispatch (route.c, route_row.h): no torch, run under ASan/UBSan by
 * `make ctest`. The plan is checked against its definition on hand-made and random inputs, gather
 * and combine against naive loops in double, the CPU row functions against the element functions
 * the CUDA kernels run (bit for bit), and every result against itself under other chunkings. */
#include <math.h>

#include "harness.h"

#define SMOE_SUFFIX f32
#include "core/route_row.h"
#undef SMOE_SUFFIX
#define SMOE_SUFFIX f64
#include "core/route_row.h"
#undef SMOE_SUFFIX

/* ---- small helpers ---------------------------------------------------------------------------- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng_next(void) { /* xorshift64* */
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 0x2545f4914f6cdd1dull;
}
static double rng_unit(void) { return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0); }
static double rng_normal(void) { /* sum of uniforms: plenty for test data */
  double s = 0;
  for (int i = 0; i < 12; ++i) s += rng_unit();
  return s - 6.0;
}

static double get(const void *b, smoe_dtype dt, int64_t i) { return smoe_load_f64(b, dt, i); }

/* Checks a plan against its definition, for p given in double (the values as stored). */
static void check_plan_definition(const plan_t *pl, const double *p, const char *what) {
  const int64_t T = pl->T, E = pl->E, M = pl->M, P = pl->P;
  /* kept[t * E + e]: the first M nonzero entries of each row */
  char *kept = (char *)calloc((size_t)(T * E + 1), 1);
  int64_t N = 0;
  for (int64_t t = 0; t < T; ++t) {
    int64_t m = 0;
    for (int64_t e = 0; e < E && m < M; ++e)
      if (p[t * E + e] != 0.0) {
        kept[t * E + e] = 1;
        ++m;
      }
    N += m;
  }
  CHECK(pl->offsets[0] == 0 && pl->offsets[E] == N, "%s: offsets[0] = %lld, offsets[E] = %lld, N = %lld", what,
        (long long)pl->offsets[0], (long long)pl->offsets[E], (long long)N);
  for (int64_t e = 0; e < E; ++e) {
    int64_t count = 0;
    for (int64_t t = 0; t < T; ++t) count += kept[t * E + e];
    CHECK(pl->offsets[e + 1] - pl->offsets[e] == count, "%s: count of expert %lld", what, (long long)e);
  }
  /* routed slots: sorted by (expert, token), inside their expert's segment, each kept pair once */
  char *seen = (char *)calloc((size_t)(T * E + 1), 1);
  int ok_sorted = 1, ok_seg = 1, ok_once = 1, ok_pad = 1, ok_back = 1;
  for (int64_t s = 0; s < P; ++s) {
    const int64_t t = pl->pair_token[s], e = pl->pair_expert[s];
    if (s >= N) {
      ok_pad &= t == -1 && e == -1;
      continue;
    }
    if (!(t >= 0 && t < T && e >= 0 && e < E)) {
      ok_seg = 0;
      continue;
    }
    ok_seg &= pl->offsets[e] <= s && s < pl->offsets[e + 1];
    ok_once &= kept[t * E + e] && !seen[t * E + e];
    seen[t * E + e] = 1;
    if (s > 0) {
      const int64_t pt = pl->pair_token[s - 1], pe = pl->pair_expert[s - 1];
      ok_sorted &= pe < e || (pe == e && pt < t);
    }
    /* the slot is listed in its token's row */
    int found = 0;
    for (int64_t j = 0; j < M; ++j) found += pl->token_pairs[t * M + j] == s;
    ok_back &= found == 1;
  }
  for (int64_t i = 0; i < T * E; ++i) ok_once &= seen[i] == kept[i];
  CHECK(ok_sorted, "%s: routed slots sorted by (expert, token)", what);
  CHECK(ok_seg, "%s: slots inside their expert's segment", what);
  CHECK(ok_once, "%s: every kept pair exactly once, nothing else", what);
  CHECK(ok_pad, "%s: padding slots are -1", what);
  CHECK(ok_back, "%s: every routed slot listed once in token_pairs", what);
  /* token_pairs rows: routed slots of the token in increasing expert order, then -1 */
  int ok_rows = 1;
  for (int64_t t = 0; t < T; ++t) {
    int64_t m = 0, last_e = -1;
    for (int64_t e = 0; e < E; ++e) m += kept[t * E + e];
    for (int64_t j = 0; j < M; ++j) {
      const int64_t s = pl->token_pairs[t * M + j];
      if (j >= m) {
        ok_rows &= s == -1;
        continue;
      }
      if (!(s >= 0 && s < N)) {
        ok_rows = 0;
        continue;
      }
      ok_rows &= pl->pair_token[s] == t && pl->pair_expert[s] > last_e;
      last_e = pl->pair_expert[s];
    }
  }
  CHECK(ok_rows, "%s: token_pairs rows", what);
  free(kept);
  free(seen);
}

/* Builds the plan of p (given in double, stored as dt) with chunk sizes 1, 3, 7, T and T + 5 and
 * with the three passes run chunk by chunk in reverse order; all must agree and be correct. */
static void check_plan(smoe_dtype dt, const double *p_in, int64_t T, int64_t E, int64_t M, const char *what) {
  void *p = harness_buffer(dt, p_in, T * E);
  double *pv = (double *)malloc((size_t)(T * E + 1) * sizeof(double));
  for (int64_t i = 0; i < T * E; ++i) pv[i] = get(p, dt, i);
  plan_t ref = plan_alloc(T, E, M);
  smoe_plan_args a = plan_args(&ref, dt, p);
  CHECK(smoe_dispatch_plan(&a, T > 0 ? T : 1) == SMOE_OK, "%s: whole plan status", what);
  check_plan_definition(&ref, pv, what);
  const int64_t chunk_sizes[4] = {1, 3, 7, T + 5};
  for (int c = 0; c < 4; ++c) {
    plan_t pl = plan_alloc(T, E, M);
    smoe_plan_args b = plan_args(&pl, dt, p);
    CHECK(smoe_dispatch_plan(&b, chunk_sizes[c]) == SMOE_OK, "%s: chunked plan status", what);
    CHECK(plan_equal(&pl, &ref), "%s: chunk %lld differs from the whole plan", what, (long long)chunk_sizes[c]);
    plan_free(&pl);
  }
  /* the passes as a thread pool may run them: chunks of 5 tokens, in reverse order */
  {
    const int64_t chunk = 5, chunks = (T + chunk - 1) / chunk;
    plan_t pl = plan_alloc(T, E, M);
    smoe_plan_args b = plan_args(&pl, dt, p);
    int64_t *counts = (int64_t *)malloc((size_t)(chunks * E + 1) * sizeof(int64_t));
    int ok = 1;
    for (int64_t c = chunks - 1; c >= 0; --c)
      ok &= smoe_plan_count(&b, c * chunk, c * chunk + chunk < T ? c * chunk + chunk : T, counts + c * E) == SMOE_OK;
    ok &= smoe_plan_scan(&b, chunks, counts) == SMOE_OK;
    for (int64_t c = chunks - 1; c >= 0; --c)
      ok &= smoe_plan_place(&b, c * chunk, c * chunk + chunk < T ? c * chunk + chunk : T, counts + c * E) == SMOE_OK;
    CHECK(ok, "%s: pass statuses", what);
    CHECK(plan_equal(&pl, &ref), "%s: reverse-order passes differ from the whole plan", what);
    free(counts);
    plan_free(&pl);
  }
  plan_free(&ref);
  free(pv);
  free(p);
}

/* ---- plan tests -------------------------------------------------------------------------------- */

static void test_plan_hand_made(void) {
  /* T = 5, E = 4, M = 2. Row 0: experts 1, 3. Row 1: empty. Row 2: four actives (keeps 0, 1).
   * Row 3: NaN at 2 (active) and -0.0 at 0 (not). Row 4: expert 3 only. */
  const double p[20] = {0, 0.5, 0, 0.25, /**/ 0, 0, 0, 0, /**/ 0.1, 0.2, 0.3, 0.4,
                        -0.0, 0, NAN, 0, /**/ 0, 0, 0, 1e-300};
  plan_t pl = plan_alloc(5, 4, 2);
  void *pf = harness_buffer(SMOE_F64, p, 20);
  smoe_plan_args a = plan_args(&pl, SMOE_F64, pf);
  CHECK(smoe_dispatch_plan(&a, 2) == SMOE_OK, "status");
  /* pairs sorted by (expert, token): (0: t2) (1: t0, t2) (2: t3) (3: t0, t4) -> N = 6 */
  const int64_t off[5] = {0, 1, 3, 4, 6};
  const int64_t pt[10] = {2, 0, 2, 3, 0, 4, -1, -1, -1, -1};
  const int64_t pe[10] = {0, 1, 1, 2, 3, 3, -1, -1, -1, -1};
  const int64_t tp[10] = {1, 4, -1, -1, 0, 2, 3, -1, 5, -1};
  CHECK(memcmp(pl.offsets, off, sizeof off) == 0, "offsets");
  CHECK(memcmp(pl.pair_token, pt, sizeof pt) == 0, "pair_token");
  CHECK(memcmp(pl.pair_expert, pe, sizeof pe) == 0, "pair_expert");
  CHECK(memcmp(pl.token_pairs, tp, sizeof tp) == 0, "token_pairs");
  /* a tiny f64 weight must not be flushed to zero by a float comparison */
  CHECK(pl.pair_token[5] == 4, "1e-300 is active in f64");
  plan_free(&pl);
  free(pf);
  check_plan(SMOE_F64, p, 5, 4, 2, "hand-made f64");
  check_plan(SMOE_F32, p, 5, 4, 2, "hand-made f32 (1e-300 rounds to 0)");
  check_plan(SMOE_BF16, p, 5, 4, 4, "hand-made bf16, M = E");
}

static void test_plan_edges(void) {
  double zeros[24], ones[24];
  for (int i = 0; i < 24; ++i) {
    zeros[i] = 0.0;
    ones[i] = 1.0;
  }
  check_plan(SMOE_F32, zeros, 6, 4, 3, "all-zero p");
  check_plan(SMOE_F32, ones, 6, 4, 3, "all-active p, truncated to M");
  check_plan(SMOE_F16, ones, 24, 1, 1, "E = 1 all active");
  check_plan(SMOE_F16, zeros, 24, 1, 1, "E = 1 all zero");
  check_plan(SMOE_F32, NULL, 0, 4, 2, "T = 0");
  {
    plan_t pl = plan_alloc(6, 4, 3);
    smoe_plan_args a = plan_args(&pl, SMOE_F32, NULL);
    void *pf = harness_buffer(SMOE_F32, zeros, 24);
    a.p = pf;
    CHECK(smoe_dispatch_plan(&a, 4) == SMOE_OK, "all-zero status");
    int ok = pl.offsets[4] == 0;
    for (int64_t s = 0; s < 18; ++s) ok &= pl.pair_token[s] == -1 && pl.token_pairs[s] == -1;
    CHECK(ok, "all-zero p gives an empty plan");
    plan_free(&pl);
    free(pf);
  }
  {
    plan_t pl = plan_alloc(0, 3, 2);
    smoe_plan_args a = plan_args(&pl, SMOE_F32, NULL);
    a.pair_token = a.pair_expert = a.token_pairs = NULL;
    CHECK(smoe_dispatch_plan(&a, 1) == SMOE_OK, "T = 0 status");
    CHECK(pl.offsets[0] == 0 && pl.offsets[3] == 0, "T = 0 offsets are zero");
    plan_free(&pl);
  }
}

static void test_plan_random(void) {
  const smoe_dtype dts[4] = {SMOE_F32, SMOE_F64, SMOE_BF16, SMOE_F16};
  const int64_t shapes[][3] = {{1, 1, 1}, {37, 8, 2}, {64, 16, 4}, {50, 5, 5}, {129, 32, 8}, {200, 3, 1}};
  const double density[4] = {0.0, 0.15, 0.5, 1.0};
  for (int si = 0; si < 6; ++si)
    for (int di = 0; di < 4; ++di) {
      const int64_t T = shapes[si][0], E = shapes[si][1], M = shapes[si][2];
      double *p = (double *)malloc((size_t)(T * E) * sizeof(double));
      for (int64_t i = 0; i < T * E; ++i) p[i] = rng_unit() < density[di] ? rng_unit() + 0.01 : 0.0;
      /* some empty rows and some rows with more than M actives */
      for (int64_t t = 0; t < T; t += 7)
        for (int64_t e = 0; e < E; ++e) p[t * E + e] = 0.0;
      for (int64_t t = 3; t < T; t += 11)
        for (int64_t e = 0; e < E; ++e) p[t * E + e] = 0.5;
      char what[96];
      snprintf(what, sizeof what, "random T=%lld E=%lld M=%lld density=%.2f dtype=%d", (long long)T, (long long)E,
               (long long)M, density[di], (int)dts[(si + di) % 4]);
      check_plan(dts[(si + di) % 4], p, T, E, M, what);
      free(p);
    }
}

/* ---- gather / combine ------------------------------------------------------------------------- */

/* A random p [T, E] with exactly-zero entries (each row up to M + 1 actives) and its plan. */
static double *random_p(int64_t T, int64_t E, int64_t M) {
  double *p = (double *)malloc((size_t)(T * E) * sizeof(double));
  for (int64_t i = 0; i < T * E; ++i) p[i] = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t n = (int64_t)(rng_next() % (uint64_t)(M + 2)); /* 0 .. M + 1 actives */
    for (int64_t k = 0; k < n; ++k) p[t * E + (int64_t)(rng_next() % (uint64_t)E)] = rng_unit() + 0.05;
  }
  return p;
}

static void test_gather_combine(smoe_dtype dt, smoe_dtype pdt) {
  const int64_t T = 23, E = 6, M = 3, P = T * M, d = 37;
  double *pv = random_p(T, E, M);
  void *p = harness_buffer(pdt, pv, T * E);
  for (int64_t i = 0; i < T * E; ++i) pv[i] = get(p, pdt, i);
  plan_t pl = plan_alloc(T, E, M);
  smoe_plan_args pa = plan_args(&pl, pdt, p);
  CHECK(smoe_dispatch_plan(&pa, 4) == SMOE_OK, "plan status");
  const int f64 = dt == SMOE_F64 || pdt == SMOE_F64;
  const double tol = dt == SMOE_F64 ? 1e-12 : (dt == SMOE_F32 ? 1e-5 : 2e-2); /* the storage rounds */

  double *xv = (double *)malloc((size_t)(T * d) * sizeof(double));
  double *ysv = (double *)malloc((size_t)(P * d) * sizeof(double));
  double *gyv = (double *)malloc((size_t)(T * d) * sizeof(double));
  for (int64_t i = 0; i < T * d; ++i) xv[i] = rng_normal();
  for (int64_t i = 0; i < P * d; ++i) ysv[i] = rng_normal();
  for (int64_t i = 0; i < T * d; ++i) gyv[i] = rng_normal();
  void *x = harness_buffer(dt, xv, T * d), *ys = harness_buffer(dt, ysv, P * d), *gy = harness_buffer(dt, gyv, T * d);
  for (int64_t i = 0; i < T * d; ++i) xv[i] = get(x, dt, i), gyv[i] = get(gy, dt, i);
  for (int64_t i = 0; i < P * d; ++i) ysv[i] = get(ys, dt, i);
  const size_t es = smoe_dtype_size(dt);

  /* gather: a bit copy, zero padding rows; chunked calls give the same bytes */
  void *xs = malloc((size_t)(P * d) * es), *xs2 = malloc((size_t)(P * d) * es);
  smoe_gather_args ga;
  memset(&ga, 0, sizeof ga);
  ga.tokens = T;
  ga.slots = P;
  ga.d = d;
  ga.dtype = dt;
  ga.x = x;
  ga.pair_token = pl.pair_token;
  ga.xs = xs;
  CHECK(smoe_gather_rows(&ga, 0, P) == SMOE_OK, "gather status");
  int ok = 1;
  for (int64_t s = 0; s < P; ++s) {
    const int64_t t = pl.pair_token[s];
    for (int64_t f = 0; f < d; ++f) {
      const double want = t >= 0 ? xv[t * d + f] : 0.0;
      ok &= get(xs, dt, s * d + f) == want;
    }
  }
  CHECK(ok, "gather values (dtype %d)", (int)dt);
  ga.xs = xs2;
  for (int64_t s = 0; s < P; s += 5) CHECK(smoe_gather_rows(&ga, s, s + 5 < P ? s + 5 : P) == SMOE_OK, "gather");
  CHECK(memcmp(xs, xs2, (size_t)(P * d) * es) == 0, "gather chunked == whole");

  /* combine vs a naive double loop over the dense p */
  void *y = malloc((size_t)(T * d) * es), *y2 = malloc((size_t)(T * d) * es);
  smoe_combine_args ca;
  memset(&ca, 0, sizeof ca);
  ca.tokens = T;
  ca.experts = E;
  ca.max_active = M;
  ca.d = d;
  ca.ys_dtype = dt;
  ca.ys = ys;
  ca.p_dtype = pdt;
  ca.p = p;
  ca.pair_expert = pl.pair_expert;
  ca.token_pairs = pl.token_pairs;
  ca.y = y;
  ca.slots = P;
  CHECK(smoe_combine_rows(&ca, 0, T) == SMOE_OK, "combine status");
  double err = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t f = 0; f < d; ++f) {
      double want = 0;
      for (int64_t s = 0; s < pl.offsets[E]; ++s)
        if (pl.pair_token[s] == t) want += pv[t * E + pl.pair_expert[s]] * ysv[s * d + f];
      const double diff = fabs(get(y, dt, t * d + f) - want) / (1.0 + fabs(want));
      err = diff > err ? diff : err;
    }
  CHECK(err <= tol, "combine values (dtype %d, p dtype %d): rel err %g", (int)dt, (int)pdt, err);
  ca.y = y2;
  for (int64_t t = T - 1; t >= 0; --t) CHECK(smoe_combine_rows(&ca, t, t + 1) == SMOE_OK, "combine");
  CHECK(memcmp(y, y2, (size_t)(T * d) * es) == 0, "combine per token == whole");

  /* CPU row function == GPU element function, bit for bit */
  ok = 1;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t f = 0; f < d; ++f) {
      int bad = 0;
      unsigned char one[8];
      if (f64)
        smoe_store_f64(one, dt, 0, smoe_route_combine_elem_f64(&ca, t, f, &bad));
      else
        smoe_store_f32(one, dt, 0, smoe_route_combine_elem_f32(&ca, t, f, &bad));
      ok &= memcmp(one, (const char *)y + (size_t)(t * d + f) * es, es) == 0;
      ok &= !bad;
    }
  CHECK(ok, "combine row == element functions bit for bit (dtype %d)", (int)dt);

  /* gather's backward: combine with unit weights = sum of grad rows per token */
  ca.p = NULL;
  ca.ys = xs; /* any [P, d] buffer */
  ca.y = y;
  CHECK(smoe_combine_rows(&ca, 0, T) == SMOE_OK, "unit combine status");
  err = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t f = 0; f < d; ++f) {
      double want = 0;
      for (int64_t j = 0; j < M; ++j)
        if (pl.token_pairs[t * M + j] >= 0) want += get(xs, dt, pl.token_pairs[t * M + j] * d + f);
      const double diff = fabs(get(y, dt, t * d + f) - want) / (1.0 + fabs(want));
      err = diff > err ? diff : err;
    }
  CHECK(err <= tol, "unit-weight combine (gather backward): rel err %g", err);

  /* combine backward vs naive loops */
  void *gys = malloc((size_t)(P * d) * es), *gys2 = malloc((size_t)(P * d) * es);
  void *gp = malloc((size_t)(T * E) * smoe_dtype_size(pdt)), *gp2 = malloc((size_t)(T * E) * smoe_dtype_size(pdt));
  memset(gys, 0x7f, (size_t)(P * d) * es); /* poison */
  memset(gp, 0x7f, (size_t)(T * E) * smoe_dtype_size(pdt));
  smoe_combine_bwd_args ba;
  memset(&ba, 0, sizeof ba);
  ba.tokens = T;
  ba.experts = E;
  ba.max_active = M;
  ba.d = d;
  ba.ys_dtype = dt;
  ba.grad_y = gy;
  ba.ys = ys;
  ba.p_dtype = pdt;
  ba.p = p;
  ba.pair_token = pl.pair_token;
  ba.pair_expert = pl.pair_expert;
  ba.token_pairs = pl.token_pairs;
  ba.grad_ys = gys;
  ba.grad_p = gp;
  ba.slots = P;
  CHECK(smoe_combine_bwd(&ba, 0, T) == SMOE_OK, "combine bwd status");
  double err_ys = 0, err_p = 0;
  int exact_ys = 1;
  for (int64_t s = 0; s < P; ++s) {
    const int64_t t = pl.pair_token[s];
    for (int64_t f = 0; f < d; ++f) {
      const double want = t >= 0 ? pv[t * E + pl.pair_expert[s]] * gyv[t * d + f] : 0.0;
      const double diff = fabs(get(gys, dt, s * d + f) - want) / (1.0 + fabs(want));
      err_ys = diff > err_ys ? diff : err_ys;
      /* bit-identical to the element formula the GPU runs: one multiply, one rounding */
      unsigned char one[8];
      if (t >= 0) { /* grad_ys_kernel's element function */
        if (f64)
          smoe_route_scale_elem_f64(one, 0, smoe_load_f64(p, pdt, t * E + pl.pair_expert[s]), gy, t * d + f, dt);
        else
          smoe_route_scale_elem_f32(one, 0, smoe_load_f32(p, pdt, t * E + pl.pair_expert[s]), gy, t * d + f, dt);
      } else {
        memset(one, 0, 8);
      }
      exact_ys &= memcmp(one, (const char *)gys + (size_t)(s * d + f) * es, es) == 0;
    }
  }
  for (int64_t t = 0; t < T; ++t)
    for (int64_t e = 0; e < E; ++e) {
      double want = 0;
      int routed = 0;
      for (int64_t s = 0; s < pl.offsets[E]; ++s)
        if (pl.pair_token[s] == t && pl.pair_expert[s] == e) {
          routed = 1;
          for (int64_t f = 0; f < d; ++f) want += gyv[t * d + f] * ysv[s * d + f];
        }
      const double got = get(gp, pdt, t * E + e);
      if (!routed) CHECK(got == 0.0, "grad_p of a pair that is not routed is 0 (t %lld e %lld)", (long long)t, (long long)e);
      const double diff = fabs(got - want) / (1.0 + fabs(want));
      err_p = diff > err_p ? diff : err_p;
      /* the CPU dot == 32 GPU lanes + the shuffle tree */
      if (routed) {
        int64_t s = -1;
        for (int64_t j = 0; j < M; ++j)
          if (pl.token_pairs[t * M + j] >= 0 && pl.pair_expert[pl.token_pairs[t * M + j]] == e) s = pl.token_pairs[t * M + j];
        unsigned char one[8];
        if (f64) {
          double lane[SMOE_ROUTE_LANES];
          for (int l = 0; l < SMOE_ROUTE_LANES; ++l) lane[l] = smoe_route_dot_lane_f64(gy, ys, dt, t * d, s * d, d, l);
          for (int w = 16; w > 0; w /= 2)
            for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
          smoe_store_f64(one, pdt, 0, lane[0]);
        } else {
          float lane[SMOE_ROUTE_LANES];
          for (int l = 0; l < SMOE_ROUTE_LANES; ++l) lane[l] = smoe_route_dot_lane_f32(gy, ys, dt, t * d, s * d, d, l);
          for (int w = 16; w > 0; w /= 2)
            for (int l = 0; l < w; ++l) lane[l] += lane[l + w];
          smoe_store_f32(one, pdt, 0, lane[0]);
        }
        CHECK(memcmp(one, (const char *)gp + (size_t)(t * E + e) * smoe_dtype_size(pdt), smoe_dtype_size(pdt)) == 0,
              "dot == lane functions + tree bit for bit (t %lld e %lld)", (long long)t, (long long)e);
      }
    }
  const double tol_p = (dt == SMOE_F64 && pdt == SMOE_F64) ? 1e-12 : (dt != SMOE_BF16 && dt != SMOE_F16 && pdt != SMOE_BF16 && pdt != SMOE_F16 ? 1e-5 : 3e-2);
  CHECK(err_ys <= tol, "grad_ys values: rel err %g", err_ys);
  CHECK(exact_ys, "grad_ys bit-identical to the element formula (dtype %d)", (int)dt);
  CHECK(err_p <= tol_p * sqrt((double)d), "grad_p values: rel err %g", err_p);
  /* chunked backward is bit-identical */
  ba.grad_ys = gys2;
  ba.grad_p = gp2;
  for (int64_t t = 0; t < T; t += 4) CHECK(smoe_combine_bwd(&ba, t, t + 4 < T ? t + 4 : T) == SMOE_OK, "bwd chunk");
  CHECK(memcmp(gys, gys2, (size_t)(P * d) * es) == 0 && memcmp(gp, gp2, (size_t)(T * E) * smoe_dtype_size(pdt)) == 0,
        "combine bwd chunked == whole");

  /* The routed prefix only (S = N slots, what an eager caller passes after trimming): the same
   * bytes for the N routed rows, y and grad_p; S > P and a token_pairs index >= S are rejected. */
  const int64_t N = pl.offsets[E];
  memset(xs2, 0x7f, (size_t)(P * d) * es);
  ga.xs = xs2;
  ga.slots = N;
  CHECK(smoe_gather_rows(&ga, 0, N) == SMOE_OK, "gather, routed prefix");
  CHECK(memcmp(xs, xs2, (size_t)(N * d) * es) == 0, "gather of the routed prefix == its rows of the whole");
  ca.p = p;
  ca.ys = ys;
  ca.y = y2;
  ca.slots = N;
  CHECK(smoe_combine_rows(&ca, 0, T) == SMOE_OK, "combine, routed prefix");
  ca.y = y;
  ca.slots = P;
  CHECK(smoe_combine_rows(&ca, 0, T) == SMOE_OK, "combine, all slots");
  CHECK(memcmp(y, y2, (size_t)(T * d) * es) == 0, "combine over the routed prefix == over all slots");
  ca.slots = P + 1;
  CHECK(smoe_combine_rows(&ca, 0, T) == SMOE_ERR_ARG, "combine with slots > tokens * max_active");
  if (N > 0) {
    ca.slots = N - 1;
    CHECK(smoe_combine_rows(&ca, 0, T) == SMOE_ERR_ARG, "combine with a token_pairs slot >= slots");
  }
  memset(gys2, 0x7f, (size_t)(P * d) * es);
  memset(gp2, 0x7f, (size_t)(T * E) * smoe_dtype_size(pdt));
  ba.slots = N;
  CHECK(smoe_combine_bwd(&ba, 0, T) == SMOE_OK, "combine bwd, routed prefix");
  CHECK(memcmp(gys, gys2, (size_t)(N * d) * es) == 0 && memcmp(gp, gp2, (size_t)(T * E) * smoe_dtype_size(pdt)) == 0,
        "combine bwd over the routed prefix == over all slots");
  ba.slots = P + 1;
  CHECK(smoe_combine_bwd(&ba, 0, T) == SMOE_ERR_ARG, "combine bwd with slots > tokens * max_active");

  free(gys);
  free(gys2);
  free(gp);
  free(gp2);
  free(y);
  free(y2);
  free(xs);
  free(xs2);
  free(x);
  free(ys);
  free(gy);
  free(xv);
  free(ysv);
  free(gyv);
  free(p);
  free(pv);
  plan_free(&pl);
}

/* The GPU plan (cuda/route.cu) emulated thread by thread with the same route_row.h functions:
 * select per token, count per (chunk, expert), exclusive scan in (expert, chunk) order, finish,
 * place per (chunk, expert) in reverse thread order. It must equal the CPU plan. */
static void check_gpu_plan_emulation(smoe_dtype dt, const double *p_in, int64_t T, int64_t E, int64_t M,
                                     int64_t chunk) {
  void *p = harness_buffer(dt, p_in, T * E);
  plan_t ref = plan_alloc(T, E, M), gpu = plan_alloc(T, E, M);
  smoe_plan_args ra = plan_args(&ref, dt, p), ga = plan_args(&gpu, dt, p);
  CHECK(smoe_dispatch_plan(&ra, 16) == SMOE_OK, "cpu plan");
  const int64_t chunks = (T + chunk - 1) / chunk, L = chunks * E;
  int64_t *te = (int64_t *)malloc((size_t)(T * M + 1) * sizeof(int64_t));
  int64_t *counts = (int64_t *)malloc((size_t)(L + 1) * sizeof(int64_t));
  int64_t *base = (int64_t *)malloc((size_t)(L + 1) * sizeof(int64_t));
  for (int64_t t = 0; t < T; ++t) { /* select_kernel */
    smoe_route_select(p, dt, E, M, t, te + t * M);
    for (int64_t j = 0; j < M; ++j) gpu.token_pairs[t * M + j] = -1;
  }
  for (int64_t i = 0; i < L; ++i) { /* count_kernel */
    const int64_t c = i / E, e = i % E;
    counts[e * chunks + c] = smoe_route_count_chunk(&ga, te, c * chunk, (c + 1) * chunk < T ? (c + 1) * chunk : T, e);
  }
  base[0] = 0; /* the three scan kernels: an exclusive scan of counts, total at base[L] */
  for (int64_t i = 0; i < L; ++i) base[i + 1] = base[i] + counts[i];
  for (int64_t i = 0; i < (E + 1 > T * M ? E + 1 : T * M); ++i) { /* finish_kernel */
    if (i <= E) gpu.offsets[i] = base[i * chunks];
    if (i < T * M && i >= base[L]) gpu.pair_token[i] = gpu.pair_expert[i] = -1;
  }
  for (int64_t i = L - 1; i >= 0; --i) { /* place_kernel, threads in reverse order */
    const int64_t c = i / E, e = i % E;
    smoe_route_place_chunk(&ga, te, c * chunk, (c + 1) * chunk < T ? (c + 1) * chunk : T, e, base[e * chunks + c]);
  }
  CHECK(plan_equal(&gpu, &ref), "GPU plan emulation == CPU plan (T %lld E %lld M %lld chunk %lld dtype %d)",
        (long long)T, (long long)E, (long long)M, (long long)chunk, (int)dt);
  free(te);
  free(counts);
  free(base);
  plan_free(&ref);
  plan_free(&gpu);
  free(p);
}

static void test_gpu_plan_emulation(void) {
  const int64_t shapes[][3] = {{1, 1, 1}, {37, 8, 2}, {100, 16, 4}, {70, 5, 5}, {333, 32, 8}, {64, 300, 3}};
  const int64_t chunk_sizes[3] = {1, 7, 32};
  for (int si = 0; si < 6; ++si)
    for (int ci = 0; ci < 3; ++ci) {
      const int64_t T = shapes[si][0], E = shapes[si][1], M = shapes[si][2];
      double *p = random_p(T, E, M);
      for (int64_t t = 2; t < T; t += 9) /* more than M actives */
        for (int64_t e = 0; e < E; ++e) p[t * E + e] = 0.25;
      check_gpu_plan_emulation((smoe_dtype)((si + ci) % 4), p, T, E, M, chunk_sizes[ci]);
      free(p);
    }
}

static void test_bad_arguments(void) {
  const double pv[6] = {1, 0, 1, 0, 1, 1};
  float pf[6];
  for (int i = 0; i < 6; ++i) pf[i] = (float)pv[i];
  plan_t pl = plan_alloc(3, 2, 1);
  smoe_plan_args a = plan_args(&pl, SMOE_F32, pf);
  CHECK(smoe_dispatch_plan(NULL, 1) == SMOE_ERR_ARG, "NULL plan args");
  CHECK(smoe_dispatch_plan(&a, 0) == SMOE_ERR_ARG, "chunk 0");
  a.max_active = 3;
  CHECK(smoe_dispatch_plan(&a, 1) == SMOE_ERR_ARG, "M > E");
  a.max_active = 0;
  CHECK(smoe_dispatch_plan(&a, 1) == SMOE_ERR_ARG, "M = 0");
  a.max_active = 1;
  a.dtype = (smoe_dtype)7;
  CHECK(smoe_dispatch_plan(&a, 1) == SMOE_ERR_ARG, "bad dtype");
  a.dtype = SMOE_F32;
  a.p = NULL;
  CHECK(smoe_dispatch_plan(&a, 1) == SMOE_ERR_ARG, "NULL p");
  a.p = pf;
  int64_t counts[2];
  CHECK(smoe_plan_count(&a, 2, 4, counts) == SMOE_ERR_ARG, "count range past the end");
  CHECK(smoe_dispatch_plan(&a, 2) == SMOE_OK, "good plan");

  float x[6] = {1, 2, 3, 4, 5, 6}, xs[6], y[6];
  smoe_gather_args g;
  memset(&g, 0, sizeof g);
  g.tokens = 3;
  g.slots = 3;
  g.d = 2;
  g.dtype = SMOE_F32;
  g.x = x;
  g.pair_token = pl.pair_token;
  g.xs = xs;
  CHECK(smoe_gather_rows(&g, 0, 4) == SMOE_ERR_ARG, "gather range past the end");
  int64_t bad_tokens[3] = {0, 3, -2};
  g.pair_token = bad_tokens;
  CHECK(smoe_gather_rows(&g, 0, 3) == SMOE_ERR_ARG, "gather with an out-of-range token");
  CHECK(xs[0] == 1 && xs[2] == 0 && xs[4] == 0, "out-of-range tokens give zero rows");

  smoe_combine_args c;
  memset(&c, 0, sizeof c);
  c.tokens = 3;
  c.experts = 2;
  c.max_active = 1;
  c.d = 2;
  c.ys_dtype = SMOE_F32;
  c.ys = x;
  c.p_dtype = SMOE_F32;
  c.p = pf;
  c.pair_expert = pl.pair_expert;
  c.token_pairs = pl.token_pairs;
  c.y = y;
  c.slots = 3;
  CHECK(smoe_combine_rows(&c, 0, 3) == SMOE_OK, "good combine");
  int64_t bad_pairs[3] = {0, 5, -1};
  c.token_pairs = bad_pairs;
  CHECK(smoe_combine_rows(&c, 0, 3) == SMOE_ERR_ARG, "combine with an out-of-range slot");
  c.token_pairs = pl.token_pairs;
  int64_t bad_experts[3] = {0, 2, 1};
  c.pair_expert = bad_experts;
  CHECK(smoe_combine_rows(&c, 0, 3) == SMOE_ERR_ARG, "combine with an out-of-range expert");
  c.pair_expert = pl.pair_expert;
  c.ys_dtype = (smoe_dtype)5;
  CHECK(smoe_combine_rows(&c, 0, 3) == SMOE_ERR_ARG, "combine bad dtype");
  c.ys_dtype = SMOE_F32;
  CHECK(smoe_combine_rows(&c, 1, 0) == SMOE_ERR_ARG, "combine reversed range");

  smoe_combine_bwd_args b;
  memset(&b, 0, sizeof b);
  b.tokens = 3;
  b.experts = 2;
  b.max_active = 1;
  b.d = 2;
  b.ys_dtype = SMOE_F32;
  b.grad_y = x;
  b.ys = x;
  b.p_dtype = SMOE_F32;
  b.p = NULL;
  b.pair_token = pl.pair_token;
  b.pair_expert = pl.pair_expert;
  b.token_pairs = pl.token_pairs;
  float gys[6], gp[6];
  b.grad_ys = gys;
  b.grad_p = gp;
  b.slots = 3;
  CHECK(smoe_combine_bwd(&b, 0, 3) == SMOE_ERR_ARG, "combine bwd needs p");
  b.p = pf;
  CHECK(smoe_combine_bwd(&b, 0, 3) == SMOE_OK, "good combine bwd");
  b.pair_token = bad_tokens;
  CHECK(smoe_combine_bwd(&b, 0, 3) == SMOE_ERR_ARG, "combine bwd with an out-of-range token");
  plan_free(&pl);
}

static void test_zero_features(void) {
  /* d = 0: nothing to copy or sum, grad_p still written (zeros) */
  const double pv[4] = {1, 0, 0, 1};
  float pf[4] = {1, 0, 0, 1}, gp[4] = {9, 9, 9, 9};
  (void)pv;
  plan_t pl = plan_alloc(2, 2, 2);
  smoe_plan_args a = plan_args(&pl, SMOE_F32, pf);
  CHECK(smoe_dispatch_plan(&a, 1) == SMOE_OK, "plan");
  smoe_combine_bwd_args b;
  memset(&b, 0, sizeof b);
  b.tokens = 2;
  b.experts = 2;
  b.max_active = 2;
  b.d = 0;
  b.ys_dtype = SMOE_F32;
  b.p_dtype = SMOE_F32;
  b.p = pf;
  b.pair_token = pl.pair_token;
  b.pair_expert = pl.pair_expert;
  b.token_pairs = pl.token_pairs;
  b.grad_p = gp;
  b.slots = 4;
  CHECK(smoe_combine_bwd(&b, 0, 2) == SMOE_OK, "d = 0 bwd status");
  CHECK(gp[0] == 0 && gp[1] == 0 && gp[2] == 0 && gp[3] == 0, "d = 0 grad_p is zero");
  smoe_gather_args g;
  memset(&g, 0, sizeof g);
  g.tokens = 2;
  g.slots = 4;
  g.dtype = SMOE_F32;
  g.pair_token = pl.pair_token;
  CHECK(smoe_gather_rows(&g, 0, 4) == SMOE_OK, "d = 0 gather");
  plan_free(&pl);
}

int main(void) {
  test_plan_hand_made();
  test_plan_edges();
  test_plan_random();
  const smoe_dtype dts[4] = {SMOE_F32, SMOE_F64, SMOE_BF16, SMOE_F16};
  for (int i = 0; i < 4; ++i) test_gather_combine(dts[i], dts[i]);
  test_gather_combine(SMOE_BF16, SMOE_F32); /* mixed: bf16 activations, f32 routing weights */
  test_gather_combine(SMOE_F32, SMOE_F64);  /* f64 p makes the math double */
  test_gpu_plan_emulation();
  test_bad_arguments();
  test_zero_features();
  return harness_summary();
}
