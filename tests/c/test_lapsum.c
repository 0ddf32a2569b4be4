/* C-only tests of the softmoe core: no torch, run under ASan/UBSan by `make ctest`.
 * Reference values are the 60-digit test vectors of research/lapsum.md §7. */
#include <math.h>

#include "core/smoe_math.h" /* smoe_exp_f32, tested on its own below */
#include "harness.h"

/* The float per-row functions themselves: the reference of the eight-row path of lapsum.c. */
#include "core/lapsum_args.h"
#define SMOE_SUFFIX f32
#include "core/lapsum_row.h"
#undef SMOE_SUFFIX

static void check_close(double got, double want, double tol, const char *what, int i) {
  CHECK(fabs(got - want) <= tol, "%s[%d]: got %.15g want %.15g (tol %g)", what, i, got, want, tol);
}

/* Forward and backward of `rows` rows of n scores (f32 or f64 storage) with per-row k and alpha,
 * through the chosen instruction set. Returns 0 when that instruction set is not available. */
typedef struct {
  void *p, *grad;
  double *threshold;
  void *gk, *ga;
} rows_out;

static int run_rows(smoe_dtype dtype, const double *scores, const double *g, int64_t rows, int64_t n, const double *k,
                    const double *alpha, double eps, int64_t cap, int isa, rows_out *out) {
  const int f64 = dtype == SMOE_F64;
  const size_t es = f64 ? sizeof(double) : sizeof(float);
  void *sv = malloc(es * rows * n), *gv = malloc(es * rows * n), *kv = malloc(es * rows), *av = malloc(es * rows);
  for (int64_t i = 0; i < rows * n; ++i) {
    if (f64) {
      ((double *)sv)[i] = scores[i];
      ((double *)gv)[i] = g[i];
    } else {
      ((float *)sv)[i] = (float)scores[i];
      ((float *)gv)[i] = (float)g[i];
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    if (f64) {
      ((double *)kv)[r] = k[r];
      ((double *)av)[r] = alpha[r];
    } else {
      ((float *)kv)[r] = (float)k[r];
      ((float *)av)[r] = (float)alpha[r];
    }
  }
  out->p = calloc(rows * n, es);
  out->grad = calloc(rows * n, es);
  out->threshold = (double *)calloc(rows, sizeof(double));
  out->gk = calloc(rows, es);
  out->ga = calloc(rows, es);
  smoe_topk_fwd_args fa;
  memset(&fa, 0, sizeof fa);
  fa.rows = rows;
  fa.n = n;
  fa.dtype = dtype;
  fa.scores = sv;
  fa.k = kv;
  fa.k_stride = 1;
  fa.alpha = av;
  fa.alpha_stride = 1;
  fa.eps = eps;
  fa.max_active = cap;
  fa.p = out->p;
  fa.threshold = out->threshold;
  smoe_topk_bwd_args ba;
  memset(&ba, 0, sizeof ba);
  ba.rows = rows;
  ba.n = n;
  ba.dtype = dtype;
  ba.grad_p = gv;
  ba.scores = sv;
  ba.p = out->p;
  ba.threshold = out->threshold;
  ba.alpha = av;
  ba.alpha_stride = 1;
  ba.eps = eps;
  ba.max_active = cap;
  ba.grad_scores = out->grad;
  ba.grad_k_rows = out->gk;
  ba.grad_alpha_rows = out->ga;
  int ok = smoe_topk_fwd_isa(&fa, 0, rows, isa) == SMOE_OK && smoe_topk_bwd_isa(&ba, 0, rows, isa) == SMOE_OK;
  free(sv);
  free(gv);
  free(kv);
  free(av);
  return ok;
}

static void free_rows(rows_out *o) {
  free(o->p);
  free(o->grad);
  free(o->threshold);
  free(o->gk);
  free(o->ga);
}

/* One row forward + backward in double or float, returning p, threshold and the VJP (g = NULL: a
 * zero upstream gradient). */
typedef struct {
  double p[512], grad[512], threshold, gk, ga;
} row_result;

static row_result run_row(smoe_dtype dtype, const double *r, int n, double k, double alpha, double eps, int cap,
                          const double *g) {
  row_result out;
  memset(&out, 0, sizeof out);
  double zeros[512] = {0};
  rows_out o;
  CHECK(run_rows(dtype, r, g ? g : zeros, 1, n, &k, &alpha, eps, cap, SMOE_ISA_AUTO, &o), "forward and backward status");
  const int f64 = dtype == SMOE_F64;
  for (int i = 0; i < n; ++i) {
    out.p[i] = f64 ? ((double *)o.p)[i] : ((float *)o.p)[i];
    out.grad[i] = f64 ? ((double *)o.grad)[i] : ((float *)o.grad)[i];
  }
  out.threshold = o.threshold[0];
  out.gk = f64 ? *(double *)o.gk : *(float *)o.gk;
  out.ga = f64 ? *(double *)o.ga : *(float *)o.ga;
  free_rows(&o);
  return out;
}

typedef struct {
  const char *name;
  int n;
  double r[8], k, alpha, b, p[8];
} vector_case;

static const vector_case VECTORS[] = {
    {"TV1", 4, {0, 1, 2, 3}, 2, 1, 1.5, {0.111565080074, 0.303265329856, 0.696734670144, 0.888434919926}},
    {"TV2", 5, {0.3, -1.2, 2.0, 0.7, -0.1}, 2.5, 0.5, 0.304149880540622,
     {0.495867293422, 0.024687778839, 0.983174293605, 0.773463096842, 0.222807537293}},
    {"TV3", 5, {1, 1, 1, 0.2, 0.2}, 2, 0.5, 0.906246641050599,
     {0.585488225567, 0.585488225567, 0.585488225567, 0.121767661649, 0.121767661649}},
    {"TV4", 6, {0, 0, 0, 0, 0, 0}, 2, 1, 0.405465108108164, {1. / 3, 1. / 3, 1. / 3, 1. / 3, 1. / 3, 1. / 3}},
    {"TV5", 1, {5}, 0.3, 1, 5.51082562376599, {0.3}},
    {"TV6", 4, {3, 1, 0.5, -2}, 1, 0.01, 2, {1, 1.86003798801e-44, 3.58754798658e-66, 9.57584798357e-175}},
    {"TV7", 4, {3, 1, 0.5, -2}, 1.5, 0.01, 1, {1, 0.5, 9.64374923982e-23, 2.57410011121e-131}},
    {"TV8", 4, {50, 49.9, 10, -20}, 1.5, 0.01, 49.899999546011, {0.999977301066, 0.500022698934, 0, 0}},
    {"TV9", 8, {0.12, -0.53, 1.07, 0.88, -1.4, 0.35, 0.0, -0.2}, 2, 0.1, 0.614348801920904,
     {0.00356484323381, 5.35952503453e-06, 0.994750692739, 0.964903685757, 8.92820824385e-10, 0.0355563968368,
      0.0010737101484, 0.000145310867047}},
    {"TV10", 8, {0.12, -0.53, 1.07, 0.88, -1.4, 0.35, 0.0, -0.2}, 7.9, 0.3, -1.90943792475531,
     {0.999423156906, 0.994964656821, 0.999975689615, 0.999954202158, 0.908486941077, 0.999732022337,
      0.999139451226, 0.998323879859}},
    {"TV11", 8, {0.12, -0.53, 1.07, 0.88, -1.4, 0.35, 0.0, -0.2}, 0.05, 0.3, 1.92199160752406,
     {0.00123117550322, 0.000141042042401, 0.0292136502203, 0.0155071737589, 7.76058733624e-06,
      0.0026502025561, 0.000825281619997, 0.000423713711729}},
    {"TV12", 4, {1000.3, 1000.1, 999.8, 1000.0}, 2, 0.1, 1000.05,
     {0.958957500688, 0.696734670144, 0.0410424993119, 0.303265329856}},
};

/* ---- the float exp of the kernels (smoe_math.h) ------------------------------------------------ */

/* Units in the last place of the float nearest to e (2^-149 below FLT_MIN, the subnormal spacing). */
static double float_ulp(double e) {
  if (fabs(e) < 1.1754943508222875e-38) return 1.401298464324817e-45;
  int ex;
  frexp(e, &ex);
  return ldexp(1.0, ex - 24);
}

/* The polynomial against the float64 exp over every 101st float of [-104, 88.7] (22 million of
 * them, normal and subnormal results) and every float of 2^-20 <= |x| <= 1/8 (285 million): at
 * most 0.99 ulp. Every float of [-1/8, 1/8] took 85 s of each run of this file (2.1 billion, three
 * quarters of them below 2^-20 in magnitude, where e^x = 1 + x + x^2 / 2 to far below an ulp and
 * the polynomial's last step rounds 1 + r once: the strided sweep covers them). */
static void test_exp_polynomial(void) {
  double worst = 0, worst_x = 0;
  const uint32_t ranges[4][3] = {
      {0x80000000u, 0xc2d00000u, 101u}, /* -0 ... -104 */
      {0x00000000u, 0x42b16666u, 101u}, /* +0 ... 88.7 */
      {0xb5800000u, 0xbe000000u, 1u},   /* -2^-20 ... -1/8 */
      {0x35800000u, 0x3e000000u, 1u},   /* 2^-20 ... 1/8 */
  };
  for (int r = 0; r < 4; ++r)
    for (uint64_t u = ranges[r][0]; u <= ranges[r][1]; u += ranges[r][2]) {
      const float x = smoe_bits_to_float((uint32_t)u);
      const double e = exp((double)x), err = fabs((double)smoe_exp_f32(x) - e) / float_ulp(e);
      if (err > worst) worst = err, worst_x = x;
    }
  CHECK(worst <= 0.99, "exp polynomial: %.3f ulp at x = %.9g (bound 0.99)", worst, worst_x);
  CHECK(smoe_exp_f32(0.0f) == 1.0f && smoe_exp_f32(-0.0f) == 1.0f, "exp(0) = 1");
  CHECK(smoe_exp_f32(-INFINITY) == 0.0f && smoe_exp_f32(-105.0f) == 0.0f, "exp(-inf) = exp(-105) = 0");
  CHECK(smoe_exp_f32(-103.0f) > 0.0f, "exp(-103) is a subnormal, not 0");
  CHECK(isinf(smoe_exp_f32(89.0f)) && isinf(smoe_exp_f32(INFINITY)), "exp overflows to inf");
  CHECK(isnan(smoe_exp_f32(NAN)) && isnan(smoe_exp_f32(-NAN)), "exp(NaN) is NaN");
}

static void test_vectors(void) {
  for (size_t t = 0; t < sizeof VECTORS / sizeof VECTORS[0]; ++t) {
    const vector_case *v = &VECTORS[t];
    row_result d = run_row(SMOE_F64, v->r, v->n, v->k, v->alpha, 0.0, v->n, NULL);
    for (int i = 0; i < v->n; ++i) check_close(d.p[i], v->p[i], 1e-11 * fmax(1.0, fabs(v->p[i])) + 1e-300, v->name, i);
    check_close(d.threshold, v->b, 1e-9, v->name, -1);
    /* float32 inputs: within 1e-6 of the float64 result on the same (rounded) inputs */
    double rr[8];
    for (int i = 0; i < v->n; ++i) rr[i] = (double)(float)v->r[i];
    row_result ref = run_row(SMOE_F64, rr, v->n, (double)(float)v->k, (double)(float)v->alpha, 0.0, v->n, NULL);
    row_result f = run_row(SMOE_F32, v->r, v->n, v->k, v->alpha, 0.0, v->n, NULL);
    for (int i = 0; i < v->n; ++i) check_close(f.p[i], ref.p[i], 1e-6, v->name, i);
  }
}

static void test_vjp_tv2(void) {
  const double r[5] = {0.3, -1.2, 2.0, 0.7, -0.1}, g[5] = {1, -0.5, 0.25, 2, 0};
  const double want[5] = {0.0461547150694, -0.0717654285623, -0.0236724436282, 0.474159581396, -0.424876424274};
  row_result d = run_row(SMOE_F64, r, 5, 2.5, 0.5, 0.0, 5, g);
  double total = 0;
  for (int i = 0; i < 5; ++i) {
    check_close(d.grad[i], want[i], 1e-11, "TV2 dL/dr", i);
    total += d.grad[i];
  }
  check_close(total, 0.0, 1e-14, "TV2 sum dL/dr", 0);
  check_close(d.gk, 0.953460617708, 1e-11, "TV2 dL/dk", 0);
  check_close(d.ga, -0.854038781887, 1e-11, "TV2 dL/dalpha", 0);
}

static void test_truncated_vectors(void) {
  const double r[8] = {0.12, -0.53, 1.07, 0.88, -1.4, 0.35, 0.0, -0.2};
  const double g[8] = {0.5, -1, 1.5, 0.2, 0, -0.3, 0.8, 0.1};
  struct {
    double c, b, p[8], dr[8], dk, da;
  } cases[2] = {
      {1, 0.446006801542682, {0, 0, 0.99880524258, 0.992011978007, 0, 0.00918277941244, 0, 0},
       {0, 0, 0.0212044718303, 0.0379265744572, 0, -0.0591310462875, 0, 0}, -0.274793065066, -0.353683041802},
      {3, 0.575732713240472, {0, 0, 0.996341168445, 0.975537438444, 0, 0.0281213931107, 0, 0},
       {0, 0, 0.0574393344298, 0.0660200266035, 0, -0.123459361033, 0, 0}, -0.0698819028094, -0.763469348893},
  };
  for (int t = 0; t < 2; ++t) {
    const double eps = 0.5 * exp(-cases[t].c);
    for (int cap = 3; cap <= 8; cap += 5) { /* a cap of 3 keeps exactly the active set */
      row_result d = run_row(SMOE_F64, r, 8, 2, 0.1, eps, cap, g);
      for (int i = 0; i < 8; ++i) {
        check_close(d.p[i], cases[t].p[i], 1e-11, "truncated p", i);
        CHECK((d.p[i] == 0) == (cases[t].p[i] == 0), "truncated zero pattern at %d", i);
        check_close(d.grad[i], cases[t].dr[i], 1e-11, "truncated dL/dr", i);
      }
      check_close(d.threshold, cases[t].b, 1e-11, "truncated b", t);
      check_close(d.gk, cases[t].dk, 1e-11, "truncated dL/dk", t);
      check_close(d.ga, cases[t].da, 1e-11, "truncated dL/dalpha", t);
    }
  }
}

static double uniform(unsigned *state) {
  *state = *state * 1664525u + 1013904223u;
  return ((*state >> 8) + 0.5) / 16777216.0;
}

static double gauss(unsigned *state) {
  return sqrt(-2.0 * log(uniform(state))) * cos(6.283185307179586 * uniform(state));
}

/* Sum p = k and the float32 / float64 agreement at E = 256, plain and truncated with a cap. */
static void test_sums_e256(void) {
  unsigned seed = 12345u;
  double r[256];
  for (int trial = 0; trial < 20; ++trial) {
    for (int i = 0; i < 256; ++i) r[i] = (double)(float)(2.0 * gauss(&seed) + (trial % 3) * 20.0);
    const double k = 0.5 + 7.0 * uniform(&seed), alpha = (double)(float)(0.05 + uniform(&seed));
    const double eps = trial % 2 ? 1e-2 : 0.0;
    const int cap = trial % 4 == 3 ? 16 : 256;
    row_result d = run_row(SMOE_F64, r, 256, (double)(float)k, alpha, eps, cap, NULL);
    row_result f = run_row(SMOE_F32, r, 256, k, alpha, eps, cap, NULL);
    double sd = 0, sf = 0, worst = 0;
    int active = 0;
    for (int i = 0; i < 256; ++i) {
      sd += d.p[i];
      sf += f.p[i];
      worst = fmax(worst, fabs(d.p[i] - f.p[i]));
      active += d.p[i] > 0;
      CHECK(d.p[i] >= 0 && d.p[i] <= 1, "p in [0,1]");
    }
    CHECK(active <= cap, "at most max_active nonzeros (%d > %d)", active, cap);
    check_close(sd, (double)(float)k, 1e-12, "f64 sum p - k", trial);
    check_close(sf, (double)(float)k, 1e-5, "f32 sum p - k", trial);
    CHECK(worst <= 1e-6, "trial %d: max |p32 - p64| = %g", trial, worst);
  }
}

/* ---- the selection and storage paths give the same bits --------------------------------------- */

/* Random scores with ties, signed zeros and -inf entries: most rows plain N(0, 2^2) draws, some
 * rounded to a coarse grid (many ties), some with a -inf. */
static void random_scores(unsigned *seed, double *r, int64_t n, int kind) {
  for (int64_t i = 0; i < n; ++i) {
    double v = 2.0 * gauss(seed);
    if (kind == 1) v = floor(v * 2.0) / 2.0;             /* ties */
    if (kind == 2 && uniform(seed) < 0.2) v = -INFINITY; /* never candidates */
    if (kind == 3 && uniform(seed) < 0.3) v = uniform(seed) < 0.5 ? 0.0 : -0.0;
    r[i] = v;
  }
}

/* Rows of 2 to 8 float scores, and longer rows with at most 8 candidates, run eight at a time, the
 * rows in the vector lanes (lapsum_rows8.h); the per-row functions run one row at a time. Both must
 * give the same bits for every row, whatever group or call range the row falls in: plain and ties,
 * signed zeros, -inf, NaN and +inf scores, fewer finite scores than candidates; differences that
 * overflow; k at and near its limits, tiny and huge alpha, bad alpha; the plain and truncated
 * kernels (truncated rows whose worst score falls below the cut take the active-set search, down to
 * one active score); every score a candidate or a cap of 1, 2 or about half (ties at the cap: the
 * lower index wins); float32 and bfloat16 storage. */
static void test_rows8_match_row_functions(void) {
  unsigned seed = 808u;
  enum { ROWS = 203 }; /* not a whole number of groups */
  const int64_t widths[] = {2, 3, 4, 5, 6, 7, 8, 9, 12, 16, 17, 40, 64, 100};
  for (int bf = 0; bf < 2; ++bf)
    for (size_t wi = 0; wi < sizeof widths / sizeof widths[0]; ++wi)
      for (int e = 0; e < 12; ++e) {
        const int64_t n = widths[wi];
        const double eps = e % 3 == 0 ? 0.0 : e % 3 == 1 ? 1e-2 : 0.2;
        /* a longer row takes the lanes with at most 8 candidates */
        const int64_t caps[4] = {n <= 8 ? n : 8, 1, 2, n <= 8 ? (n + 1) / 2 : 5}, cap = caps[e / 3];
        const smoe_dtype dt = bf ? SMOE_BF16 : SMOE_F32;
        const size_t es = bf ? 2 : 4;
        float k[ROWS], alpha[ROWS];
        float *r = (float *)malloc(sizeof(float) * ROWS * n), *g = (float *)malloc(sizeof(float) * ROWS * n);
        double *v = (double *)malloc(sizeof(double) * n);
        for (int row = 0; row < ROWS; ++row) {
          random_scores(&seed, v, n, row % 4);
          for (int64_t i = 0; i < n; ++i) r[row * n + i] = (float)v[i], g[row * n + i] = (float)gauss(&seed);
          const int special = row % 23;
          if (special == 5) r[row * n + row % n] = NAN;
          if (special == 6) r[row * n + row % n] = INFINITY;
          if (special == 7) r[row * n] = 3e38f, r[row * n + n - 1] = -3e38f; /* differences overflow */
          if (special == 8) r[row * n + 1] = r[row * n]; /* a tie at the top */
          if (special == 21) r[row * n + n - 1] = r[row * n + 1] = r[row * n]; /* ties across a cap */
          if (special == 22)
            for (int64_t i = 2; i < n; ++i) r[row * n + i] = -INFINITY; /* two finite scores */
          k[row] = (float)(cap * uniform(&seed));
          if (special == 9) k[row] = 0.0f;
          if (special == 10) k[row] = (float)cap;
          if (special == 11) k[row] = nextafterf((float)cap, 0.0f);
          if (special == 12) k[row] = 1e-40f;
          if (special == 13) k[row] = 1.0f;
          if (special == 14) k[row] = (float)cap + 0.5f;
          alpha[row] = (float)(0.05 + 2.0 * uniform(&seed));
          if (special == 15) alpha[row] = 1e-3f;
          if (special == 16) alpha[row] = 1e30f;
          if (special == 17) alpha[row] = row % 2 ? 0.0f : -1.0f;
          if (special == 18) alpha[row] = INFINITY;
          if (special == 19) alpha[row] = 1e-39f; /* 1 / alpha overflows */
          if (special == 20) alpha[row] = 40.0f;   /* flat: nothing below the cut */
        }
        uint16_t *rb = (uint16_t *)malloc(2 * ROWS * n), *gb = (uint16_t *)malloc(2 * ROWS * n);
        for (int64_t i = 0; i < ROWS * n; ++i) rb[i] = smoe_float_to_bf16(r[i]), gb[i] = smoe_float_to_bf16(g[i]);
        const void *scores = bf ? (const void *)rb : (const void *)r, *grad_p = bf ? (const void *)gb : (const void *)g;
        /* [0] the per-row functions, [1] one call, [2] two calls split inside a group */
        unsigned char *p[3], *grad[3];
        double threshold[3][ROWS];
        float gk[3][ROWS], ga[3][ROWS];
        const size_t row_bytes = es * (size_t)n;
        float *rs = (float *)malloc(smoe_topk_scratch_bytes(dt, n, cap));
        int32_t *is = (int32_t *)((char *)rs + smoe_topk_scratch_index_offset(dt, n, cap, 1));
        for (int way = 0; way < 3; ++way) {
          p[way] = (unsigned char *)malloc(row_bytes * ROWS);
          grad[way] = (unsigned char *)malloc(row_bytes * ROWS);
          memset(p[way], 0xA5, row_bytes * ROWS); /* every entry of a row must be written */
          memset(grad[way], 0xA5, row_bytes * ROWS);
          smoe_topk_fwd_args fa = {ROWS, n, dt, scores, k, 1, alpha, 1, eps, cap, p[way], threshold[way]};
          smoe_topk_bwd_args ba = {ROWS, n, dt, grad_p, scores, p[way], threshold[way], alpha, 1, eps, cap,
                                   grad[way], gk[way], ga[way]};
          if (way == 0) {
            for (int64_t row = 0; row < ROWS; ++row) smoe_topk_fwd_row_f32(&fa, row, rs, is, 1);
            for (int64_t row = 0; row < ROWS; ++row) smoe_topk_bwd_row_f32(&ba, row, rs, is, 1, gk[0] + row, ga[0] + row);
          } else {
            const int64_t cut = way == 1 ? ROWS : 13;
            CHECK(smoe_topk_fwd(&fa, 0, cut) == SMOE_OK && smoe_topk_fwd(&fa, cut, ROWS) == SMOE_OK, "forward status");
            CHECK(smoe_topk_bwd(&ba, 0, cut) == SMOE_OK && smoe_topk_bwd(&ba, cut, ROWS) == SMOE_OK, "backward status");
          }
        }
        for (int way = 1; way < 3; ++way) {
          int bad_p = 0, bad_t = 0, bad_g = 0;
          for (int row = 0; row < ROWS; ++row) {
            const int row_bad_p = memcmp(p[0] + row_bytes * row, p[way] + row_bytes * row, row_bytes) != 0;
            const int row_bad_t = memcmp(&threshold[0][row], &threshold[way][row], sizeof(double)) != 0;
            const int row_bad_g = memcmp(grad[0] + row_bytes * row, grad[way] + row_bytes * row, row_bytes) != 0 ||
                                  memcmp(&gk[0][row], &gk[way][row], 4) != 0 || memcmp(&ga[0][row], &ga[way][row], 4) != 0;
            if ((row_bad_p || row_bad_t || row_bad_g) && bad_p + bad_t + bad_g == 0)
              printf("  first differing row %d (kind %d, special %d): k %g alpha %g threshold %.9g vs %.9g\n", row,
                     row % 4, row % 23, k[row], alpha[row], threshold[0][row], threshold[way][row]);
            bad_p += row_bad_p, bad_t += row_bad_t, bad_g += row_bad_g;
          }
          CHECK(bad_p == 0 && bad_t == 0 && bad_g == 0,
                "%s n %lld cap %lld eps %g, %s: %d rows' p, %d thresholds, %d rows' gradients differ from the per-row "
                "functions", bf ? "bf16" : "f32", (long long)n, (long long)cap, eps, way == 1 ? "one call" : "two calls",
                bad_p, bad_t, bad_g);
        }
        for (int way = 0; way < 3; ++way) free(p[way]), free(grad[way]);
        free(rs), free(r), free(g), free(v), free(rb), free(gb);
      }
}

/* The backward of a longer row reads its active entries off p != 0, at most max_active <= 8 of them
 * from the forward; a p from elsewhere with more (here 12 of 64) leaves the eight-row lanes for the
 * per-row function, with the same gradients. */
static void test_rows8_backward_many_active(void) {
  enum { ROWS = 11, N = 64 };
  unsigned seed = 99u;
  float r[ROWS * N], gp[ROWS * N], p[ROWS * N], alpha[ROWS], grad[2][ROWS * N], gk[2][ROWS], ga[2][ROWS];
  double threshold[ROWS];
  for (int row = 0; row < ROWS; ++row) {
    alpha[row] = 0.7f;
    threshold[row] = 0.25;
    for (int i = 0; i < N; ++i) {
      r[row * N + i] = (float)gauss(&seed), gp[row * N + i] = (float)gauss(&seed);
      p[row * N + i] = i % 5 == row % 5 && i < 60 ? 0.125f : 0.0f; /* 12 nonzero entries */
    }
  }
  const int64_t cap = 8;
  float *rs = (float *)malloc(smoe_topk_scratch_bytes(SMOE_F32, N, cap));
  int32_t *is = (int32_t *)((char *)rs + smoe_topk_scratch_index_offset(SMOE_F32, N, cap, 1));
  for (int way = 0; way < 2; ++way) {
    smoe_topk_bwd_args ba = {ROWS, N, SMOE_F32, gp, r, p, threshold, alpha, 1, 1e-2, cap, grad[way], gk[way], ga[way]};
    if (way == 0)
      for (int64_t row = 0; row < ROWS; ++row) smoe_topk_bwd_row_f32(&ba, row, rs, is, 1, gk[0] + row, ga[0] + row);
    else
      CHECK(smoe_topk_bwd(&ba, 0, ROWS) == SMOE_OK, "backward status");
  }
  int nonzero = 0;
  for (int i = 0; i < ROWS * N; ++i) nonzero += grad[0][i] != 0.0f;
  CHECK(nonzero == ROWS * 12, "12 gradients per row (got %d in %d rows)", nonzero, ROWS);
  CHECK(memcmp(grad[0], grad[1], sizeof grad[0]) == 0 && memcmp(gk[0], gk[1], sizeof gk[0]) == 0 &&
            memcmp(ga[0], ga[1], sizeof ga[0]) == 0,
        "a row with 12 active entries: the same gradients as the per-row function");
  free(rs);
}

/* A row of n0 <= 16 scores takes the sorting network (float math) and keeps its candidates in
 * local arrays; the same scores padded with -inf to 64 or 100 entries, with caps that keep the same
 * candidates, take the block merge (cap <= 16), sorted insertion into the scratch (cap <= 48), the
 * merge sort (no cap) and the heap (48 < cap < n). Every path must give the same p, threshold and,
 * where the active set is the same by definition, the same gradients, bit for bit. */
static void test_selection_paths_agree(void) {
  unsigned seed = 2024u;
  enum { ROWS = 96 };
  const int64_t wide_n[4] = {64, 64, 64, 100}, wide_cap[4] = {0 /* n0 */, 20, 64, 60};
  for (int f = 0; f < 2; ++f) {
    const smoe_dtype dt = f ? SMOE_F64 : SMOE_F32;
    for (int64_t n0 = 1; n0 <= 16; ++n0) {
      for (int e = 0; e < 3; ++e) {
        const double eps = e == 0 ? 0.0 : e == 1 ? 1e-2 : 0.2;
        double r[ROWS * 16], g[ROWS * 16], k[ROWS], alpha[ROWS];
        for (int row = 0; row < ROWS; ++row) {
          random_scores(&seed, r + row * n0, n0, row % 4);
          int finite = 0;
          for (int64_t i = 0; i < n0; ++i) finite += r[row * n0 + i] > -INFINITY;
          if (finite == 0) r[row * n0] = 0.5, finite = 1;
          k[row] = (double)(float)(finite * uniform(&seed)); /* in [0, finite), 0 included rarely */
          alpha[row] = (double)(float)(0.05 + 2.0 * uniform(&seed));
          for (int64_t i = 0; i < n0; ++i) g[row * n0 + i] = gauss(&seed);
        }
        rows_out ref;
        CHECK(run_rows(dt, r, g, ROWS, n0, k, alpha, eps, n0, SMOE_ISA_AUTO, &ref), "narrow rows");
        const size_t es = f ? sizeof(double) : sizeof(float);
        for (int w = 0; w < 4; ++w) {
          const int64_t n = wide_n[w], cap = wide_cap[w] ? wide_cap[w] : n0;
          double *rw = (double *)malloc(sizeof(double) * ROWS * n), *gw = (double *)malloc(sizeof(double) * ROWS * n);
          for (int row = 0; row < ROWS; ++row)
            for (int64_t i = 0; i < n; ++i) {
              rw[row * n + i] = i < n0 ? r[row * n0 + i] : -INFINITY;
              gw[row * n + i] = i < n0 ? g[row * n0 + i] : 1.0;
            }
          rows_out got;
          CHECK(run_rows(dt, rw, gw, ROWS, n, k, alpha, eps, cap, SMOE_ISA_AUTO, &got), "wide rows");
          /* the backward's active set is "p != 0" under a cap and "every finite score" without one:
           * the same set unless a p underflowed, which these scores never do with eps > 0 */
          const int same_grad = eps > 0 || cap >= n;
          int bad_p = 0, bad_t = 0, bad_g = 0;
          for (int row = 0; row < ROWS; ++row) {
            bad_t += memcmp(&ref.threshold[row], &got.threshold[row], sizeof(double)) != 0;
            for (int64_t i = 0; i < n; ++i) {
              const char *pw = (const char *)got.p + es * (row * n + i), *gg = (const char *)got.grad + es * (row * n + i);
              if (i < n0) {
                bad_p += memcmp(pw, (const char *)ref.p + es * (row * n0 + i), es) != 0;
                if (same_grad) bad_g += memcmp(gg, (const char *)ref.grad + es * (row * n0 + i), es) != 0;
              } else {
                bad_p += f ? *(const double *)pw != 0 : *(const float *)pw != 0;
              }
            }
            if (same_grad) {
              bad_g += memcmp((const char *)got.gk + es * row, (const char *)ref.gk + es * row, es) != 0;
              bad_g += memcmp((const char *)got.ga + es * row, (const char *)ref.ga + es * row, es) != 0;
            }
          }
          CHECK(bad_p == 0 && bad_t == 0 && bad_g == 0,
                "%s n0 %lld eps %g: padded to %lld with cap %lld: %d p, %d thresholds, %d gradients differ",
                f ? "f64" : "f32", (long long)n0, eps, (long long)n, (long long)cap, bad_p, bad_t, bad_g);
          free_rows(&got);
          free(rw);
          free(gw);
        }
        free_rows(&ref);
      }
    }
  }
}

/* The candidates of a row, by the rule of softmoe.h (the `cap` largest finite scores, lower index
 * first on ties), in index order. Returns their number. */
static const double *cand_scores;
static int cand_order(const void *x, const void *y) {
  const int a = *(const int *)x, b = *(const int *)y;
  const double va = cand_scores[a], vb = cand_scores[b];
  if (va != vb) return va > vb ? -1 : 1;
  return a - b;
}
static int int_order(const void *x, const void *y) { return *(const int *)x - *(const int *)y; }
static int candidates_of(const double *r, int n, int cap, int *out) {
  int *order = (int *)malloc(sizeof(int) * n), m = 0;
  for (int i = 0; i < n; ++i) order[i] = i;
  cand_scores = r;
  qsort(order, n, sizeof(int), cand_order);
  for (int j = 0; j < n && m < cap; ++j)
    if (r[order[j]] > -INFINITY) out[m++] = order[j];
  qsort(out, m, sizeof(int), int_order);
  free(order);
  return m;
}

/* Long rows (17 to 257 scores) take the bar-and-collect selection (cap <= 8, with the block merge
 * behind it when many scores tie at the bar), the block merge (cap <= 16), sorted insertion or the
 * heap. Their p and threshold must be those of the short row made of their candidates alone, bit
 * for bit (the solve sees the same sorted candidates), and 0 elsewhere; with eps > 0 (the same
 * active set by definition) the gradients too. */
static void test_long_rows_match_their_candidates(void) {
  unsigned seed = 4242u;
  const int ns[6] = {17, 24, 40, 64, 100, 257}, caps[8] = {1, 2, 5, 8, 11, 16, 20, 60};
  int tied = 0;
  for (int f = 0; f < 2; ++f)
    for (int ni = 0; ni < 6; ++ni)
      for (int ci = 0; ci < 8; ++ci)
        for (int kind = 0; kind < 5; ++kind) {
          const int n = ns[ni], cap = caps[ci] < n ? caps[ci] : n;
          const smoe_dtype dt = f ? SMOE_F64 : SMOE_F32;
          const double eps = kind % 2 ? 1e-2 : 0.0;
          double r[257], g[257], rs[257], gs[257];
          int cand[257];
          if (kind == 4) { /* a block of equal top scores: more than 16 reach any bar */
            for (int i = 0; i < n; ++i) r[i] = i % 3 ? 1.5 : (double)(float)gauss(&seed);
          } else {
            random_scores(&seed, r, n, kind);
          }
          for (int i = 0; i < n; ++i) {
            r[i] = f ? r[i] : (double)(float)r[i];
            g[i] = gauss(&seed);
          }
          const int m = candidates_of(r, n, cap, cand);
          if (m == 0) continue;
          tied += kind == 4;
          for (int j = 0; j < m; ++j) rs[j] = r[cand[j]], gs[j] = g[cand[j]];
          const double k = (double)(float)(m * (0.05 + 0.9 * uniform(&seed)));
          const double alpha = (double)(float)(0.05 + 2.0 * uniform(&seed));
          rows_out wide, narrow;
          CHECK(run_rows(dt, r, g, 1, n, &k, &alpha, eps, cap, SMOE_ISA_AUTO, &wide), "long row");
          CHECK(run_rows(dt, rs, gs, 1, m, &k, &alpha, eps, m, SMOE_ISA_AUTO, &narrow), "its candidates");
          const size_t es = f ? sizeof(double) : sizeof(float);
          int bad = memcmp(wide.threshold, narrow.threshold, sizeof(double)) != 0, j = 0;
          for (int i = 0; i < n; ++i) {
            const char *pw = (const char *)wide.p + es * i, *gw = (const char *)wide.grad + es * i;
            if (j < m && cand[j] == i) {
              bad += memcmp(pw, (const char *)narrow.p + es * j, es) != 0;
              if (eps > 0) bad += memcmp(gw, (const char *)narrow.grad + es * j, es) != 0;
              ++j;
            } else {
              bad += f ? *(const double *)pw != 0 : *(const float *)pw != 0;
            }
          }
          if (eps > 0) bad += memcmp(wide.gk, narrow.gk, es) != 0 || memcmp(wide.ga, narrow.ga, es) != 0;
          CHECK(bad == 0, "%s n %d cap %d kind %d eps %g: the long row differs from its candidates in %d places",
                f ? "f64" : "f32", n, cap, kind, eps, bad);
          free_rows(&wide);
          free_rows(&narrow);
        }
  CHECK(tied > 50, "rows with ties at the bar were exercised (%d)", tied);
}

/* The baseline, AVX2 and AVX-512 builds of the row loops give the same bits (no FMA, fixed lane
 * sums), over every selection path, the plain and truncated kernels and both storage types; the
 * rows count (37) leaves a part group at the end. A build the CPU cannot run is skipped (said). */
static void test_instruction_sets_agree(void) {
  const int isas[2] = {SMOE_ISA_AVX2, SMOE_ISA_AVX512};
  const char *names[2] = {"AVX2", "AVX-512"};
  for (int which = 0; which < 2; ++which) {
    unsigned seed = 77u;
    const int64_t ns[7] = {1, 5, 8, 13, 40, 64, 257}, caps[4] = {1, 8, 20, 1000};
    rows_out probe;
    double one = 1.0, half = 0.5;
    if (!run_rows(SMOE_F32, &one, &one, 1, 1, &half, &one, 0.0, 1, isas[which], &probe)) {
      free_rows(&probe);
      printf("test_instruction_sets_agree: no %s build or CPU, skipped\n", names[which]);
      continue;
    }
    free_rows(&probe);
    for (int f = 0; f < 2; ++f)
      for (int ni = 0; ni < 7; ++ni)
        for (int ci = 0; ci < 4; ++ci)
          for (int e = 0; e < 2; ++e) {
            enum { ROWS = 37 };
            const int64_t n = ns[ni], cap = caps[ci] < n ? caps[ci] : n;
            const double eps = e ? 1e-2 : 0.0;
            const smoe_dtype dt = f ? SMOE_F64 : SMOE_F32;
            double *r = (double *)malloc(sizeof(double) * ROWS * n), *g = (double *)malloc(sizeof(double) * ROWS * n);
            double k[ROWS], alpha[ROWS];
            for (int row = 0; row < ROWS; ++row) {
              random_scores(&seed, r + row * n, n, row % 4);
              for (int64_t i = 0; i < n; ++i) g[row * n + i] = gauss(&seed);
              k[row] = (double)(float)(cap * uniform(&seed));
              alpha[row] = (double)(float)(row % 3 == 0 ? 1e-3 : 0.05 + 2.0 * uniform(&seed));
            }
            rows_out a, b;
            CHECK(run_rows(dt, r, g, ROWS, n, k, alpha, eps, cap, SMOE_ISA_BASELINE, &a), "baseline build");
            CHECK(run_rows(dt, r, g, ROWS, n, k, alpha, eps, cap, isas[which], &b), "%s build", names[which]);
            const size_t es = f ? sizeof(double) : sizeof(float);
            CHECK(memcmp(a.p, b.p, es * ROWS * n) == 0 &&
                      memcmp(a.threshold, b.threshold, sizeof(double) * ROWS) == 0 &&
                      memcmp(a.grad, b.grad, es * ROWS * n) == 0 && memcmp(a.gk, b.gk, es * ROWS) == 0 &&
                      memcmp(a.ga, b.ga, es * ROWS) == 0,
                  "%s n %lld cap %lld eps %g: the baseline and %s builds differ", f ? "f64" : "f32", (long long)n,
                  (long long)cap, eps, names[which]);
            free_rows(&a);
            free_rows(&b);
            free(r);
            free(g);
          }
  }
}

/* Truncated rows: the solve with every candidate active stands when the worst candidate then has
 * p > 0, else the search finds the active set. Both kinds of row (spread scores, so that some
 * fall below the cut, and bunched ones, so that none do) must keep sum p = k, have no nonzero p
 * below the cut of their own threshold, and agree with the float64 result. */
static void test_truncated_rows(void) {
  unsigned seed = 99u;
  int cut_rows = 0, full_rows = 0;
  for (int trial = 0; trial < 400; ++trial) {
    const int64_t n = trial % 2 ? 64 : 8, cap = trial % 3 == 0 ? 4 : 8;
    const double spread = trial % 4 < 2 ? 0.05 : 3.0, eps = trial % 5 == 0 ? 0.1 : 1e-2;
    const double c = -log(2 * eps);
    double r[64], g[64];
    for (int64_t i = 0; i < n; ++i) r[i] = (double)(float)(spread * gauss(&seed)), g[i] = gauss(&seed);
    const double k = (double)(float)(0.2 + (cap - 0.4) * uniform(&seed)), alpha = 0.5;
    row_result d = run_row(SMOE_F64, r, (int)n, k, alpha, eps, (int)cap, g);
    row_result fl = run_row(SMOE_F32, r, (int)n, k, alpha, eps, (int)cap, g);
    double sum = 0;
    int active = 0, below = 0;
    for (int64_t i = 0; i < n; ++i) {
      sum += fl.p[i];
      active += fl.p[i] > 0;
      const double x = (r[i] - fl.threshold) / alpha;
      below += fl.p[i] > 0 && x < -c - 1e-4;
      check_close(fl.p[i], d.p[i], 2e-6, "truncated f32 vs f64 p", (int)i);
      check_close(fl.grad[i], d.grad[i], 2e-4 / alpha, "truncated f32 vs f64 dL/dr", (int)i);
    }
    check_close(sum, k, 2e-6, "truncated sum p - k", trial);
    CHECK(below == 0, "trial %d: %d nonzero p below the cut", trial, below);
    CHECK(active <= cap, "trial %d: %d active > max_active %lld", trial, active, (long long)cap);
    if (active < cap) ++cut_rows; else ++full_rows;
  }
  CHECK(cut_rows > 50 && full_rows > 50, "both kinds of truncated row were exercised (%d cut, %d full)", cut_rows,
        full_rows);
}

static void test_limits_and_bad_rows(void) {
  const double r[4] = {1, -INFINITY, 3, 2}, g[4] = {1, 2, 3, 4};
  row_result z = run_row(SMOE_F64, r, 4, 0.0, 1.0, 0.0, 4, g);
  for (int i = 0; i < 4; ++i) CHECK(z.p[i] == 0 && z.grad[i] == 0, "k = 0 gives p = 0, zero grads");
  CHECK(isinf(z.threshold) && z.threshold > 0 && z.gk == 0, "k = 0 threshold +inf");
  /* three finite scores: k = 3 is the upper limit, the -inf entry stays 0 */
  row_result o = run_row(SMOE_F64, r, 4, 3.0, 1.0, 0.0, 4, g);
  CHECK(o.p[0] == 1 && o.p[1] == 0 && o.p[2] == 1 && o.p[3] == 1, "k = m gives ones on the candidates");
  CHECK(isinf(o.threshold) && o.threshold < 0, "k = m threshold -inf");
  row_result big = run_row(SMOE_F64, r, 4, 3.5, 1.0, 0.0, 4, g);
  for (int i = 0; i < 4; ++i) CHECK(isnan(big.p[i]) && isnan(big.grad[i]), "k > m gives a NaN row");
  const double rn[3] = {1, NAN, 0}, rp[3] = {1, INFINITY, 0};
  row_result n1 = run_row(SMOE_F32, rn, 3, 1.0, 1.0, 0.0, 3, NULL);
  row_result n2 = run_row(SMOE_F32, rp, 3, 1.0, 1.0, 0.0, 3, NULL);
  for (int i = 0; i < 3; ++i) CHECK(isnan(n1.p[i]) && isnan(n2.p[i]), "NaN / +inf score gives a NaN row");
  row_result na = run_row(SMOE_F64, r, 4, 1.0, 0.0, 0.0, 4, NULL);
  CHECK(isnan(na.p[0]) && isnan(na.threshold), "alpha = 0 gives a NaN row");
  /* float64: alpha * tau (tau ~ -88 at k = FLT_MIN) past the double range is out of range too (the
   * backward could not use an infinite threshold); just below it the row is valid */
  const double rs[3] = {0.25, -0.62, 0.02}, gs[3] = {1, 2, 3};
  row_result over = run_row(SMOE_F64, rs, 3, 1.1754943508222875e-38, 4e306, 0.0, 3, gs);
  for (int i = 0; i < 3; ++i) CHECK(isnan(over.p[i]) && isnan(over.grad[i]), "threshold overflow gives a NaN row");
  CHECK(isnan(over.threshold) && isnan(over.gk) && isnan(over.ga), "threshold overflow: threshold and k, alpha grads NaN");
  row_result under = run_row(SMOE_F64, rs, 3, 1.1754943508222875e-38, 1e306, 0.0, 3, gs);
  CHECK(isfinite(under.threshold) && under.threshold > 8e307, "alpha = 1e306: a finite threshold (%g)", under.threshold);
  for (int i = 0; i < 3; ++i) check_close(under.p[i], 1.1754943508222875e-38 / 3, 1e-50, "alpha = 1e306 p", i);
  /* -inf entries are never active and get no gradient */
  row_result m = run_row(SMOE_F64, r, 4, 1.5, 0.7, 0.0, 4, g);
  CHECK(m.p[1] == 0 && m.grad[1] == 0, "-inf score: p = 0, grad = 0");
  check_close(m.p[0] + m.p[2] + m.p[3], 1.5, 1e-14, "-inf sum", 0);
}

static void test_d_zero_branch(void) {
  /* integer k with gaps far beyond exp underflow in float32 (and float64) */
  const double r[4] = {0, 200, 400, 600}, r2[4] = {0, 1000, 2000, 3000};
  for (int f = 0; f < 2; ++f) {
    row_result a = run_row(f ? SMOE_F64 : SMOE_F32, f ? r2 : r, 4, 2.0, 1.0, 0.0, 4, NULL);
    const double want[4] = {0, 0, 1, 1};
    for (int i = 0; i < 4; ++i) check_close(a.p[i], want[i], 1e-12, "D = 0 branch", i);
  }
}

static void test_multi_row_isolation_and_determinism(void) {
  enum { ROWS = 300, N = 17 };
  float *s = (float *)malloc(sizeof(float) * ROWS * N), *p = (float *)malloc(sizeof(float) * ROWS * N);
  float *p2 = (float *)malloc(sizeof(float) * ROWS * N), *gk = (float *)malloc(sizeof(float) * ROWS);
  double *th = (double *)malloc(sizeof(double) * ROWS);
  float k = 2.5f, alpha = 0.8f;
  unsigned seed = 7u;
  for (int i = 0; i < ROWS * N; ++i) s[i] = (float)gauss(&seed);
  s[5 * N + 3] = NAN;
  smoe_topk_fwd_args fa;
  memset(&fa, 0, sizeof fa);
  fa.rows = ROWS;
  fa.n = N;
  fa.dtype = SMOE_F32;
  fa.scores = s;
  fa.k = &k;
  fa.alpha = &alpha;
  fa.eps = 0.01;
  fa.max_active = 6;
  fa.p = p;
  fa.threshold = th;
  CHECK(smoe_topk_fwd(&fa, 0, ROWS) == SMOE_OK, "multi-row forward");
  /* chunked like a thread pool would: same bits */
  fa.p = p2;
  CHECK(smoe_topk_fwd(&fa, 0, 100) == SMOE_OK && smoe_topk_fwd(&fa, 100, ROWS) == SMOE_OK, "chunks");
  CHECK(memcmp(p, p2, sizeof(float) * ROWS * N) == 0, "chunked forward is bit-identical");
  for (int row = 0; row < ROWS; ++row) {
    double sum = 0;
    int nan = 0, nz = 0;
    for (int i = 0; i < N; ++i) {
      sum += p[row * N + i];
      nan += isnan(p[row * N + i]);
      nz += p[row * N + i] != 0;
    }
    if (row == 5)
      CHECK(nan == N, "the NaN row is all NaN");
    else {
      CHECK(nan == 0 && fabs(sum - 2.5) < 1e-5 && nz <= 6, "row %d: sum %g, nonzeros %d", row, sum, nz);
      gk[row] = (float)(row % 7) * 0.1f - 0.3f;
    }
  }
  gk[5] = 0.25f;
  const float total = smoe_sum_f32(gk, ROWS);
  CHECK(total == smoe_sum_f32(gk, ROWS), "deterministic sum");
  double want = 0;
  for (int i = 0; i < ROWS; ++i) want += gk[i];
  check_close(total, want, 1e-5, "sum", 0);
  CHECK(smoe_sum_f64(NULL, 0) == 0.0, "empty sum");
  free(s);
  free(p);
  free(p2);
  free(gk);
  free(th);
}

static void test_bad_arguments(void) {
  float s[4] = {0, 1, 2, 3}, p[4], k = 1, alpha = 1;
  double th;
  smoe_topk_fwd_args fa;
  memset(&fa, 0, sizeof fa);
  fa.rows = 1;
  fa.n = 4;
  fa.dtype = SMOE_F32;
  fa.scores = s;
  fa.k = &k;
  fa.alpha = &alpha;
  fa.max_active = 4;
  fa.p = p;
  fa.threshold = &th;
  CHECK(smoe_topk_fwd(NULL, 0, 1) == SMOE_ERR_ARG, "NULL args");
  fa.max_active = 5;
  CHECK(smoe_topk_fwd(&fa, 0, 1) == SMOE_ERR_ARG, "max_active > n");
  fa.max_active = 0;
  CHECK(smoe_topk_fwd(&fa, 0, 1) == SMOE_ERR_ARG, "max_active = 0");
  fa.max_active = 4;
  fa.eps = 0.5;
  CHECK(smoe_topk_fwd(&fa, 0, 1) == SMOE_ERR_ARG, "eps = 0.5");
  fa.eps = 0;
  CHECK(smoe_topk_fwd(&fa, 0, 2) == SMOE_ERR_ARG, "row range past the end");
  fa.scores = NULL;
  CHECK(smoe_topk_fwd(&fa, 0, 1) == SMOE_ERR_ARG, "NULL scores");
  fa.scores = s;
  fa.dtype = (smoe_dtype)9;
  CHECK(smoe_topk_fwd(&fa, 0, 1) == SMOE_ERR_ARG, "unknown dtype");
  fa.dtype = SMOE_F32;
  CHECK(smoe_topk_fwd(&fa, 0, 0) == SMOE_OK, "empty range");
  CHECK(smoe_topk_scratch_bytes(SMOE_F32, 4, 5) == 0, "scratch size of a bad cap");
}

static void test_half_conversions(void) {
  /* every f16 and bf16 bit pattern survives a round trip through float */
  for (unsigned b = 0; b < 65536u; ++b) {
    const float h = smoe_f16_bits_to_float((uint16_t)b), bf = smoe_bf16_bits_to_float((uint16_t)b);
    if (h == h) CHECK(smoe_float_to_f16_bits(h) == b, "f16 round trip of 0x%04x", b);
    if (bf == bf) CHECK(smoe_float_to_bf16_bits(bf) == b, "bf16 round trip of 0x%04x", b);
  }
  CHECK(smoe_f16_bits_to_float(0x3c00) == 1.0f && smoe_f16_bits_to_float(0x0001) == 5.9604644775390625e-8f,
        "f16 decode");
  CHECK(smoe_float_to_f16_bits(65520.0f) == 0x7c00 && smoe_float_to_f16_bits(65519.0f) == 0x7bff, "f16 overflow");
  CHECK(smoe_float_to_f16_bits(1.0f + 1.0f / 2048) == 0x3c00, "f16 ties to even (down)");
  CHECK(smoe_float_to_f16_bits(1.0f + 3.0f / 2048) == 0x3c02, "f16 ties to even (up)");
  CHECK(smoe_float_to_f16_bits(2.98023223876953125e-8f) == 0x0000, "f16 half of the smallest subnormal");
  CHECK(smoe_float_to_f16_bits(4.5e-8f) == 0x0001, "f16 subnormal rounding");
  CHECK(smoe_float_to_bf16_bits(1.00390625f) == 0x3f80, "bf16 ties to even");
  CHECK(isnan(smoe_f16_bits_to_float(smoe_float_to_f16_bits(NAN))), "f16 NaN");
  CHECK(isnan(smoe_bf16_bits_to_float(smoe_float_to_bf16_bits(NAN))), "bf16 NaN");
}

int main(void) {
  test_exp_polynomial();
  test_selection_paths_agree();
  test_rows8_match_row_functions();
  test_rows8_backward_many_active();
  test_long_rows_match_their_candidates();
  test_instruction_sets_agree();
  test_truncated_rows();
  test_vectors();
  test_vjp_tv2();
  test_truncated_vectors();
  test_sums_e256();
  test_limits_and_bad_rows();
  test_d_zero_branch();
  test_multi_row_isolation_and_determinism();
  test_bad_arguments();
  test_half_conversions();
  return harness_summary();
}
