/* Soft top-k sixteen rows at a time on the CPU, float math (float32 scores, and bf16 / f16 storage):
 * rows of 2 to 8 scores with any max_active (Mixtral's E = 8), and longer rows with at most 8
 * candidates (max_active <= 8: the truncated router of E = 16 to 256 experts). "rows8": a row's
 * eight candidate slots.
 *
 * These are the per-row functions of lapsum_row.h with the rows in the vector lanes instead of the
 * scores: a row's numbers live in one lane of [slot][row] arrays, every step is a loop over the
 * group's rows that the compiler turns into vector instructions, and the sequential parts of a row
 * (the sorting network, the prefix and suffix sums, the bracket search) run a group of rows per
 * step. A short row's scores go into the lanes and are sorted there; a longer row's candidates are
 * picked in the lanes too (smoe_rows8_select_lanes, rows up to a length that each instruction
 * set's build sets: lapsum_loops_def.h) or by the per-row selection (smoe_select_f32), and go into
 * the lanes sorted.
 * A lane performs exactly the operations of smoe_topk_fwd_row_f32 and smoe_topk_bwd_row_f32 in the
 * same order (the same sorted values, the same polynomial exp, the same candidates under a cap, the
 * backward's active entries compacted in index order into the same lane tree, the truncated rows'
 * active-set search testing the same counts), so the results are the same bits;
 * tests/c/test_lapsum.c compares them on every kind of row. The CUDA kernels run the per-row
 * functions (thread per row, the same bits again).
 *
 * A row the lanes do not take is redone by the per-row function after its group: a NaN or
 * infinite score (a longer row: fewer finite scores than candidates), k or alpha at or outside a
 * limit, a difference of scores that overflows, a backward row at a limit, without an active entry
 * or with more than 8.
 *
 * Part of the CPU's row loops (lapsum_loops_def.h): included after lapsum_row.h's float32 functions.
 */
#ifndef SMOE_LAPSUM_ROWS8_H
#define SMOE_LAPSUM_ROWS8_H

#include "lapsum_args.h"
#include "smoe_math.h"

/* The longest row taken with any max_active, and the most candidates of a longer row: a row's
 * slots. */
#define SMOE_ROWS8 8

/* Rows per group: two vectors of eight floats per step (AVX2, AVX-512VL's 256-bit registers), one
 * of sixteen (512-bit), four of four (SSE2). A row's steps form one long chain of dependent
 * instructions (sorting network, prefix and suffix sums, bracket search, logs); a second vector of
 * rows in each step gives the core a second chain to overlap: with AVX2 on an Intel Xeon 16 rows
 * per group took 0.86x the time of 8 at E = 4 and 0.98x at E = 8, forward and backward
 * (benchmarks/results/bench_core_isa_intel.txt, appendix A). */
#define SMOE_ROWS8_GROUP 16

/* 1 where the forward / backward of a call takes the grouped rows' path. */
static inline int smoe_rows8_fits(smoe_dtype dtype, int64_t n, int64_t max_active) {
  return dtype != SMOE_F64 && n >= 2 && (n <= SMOE_ROWS8 || max_active <= SMOE_ROWS8);
}

/* a > b ? a : b for the sorting network, through smoe_where_f32 (vectorised; see there). The
 * values are finite in every lane whose result is used. */
static inline float smoe_rows8_max(float a, float b) { return smoe_where_f32(a > b, a, b); }
static inline float smoe_rows8_min(float a, float b) { return smoe_where_f32(a > b, b, a); }

/* c ? a : b for integers through bit masks (a ?: that the vectoriser keeps as a branch), in
 * unsigned words as smoe_where_f32: compiled as C++ (the extension), the signed form
 * b ^ ((a ^ b) & -c) of a float comparison's c became a branch again, and the forward of E = 8
 * took 1.25x the time of the C build. */
static inline int32_t smoe_rows8_pick(int32_t c, int32_t a, int32_t b) {
  const uint32_t m = 0u - (uint32_t)(c != 0);
  return (int32_t)(((uint32_t)a & m) | ((uint32_t)b & ~m));
}

/* One comparator of the network on all the group's rows: the larger score to slot i. */
#define SMOE_ROWS8_CX(i, j)                                     \
  SMOE_SIMD for (int g = 0; g < SMOE_ROWS8_GROUP; ++g) {              \
    const float x_ = s[i][g], y_ = s[j][g];                     \
    s[i][g] = smoe_rows8_max(x_, y_);                           \
    s[j][g] = smoe_rows8_min(x_, y_);                           \
  }

/* The lanes' sum tree of smoe_lane_sum_f32, over the score slots of a group's rows. */
static inline void smoe_rows8_lane_sum(float v[SMOE_LANES][SMOE_ROWS8_GROUP], float *out) {
  SMOE_SIMD
  for (int g = 0; g < SMOE_ROWS8_GROUP; ++g)
    out[g] = ((v[0][g] + v[1][g]) + (v[2][g] + v[3][g])) + ((v[4][g] + v[5][g]) + (v[6][g] + v[7][g]));
}

/* smoe_lapsum_solve_f32 in the lanes: the threshold of each row's best a[g] sorted scores s (the
 * counts differ by row after the active-set search) for the targets K, as tau and the pivot score
 * s_piv. nn: the longest a (the loops' bound). U, V: scratch. */
static inline void smoe_rows8_solve(float s[SMOE_ROWS8][SMOE_ROWS8_GROUP], int nn, const int32_t *a, const float *K,
                                    const float *alpha, const float *inv_alpha, float U[SMOE_ROWS8][SMOE_ROWS8_GROUP],
                                    float V[SMOE_ROWS8][SMOE_ROWS8_GROUP], float *tau, float *s_piv) {
  enum { G = SMOE_ROWS8_GROUP };
  /* the factors e^{-gap} (into V), the prefix sums U, the suffix sums V (0 from a - 1 on) */
  for (int i = 0; i + 1 < nn; ++i) {
    SMOE_SIMD
    for (int g = 0; g < G; ++g) V[i][g] = smoe_exp_f32((s[i + 1][g] - s[i][g]) * inv_alpha[g]);
  }
  SMOE_SIMD
  for (int g = 0; g < G; ++g) U[0][g] = 0.0f, V[nn > 1 ? nn - 1 : 0][g] = 0.0f; /* (nn >= 1: the test tells GCC) */
  for (int i = 0; i + 1 < nn; ++i) {
    SMOE_SIMD
    for (int g = 0; g < G; ++g) U[i + 1][g] = V[i][g] * (1.0f + U[i][g]);
  }
  for (int i = nn - 2; i >= 0; --i) {
    SMOE_SIMD
    for (int g = 0; g < G; ++g) V[i][g] = smoe_where_f32(i >= a[g] - 1, 0.0f, V[i][g] * (1.0f + V[i + 1][g]));
  }
  /* The bracket: the last i < a whose soft count C_i = i + 1/2 + (V_i - U_i) / 2 is below K; the
   * counts at the ends; the bracket's two scores and sums. */
  int32_t last[G];
  float count_last[G], U_last[G], s_l[G], s_l1[G], U_l[G], V_l1[G];
  SMOE_SIMD
  for (int g = 0; g < G; ++g) last[g] = 0, count_last[g] = U_last[g] = 0.0f;
  for (int i = 0; i < nn; ++i) {
    SMOE_SIMD
    for (int g = 0; g < G; ++g) {
      const float count = ((float)i + 0.5f) + 0.5f * (V[i][g] - U[i][g]);
      last[g] = ((count < K[g]) & (i < a[g])) ? i : last[g];
      count_last[g] = smoe_where_f32(i == a[g] - 1, count, count_last[g]);
      U_last[g] = smoe_where_f32(i == a[g] - 1, U[i][g], U_last[g]);
    }
  }
  SMOE_SIMD
  for (int g = 0; g < G; ++g) s_l[g] = s_l1[g] = U_l[g] = V_l1[g] = 0.0f;
  for (int i = 0; i + 1 < nn; ++i) {
    SMOE_SIMD
    for (int g = 0; g < G; ++g) {
      const int at = last[g] == i;
      s_l[g] = smoe_where_f32(at, s[i][g], s_l[g]);
      s_l1[g] = smoe_where_f32(at, s[i + 1][g], s_l1[g]);
      U_l[g] = smoe_where_f32(at, U[i][g], U_l[g]);
      V_l1[g] = smoe_where_f32(at, V[i + 1][g], V_l1[g]);
    }
  }
  /* The three cases, each a log of one argument or a difference of two: the arguments in the
   * lanes, then sqrt and the logarithms lane by lane (libm's logf is a scalar call: a vector logf
   * would not give the same bits), then tau in the lanes. */
  enum { AT_TOP, AT_TOP_TINY, AT_BOTTOM, D_POS, D_NEG, D_ZERO };
  int32_t kase[G], piv[G];
  float rad[G], D[G], P[G], Q[G], gap[G], q_top[G], log1[G], log2[G];
  SMOE_SIMD
  for (int g = 0; g < G; ++g) {
    const float count0 = 0.5f + 0.5f * (V[0][g] - U[0][g]);
    gap[g] = (s_l[g] - s_l1[g]) / alpha[g];
    const float E = smoe_exp_f32(-gap[g]);
    Q[g] = 1 + U_l[g], P[g] = 1 + V_l1[g];
    D[g] = K[g] - (float)(last[g] + 1);
    rad[g] = D[g] * D[g] + P[g] * Q[g] * E;
    q_top[g] = 2 * K[g] / (1 + V[0][g]);
    /* every comparison made unconditionally: a float compare inside a ?: stays a branch (it may
     * trap under -ftrapping-math) and would stop the vectoriser */
    const int32_t d_pos = D[g] > 0, d_neg = D[g] < 0, tiny = !(q_top[g] > 1e-30f);
    const int32_t at_top = K[g] <= count0, at_bottom = K[g] >= count_last[g];
    const int32_t bracket = smoe_rows8_pick(d_pos, D_POS, smoe_rows8_pick(d_neg, D_NEG, D_ZERO));
    const int32_t top = smoe_rows8_pick(tiny, AT_TOP_TINY, AT_TOP);
    kase[g] = smoe_rows8_pick(at_top, top, smoe_rows8_pick(at_bottom, AT_BOTTOM, bracket));
  }
  for (int g = 0; g < G; ++g) {
    const float root = sqrtf(rad[g]);
    float a1, a2 = 1.0f;
    switch (kase[g]) {
      case AT_TOP: a1 = q_top[g]; break;
      case AT_TOP_TINY: a1 = 2 * K[g], a2 = 1 + V[0][g]; break;
      case AT_BOTTOM: a1 = (1 + U_last[g]) / (2 * ((float)a[g] - K[g])); break;
      case D_POS: a1 = (D[g] + root) / P[g]; break;
      case D_NEG: a1 = Q[g], a2 = root - D[g]; break;
      default: a1 = Q[g], a2 = P[g]; break;
    }
    log1[g] = logf(a1);
    log2[g] = logf(a2);
  }
  SMOE_SIMD
  for (int g = 0; g < G; ++g) {
    const int32_t c = kase[g];
    const int32_t gap_finite = gap[g] < SMOE_GEN_MAX_f32;
    const float capped_gap = smoe_where_f32(gap_finite, gap[g], SMOE_GEN_MAX_f32);
    const float one_log = log1[g], two_logs = log1[g] - log2[g];
    const float zero_d = 0.5f * ((capped_gap + log1[g]) - log2[g]);
    tau[g] = smoe_where_f32((c == AT_TOP_TINY) | (c == D_NEG), two_logs, smoe_where_f32(c == D_ZERO, zero_d, one_log));
    const int32_t pivot_at = (c == AT_BOTTOM) * (a[g] - 1) + (c == D_POS) * (last[g] + 1) +
                             ((c == D_NEG) | (c == D_ZERO)) * last[g];
    piv[g] = pivot_at; /* 0 at the top */
    s_piv[g] = 0.0f;
  }
  for (int i = 0; i < nn; ++i) {
    SMOE_SIMD
    for (int g = 0; g < G; ++g) s_piv[g] = smoe_where_f32(piv[g] == i, s[i][g], s_piv[g]);
  }
}

/* smoe_active_count_f32 in the lanes for the rows with search[g] set: which candidates the
 * truncated count keeps (its galloping and bisection steps replayed on every count it can
 * test, so the same count comes out). Sets a[g], and K[g] for the solve on that many. */
static inline void smoe_rows8_active(float s[SMOE_ROWS8][SMOE_ROWS8_GROUP], int m, const int32_t *search, const float *k,
                                     const float *inv_alpha, float eps, float cut, int32_t *a, float *K) {
  enum { G = SMOE_ROWS8_GROUP };
  /* below[g] bit j: the truncated count at the cut of candidate j is below k */
  uint32_t below[G];
  SMOE_SIMD
  for (int g = 0; g < G; ++g) below[g] = 0;
  for (int j = 1; j < m; ++j) {
    float acc[SMOE_LANES][G];
    for (int i = 0; i < j; ++i) {
      SMOE_SIMD
      for (int g = 0; g < G; ++g) acc[i][g] = 0.0f + smoe_lap_cdf_f32((s[i][g] - s[j][g]) * inv_alpha[g] - cut);
    }
    for (int i = j; i < SMOE_LANES; ++i) {
      SMOE_SIMD
      for (int g = 0; g < G; ++g) acc[i][g] = 0.0f;
    }
    float count[G];
    smoe_rows8_lane_sum(acc, count);
    SMOE_SIMD
    for (int g = 0; g < G; ++g) below[g] |= (uint32_t)(count[g] < k[g] * (1 - eps) + (float)j * eps) << j;
  }
  for (int g = 0; g < G; ++g) {
    if (!search[g]) continue;
#define SMOE_BELOW_K(j) ((below[g] >> (j)) & 1u)
#define SMOE_TIED(j) (s[j][g] == s[(j) - 1][g])
    int64_t active;
    SMOE_ACTIVE_COUNT(m, k[g], SMOE_BELOW_K, SMOE_TIED, active);
#undef SMOE_TIED
#undef SMOE_BELOW_K
    a[g] = (int32_t)active;
    const float Kg = k[g] * (1 - eps) + (float)active * eps;
    K[g] = Kg < (float)active ? Kg : nextafterf((float)active, 0.0f);
  }
}

/* The candidates of a group's longer rows with the rows in the lanes: smoe_select_f32's result for
 * each row (its best m finite scores, best first, equal scores by index; -0 read as +0) in
 * s[0..m) and their places in idx, picked[g] = 0 where that selection fails (a NaN or +inf score,
 * fewer than m finite ones). Each lane keeps its row's best 8 (4 when m <= 4) sorted and inserts
 * the scores in index order: a score goes below every kept one it does not beat, so an earlier
 * equal score stays first. No branch depends on the scores; every score costs the same few vector steps, which
 * makes this the faster selection up to a row length that depends on the vector width
 * (lapsum_loops_def.h). */
static inline void smoe_rows8_select_lanes(const smoe_topk_fwd_args *a, int64_t row0, int rows, int m,
                                           float s[SMOE_ROWS8][SMOE_ROWS8_GROUP],
                                           int32_t idx[SMOE_ROWS8][SMOE_ROWS8_GROUP], int32_t *picked) {
  enum { G = SMOE_ROWS8_GROUP };
  const int64_t n = a->n;
  int32_t bad[G], lane_row[G]; /* lane_row: the lane's row past row0 (the lanes past `rows` repeat row0) */
  SMOE_SIMD
  for (int g = 0; g < G; ++g) lane_row[g] = g < rows ? g : 0, bad[g] = 0;
  for (int i = 0; i < SMOE_ROWS8; ++i) {
    SMOE_SIMD
    for (int g = 0; g < G; ++g) s[i][g] = -INFINITY, idx[i][g] = 0;
  }
  /* One step: the score v of each lane's row enters its kept scores, the best 8 (SMOE_ROWS8_KEEP8)
   * or, for m <= 4, the best 4 (SMOE_ROWS8_KEEP4: half the steps). Slot i takes slot i - 1 where v
   * beats that one, else v where v beats slot i, else keeps its own (v beats the kept scores from
   * some slot on: they are sorted). Written out slot by slot: in the row loops' large flattened
   * functions GCC no longer unrolls the loops over the slots, and the lane loop stays scalar. */
#define SMOE_ROWS8_SHIFT(i)                                                                                 \
  s[i][g] = smoe_where_f32(b##i##_, s[i - 1][g], smoe_where_f32(v > s_##i, v, s_##i));                      \
  idx[i][g] = smoe_rows8_pick(b##i##_, idx[i - 1][g], smoe_rows8_pick(v > s_##i, (int32_t)j, idx[i][g]));
#define SMOE_ROWS8_KEEP8()                                                                                  \
  const float s_0 = s[0][g], s_1 = s[1][g], s_2 = s[2][g], s_3 = s[3][g], s_4 = s[4][g], s_5 = s[5][g],     \
              s_6 = s[6][g], s_7 = s[7][g];                                                                 \
  const int32_t b1_ = v > s_0, b2_ = v > s_1, b3_ = v > s_2, b4_ = v > s_3, b5_ = v > s_4, b6_ = v > s_5,   \
                b7_ = v > s_6;                                                                              \
  SMOE_ROWS8_SHIFT(7) SMOE_ROWS8_SHIFT(6) SMOE_ROWS8_SHIFT(5) SMOE_ROWS8_SHIFT(4)                           \
  SMOE_ROWS8_SHIFT(3) SMOE_ROWS8_SHIFT(2) SMOE_ROWS8_SHIFT(1)
#define SMOE_ROWS8_KEEP4()                                                                                  \
  const float s_0 = s[0][g], s_1 = s[1][g], s_2 = s[2][g], s_3 = s[3][g];                                   \
  const int32_t b1_ = v > s_0, b2_ = v > s_1, b3_ = v > s_2;                                                \
  SMOE_ROWS8_SHIFT(3) SMOE_ROWS8_SHIFT(2) SMOE_ROWS8_SHIFT(1)
#define SMOE_ROWS8_INSERT(score, keep)                                                                      \
  SMOE_SIMD                                                                                                 \
  for (int g = 0; g < G; ++g) {                                                                             \
    const float v = (score) + 0.0f;                                                                         \
    bad[g] |= !(v < INFINITY);                                                                              \
    keep() s[0][g] = smoe_where_f32(b1_, v, s_0);                                                           \
    idx[0][g] = smoe_rows8_pick(b1_, (int32_t)j, idx[0][g]);                                                \
  }
  /* Every score of the rows in index order: float32 rows of a whole group with a stride of n between
   * the lanes (no index per lane), others loaded one by one. */
#define SMOE_ROWS8_SCAN(keep)                                                                               \
  if (a->dtype == SMOE_F32 && rows == G) {                                                                  \
    const float *src = (const float *)a->scores + row0 * n;                                                 \
    for (int64_t j = 0; j < n; ++j) SMOE_ROWS8_INSERT(src[g * n + j], keep)                                 \
  } else {                                                                                                  \
    for (int64_t j = 0; j < n; ++j) {                                                                       \
      float x[G];                                                                                           \
      for (int g = 0; g < G; ++g) x[g] = smoe_load_f32(a->scores, a->dtype, (row0 + lane_row[g]) * n + j);  \
      SMOE_ROWS8_INSERT(x[g], keep)                                                                         \
    }                                                                                                       \
  }
  if (m <= 4) {
    SMOE_ROWS8_SCAN(SMOE_ROWS8_KEEP4)
  } else {
    SMOE_ROWS8_SCAN(SMOE_ROWS8_KEEP8)
  }
#undef SMOE_ROWS8_SCAN
#undef SMOE_ROWS8_INSERT
#undef SMOE_ROWS8_KEEP4
#undef SMOE_ROWS8_KEEP8
#undef SMOE_ROWS8_SHIFT
  SMOE_SIMD
  for (int g = 0; g < G; ++g) picked[g] = !bad[g] & (s[m - 1][g] > -INFINITY);
}

/* The forward of smoe_topk_fwd_rows8 for short rows (short_rows = 1: n <= 8) or longer ones (0),
 * these with their candidates picked per row or in the lanes (select_lanes): constants at each
 * call, so that each kind gets its own code. */
static inline void smoe_rows8_fwd(const smoe_topk_fwd_args *a, int64_t row0, int rows, const int short_rows,
                                  const int select_lanes) {
  enum { G = SMOE_ROWS8_GROUP };
  const int64_t n = a->n, cap = a->max_active;
  const float eps = (float)a->eps;
  const int truncated = eps > 0;
  /* m candidates: the best max_active scores (every score when max_active >= n). The slots of a
   * short row hold its scores (r in the row's order, s sorted); those of a longer row its m
   * candidates, sorted (r = s, and idx their place in the row). */
  const int m = (int)(cap < n ? cap : n);
  const int nn = short_rows ? (int)n : m;
  float r[SMOE_ROWS8][G], s[SMOE_ROWS8][G], p[SMOE_ROWS8][G], U[SMOE_ROWS8][G], V[SMOE_ROWS8][G];
  float k[G], alpha[G], inv_alpha[G], K[G], tau[G], s_piv[G];
  int32_t idx[SMOE_ROWS8][G], redo[G], active[G], search[G], picked[G];
  double threshold[G];

  /* Rows to lanes; the lanes past `rows` repeat row0 (computed, never stored). A whole group of
   * float32 short rows loads with a stride of n between the lanes (no index per lane: vector
   * gathers), the others row by row. */
  const int whole_f32 = short_rows && a->dtype == SMOE_F32 && rows == G;
  if (whole_f32) {
    const float *src = (const float *)a->scores + row0 * n;
    for (int j = 0; j < n; ++j) {
      SMOE_SIMD
      for (int g = 0; g < G; ++g) r[j][g] = src[g * n + j];
    }
  }
  for (int g = 0; g < G; ++g) {
    const int64_t row = row0 + (g < rows ? g : 0);
    k[g] = ((const float *)a->k)[row * a->k_stride];
    alpha[g] = ((const float *)a->alpha)[row * a->alpha_stride];
    if (select_lanes) {
      continue;
    } else if (!short_rows) {
      /* the per-row function's selection (no merge buffers below SMOE_INSERTION_CAP candidates) */
      float val[SMOE_TOPK_SMALL_CAP + SMOE_LANES];
      int32_t at[SMOE_TOPK_SMALL_CAP];
      const int64_t got = smoe_select_f32(a->scores, a->dtype, row * n, n, cap, val, at, val, at, 1);
      picked[g] = got == m; /* else a NaN or +inf score, or fewer finite scores than m */
      for (int j = 0; j < m; ++j) r[j][g] = s[j][g] = picked[g] ? val[j] : 0.0f, idx[j][g] = at[j];
    } else if (whole_f32) {
      continue;
    } else if (a->dtype == SMOE_F32) {
      const float *src = (const float *)a->scores + row * n;
      for (int j = 0; j < n; ++j) r[j][g] = src[j];
    } else {
      for (int j = 0; j < n; ++j) r[j][g] = smoe_load_f32(a->scores, a->dtype, row * n + j);
    }
  }
  if (select_lanes) {
    smoe_rows8_select_lanes(a, row0, rows, m, s, idx, picked);
    for (int j = 0; j < m; ++j) {
      SMOE_SIMD
      for (int g = 0; g < G; ++g) r[j][g] = s[j][g] = smoe_where_f32(picked[g], s[j][g], 0.0f);
    }
  }
  const float m_f = (float)m, K_max = nextafterf(m_f, 0.0f);
  SMOE_SIMD
  for (int g = 0; g < G; ++g) {
    inv_alpha[g] = 1.0f / alpha[g];
    /* the per-row function's argument rule, and its limits k = 0 and k = m */
    const int bad_alpha = !((alpha[g] > 0.0f) & (alpha[g] < INFINITY) & (inv_alpha[g] < INFINITY));
    redo[g] = bad_alpha | !((k[g] > 0.0f) & (k[g] < m_f));
    const float Kg = truncated ? k[g] * (1.0f - eps) + m_f * eps : k[g];
    K[g] = smoe_where_f32(!(Kg < m_f), K_max, Kg);
    active[g] = m;
  }
  if (short_rows) {
    /* Sorted best first; -0 is read as +0, and the slots past n hold -inf, as in the key network. */
    for (int j = 0; j < nn; ++j) {
      SMOE_SIMD
      for (int g = 0; g < G; ++g) {
        redo[g] |= !(fabsf(r[j][g]) < INFINITY);
        s[j][g] = r[j][g] + 0.0f;
      }
    }
    for (int j = nn; j < SMOE_ROWS8; ++j) {
      SMOE_SIMD
      for (int g = 0; g < G; ++g) s[j][g] = -INFINITY;
    }
    SMOE_SORT8_NETWORK(SMOE_ROWS8_CX)
  } else {
    SMOE_SIMD
    for (int g = 0; g < G; ++g) redo[g] |= !picked[g];
  }
  /* A difference of two scores that overflows (|s| near FLT_MAX) takes the per-row function's
   * division of each score instead: the largest difference, the best minus the worst, decides. */
  SMOE_SIMD
  for (int g = 0; g < G; ++g) redo[g] |= !(s[0][g] - s[nn - 1][g] <= SMOE_GEN_MAX_f32);

  /* Which scores are candidates, in the row's own order: under a cap (m < n) those above the m-th
   * best score v, and of the scores equal to v the first ones by index, as many as are left. */
  int32_t cand[SMOE_ROWS8][G];
  for (int j = 0; j < nn; ++j) {
    SMOE_SIMD
    for (int g = 0; g < G; ++g) cand[j][g] = 1;
  }
  if (m < nn) {
    int32_t left[G];
    SMOE_SIMD
    for (int g = 0; g < G; ++g) left[g] = m;
    for (int j = 0; j < nn; ++j) {
      SMOE_SIMD
      for (int g = 0; g < G; ++g) left[g] -= r[j][g] > s[m - 1][g];
    }
    for (int j = 0; j < nn; ++j) {
      SMOE_SIMD
      for (int g = 0; g < G; ++g) {
        const int32_t tie = r[j][g] == s[m - 1][g];
        cand[j][g] = (r[j][g] > s[m - 1][g]) | (tie & (left[g] > 0));
        left[g] -= tie;
      }
    }
  }
  /* First every candidate active: p in the row's own order (the per-row function computes the same
   * x from the sorted copy of the score), 0 off the candidates; a lone candidate carries all of k
   * (the per-row function's exact case). */
  smoe_rows8_solve(s, m, active, K, alpha, inv_alpha, U, V, tau, s_piv);
  int32_t above_cut[G];
  SMOE_SIMD
  for (int g = 0; g < G; ++g) above_cut[g] = 1;
  for (int j = 0; j < nn; ++j) {
    SMOE_SIMD
    for (int g = 0; g < G; ++g) {
      const float F = smoe_lap_cdf_f32((r[j][g] - s_piv[g]) * inv_alpha[g] + tau[g]);
      const float pl = (F - eps) / (1.0f - eps);
      above_cut[g] &= !cand[j][g] | (pl > 0.0f);
      const float pj = smoe_where_f32(m == 1, k[g], truncated ? smoe_where_f32(pl > 0.0f, pl, 0.0f) : F);
      p[j][g] = smoe_where_f32(cand[j][g], pj, 0.0f);
    }
  }
  int any_search = 0;
  SMOE_SIMD_REDUCE(|, any_search)
  for (int g = 0; g < G; ++g) {
    search[g] = truncated & !above_cut[g] & !redo[g];
    any_search |= search[g];
    threshold[g] = (double)s_piv[g] - (double)alpha[g] * (double)tau[g];
  }
  /* A lone row of the group that searches is redone per row instead (the same bits): the search
   * and the second solve cost every lane of the group as much as all of them searching. On an
   * Intel Xeon (AVX-512, E = 8, max_active 8, N(0, 1) scores: a group in four searches for one
   * row) the forward took 0.89x the time (AVX2 0.88x, the baseline build 0.84x), 0.93 to 0.95x with
   * scores of spread 1.3, and the same from spread 1.6 on, where more rows search; redoing up to
   * two rows per row gained no more, and every searching row per row took 4.7x the time at spread 3
   * (benchmarks/results/bench_core_select_lanes.txt, appendix F). */
  if (any_search) {
    int searching = 0;
    for (int g = 0; g < rows; ++g) searching += search[g];
    if (searching == 1) {
      for (int g = 0; g < G; ++g) redo[g] |= search[g], search[g] = 0;
      any_search = 0;
    }
  }
  /* A truncated row whose worst candidate fell below the cut: the active set, then the solve on
   * it, p on the active scores (those at or above the last active one: ties are kept whole) and 0
   * elsewhere. The search may keep every candidate (rounding at the cut): that row keeps the first
   * solve. */
  if (any_search) {
    smoe_rows8_active(s, m, search, k, inv_alpha, eps, (float)smoe_cut_from_eps(a->eps), active, K);
    int any_fewer = 0;
    SMOE_SIMD_REDUCE(|, any_fewer)
    for (int g = 0; g < G; ++g) {
      search[g] &= active[g] < m;
      any_fewer |= search[g];
    }
    if (any_fewer) {
      smoe_rows8_solve(s, m, active, K, alpha, inv_alpha, U, V, tau, s_piv);
      float s_worst[G];
      SMOE_SIMD
      for (int g = 0; g < G; ++g) s_worst[g] = 0.0f;
      for (int i = 0; i < m; ++i) {
        SMOE_SIMD
        for (int g = 0; g < G; ++g) s_worst[g] = smoe_where_f32(i == active[g] - 1, s[i][g], s_worst[g]);
      }
      for (int j = 0; j < nn; ++j) {
        SMOE_SIMD
        for (int g = 0; g < G; ++g) {
          const float F = smoe_lap_cdf_f32((r[j][g] - s_piv[g]) * inv_alpha[g] + tau[g]);
          const float pl = (F - eps) / (1.0f - eps);
          /* the one active expert carries all of k (the per-row function's exact case) */
          const float pj = smoe_where_f32(active[g] == 1, k[g], smoe_where_f32(pl > 0.0f, pl, 0.0f));
          const int32_t kept = cand[j][g] & (r[j][g] >= s_worst[g]);
          p[j][g] = smoe_where_f32(search[g], smoe_where_f32(kept, pj, 0.0f), p[j][g]);
        }
      }
      for (int g = 0; g < G; ++g)
        if (search[g]) threshold[g] = (double)s_piv[g] - (double)alpha[g] * (double)tau[g];
    }
  }
  /* A whole group of float32 short rows none of which is redone: p stored with a stride of n
   * between the lanes, as the scores were loaded (a row that is redone reads its scores again,
   * after the others' p are stored: that group takes the loop below). */
  int any_redo = 0;
  SMOE_SIMD_REDUCE(|, any_redo)
  for (int g = 0; g < G; ++g) any_redo |= redo[g];
  if (whole_f32 && !any_redo) {
    float *dst = (float *)a->p + row0 * n;
    for (int j = 0; j < n; ++j) {
      SMOE_SIMD
      for (int g = 0; g < G; ++g) dst[g * n + j] = p[j][g];
    }
    SMOE_SIMD
    for (int g = 0; g < G; ++g) a->threshold[row0 + g] = threshold[g];
    return;
  }
  for (int g = 0; g < rows; ++g) {
    const int64_t row = row0 + g;
    if (redo[g]) {
      smoe_topk_fwd_row_f32(a, row, 0, 0, 1); /* at most 8 candidates: no scratch */
      continue;
    }
    if (!short_rows) { /* 0 off the candidates */
      if (a->dtype == SMOE_F32) {
        float *dst = (float *)a->p + row * n;
        for (int64_t j = 0; j < n; ++j) dst[j] = 0.0f;
        for (int j = 0; j < nn; ++j) dst[idx[j][g]] = p[j][g];
      } else {
        smoe_fill_row_f32(a->p, a->dtype, row * n, n, 0.0f);
        for (int j = 0; j < nn; ++j) smoe_store_f32(a->p, a->dtype, row * n + idx[j][g], p[j][g]);
      }
    } else if (a->dtype == SMOE_F32) {
      float *dst = (float *)a->p + row * n;
      for (int j = 0; j < n; ++j) dst[j] = p[j][g];
    } else {
      for (int j = 0; j < n; ++j) smoe_store_f32(a->p, a->dtype, row * n + j, p[j][g]);
    }
    a->threshold[row] = threshold[g];
  }
}

/* Forward of rows [begin, end) (smoe_rows8_fits), a group of rows at a time, one function per kind
 * of row: short (n <= 8), longer with the candidates picked in the lanes, or per row
 * (lapsum_loops_def.h builds them apart: in one function with the longer rows' selection, the short
 * rows' code takes 7 % more instructions). */
static inline void smoe_topk_fwd_rows8_kind(const smoe_topk_fwd_args *a, int64_t begin, int64_t end,
                                            const int short_rows, const int select_lanes) {
  for (int64_t row = begin; row < end; row += SMOE_ROWS8_GROUP)
    smoe_rows8_fwd(a, row, (int)(end - row < SMOE_ROWS8_GROUP ? end - row : SMOE_ROWS8_GROUP), short_rows,
                   select_lanes);
}
static inline void smoe_topk_fwd_rows8_short(const smoe_topk_fwd_args *a, int64_t begin, int64_t end) {
  smoe_topk_fwd_rows8_kind(a, begin, end, 1, 0);
}
static inline void smoe_topk_fwd_rows8_lanes(const smoe_topk_fwd_args *a, int64_t begin, int64_t end) {
  smoe_topk_fwd_rows8_kind(a, begin, end, 0, 1);
}
static inline void smoe_topk_fwd_rows8_long(const smoe_topk_fwd_args *a, int64_t begin, int64_t end) {
  smoe_topk_fwd_rows8_kind(a, begin, end, 0, 0);
}

/* Backward of rows [row0, row0 + rows), rows <= SMOE_ROWS8_GROUP (smoe_rows8_fits); gk / ga: the rows'
 * gradient contributions, indexed by row; rs / is: the per-row function's scratch (lapsum.c's), for
 * the rows it redoes. */
static inline void smoe_topk_bwd_rows8(const smoe_topk_bwd_args *a, int64_t row0, int rows, float *rs, int32_t *is,
                                       float *gk, float *ga) {
  enum { G = SMOE_ROWS8_GROUP, L = SMOE_LANES };
  const int64_t n = a->n;
  const float eps = (float)a->eps;
  const int every_finite = a->eps == 0 && a->max_active >= n;
  /* The active entries of each row compacted in index order (X: score then x, Gr: upstream
   * gradient, I: index), zeros past them: the per-row function's one block. Slot L takes the
   * entries past the first L (a row with more than L active entries is redone). */
  float X[L + 1][G], Gr[L + 1][G], W[L][G], alpha[G], mu[G], s_ratio[G], phi_scale[G];
  int32_t I[L + 1][G], count[G], redo[G], wide[G];
  double b[G];
  for (int g = 0; g < G; ++g) {
    const int64_t row = row0 + (g < rows ? g : 0), base = row * n;
    b[g] = a->threshold[row];
    alpha[g] = ((const float *)a->alpha)[row * a->alpha_stride];
    int c = 0;
    if (n <= L) {
      for (int j = 0; j < n; ++j) {
        const float rj = smoe_load_f32(a->scores, a->dtype, base + j);
        X[c][g] = rj;
        Gr[c][g] = smoe_load_f32(a->grad_p, a->dtype, base + j);
        I[c][g] = j;
        c += every_finite ? (rj > -INFINITY) & (rj < INFINITY) : smoe_load_f32(a->p, a->dtype, base + j) != 0.0f;
      }
    } else {
      /* p != 0 (at most max_active <= 8 entries): a bit mask per block, one step per entry. (Tried
       * and dropped: every lane written to slot c and c advanced past the active ones, no branch
       * per entry; faster for float32 rows in cache, up to 1.2x slower with bfloat16 storage,
       * benchmarks/results/bench_core_select_lanes.txt.) */
      for (int64_t i0 = 0; i0 < n; i0 += L) {
        float pbuf[L], rbuf[L], gbuf[L];
        const float *pv = smoe_block_f32(a->p, a->dtype, base, i0, n, 0.0f, pbuf);
        uint32_t active = 0;
        SMOE_SIMD_REDUCE(|, active)
        for (int l = 0; l < L; ++l) active |= (uint32_t)(pv[l] != 0.0f) << l;
        if (!active) continue;
        const float *rv = smoe_block_f32(a->scores, a->dtype, base, i0, n, 0.0f, rbuf);
        const float *gv = smoe_block_f32(a->grad_p, a->dtype, base, i0, n, 0.0f, gbuf);
        for (; active; active &= active - 1, ++c) {
          const int l = smoe_low_bit(active), slot = c < L ? c : L;
          X[slot][g] = rv[l];
          Gr[slot][g] = gv[l];
          I[slot][g] = (int32_t)(i0 + l);
        }
      }
    }
    for (int j = c; j < L; ++j) X[j][g] = Gr[j][g] = 0.0f;
    redo[g] = !((b[g] > -INFINITY) & (b[g] < INFINITY)) | (c == 0) | (c > L);
    count[g] = c < L ? c : L; /* (a row with more is redone) */
  }
  /* x = (r - b) / alpha, the threshold in double */
  SMOE_SIMD
  for (int g = 0; g < G; ++g) wide[g] = 0, mu[g] = INFINITY;
  for (int j = 0; j < L; ++j) {
    SMOE_SIMD
    for (int g = 0; g < G; ++g) {
      const float xl = (float)((double)X[j][g] - b[g]) / alpha[g];
      wide[g] |= !(fabsf(xl) < INFINITY);
      W[j][g] = xl;
    }
  }
  for (int g = 0; g < G; ++g)
    if (wide[g])
      for (int j = 0; j < count[g]; ++j)
        if (!(fabsf(W[j][g]) < INFINITY)) W[j][g] = (float)(((double)X[j][g] - b[g]) / (double)alpha[g]);
  for (int j = 0; j < L; ++j) {
    SMOE_SIMD
    for (int g = 0; g < G; ++g) {
      float xl = smoe_where_f32(W[j][g] > SMOE_GEN_MAX_f32, SMOE_GEN_MAX_f32, W[j][g]);
      xl = smoe_where_f32(xl < -SMOE_GEN_MAX_f32, -SMOE_GEN_MAX_f32, xl);
      X[j][g] = xl;
      /* mu: the smallest |x| of the active entries, taken over the slots in the per-row order */
      const float ax = smoe_where_f32(j < count[g], fabsf(xl), INFINITY);
      mu[g] = smoe_where_f32(ax < mu[g], ax, mu[g]);
    }
  }
  float Z[L][G], GW[L][G], z[G], gw[G];
  for (int j = 0; j < L; ++j) {
    SMOE_SIMD
    for (int g = 0; g < G; ++g) {
      const float e = smoe_where_f32(j < count[g], smoe_exp_f32(-(fabsf(X[j][g]) - mu[g])), 0.0f);
      W[j][g] = e;
      Z[j][g] = 0.0f + e;
      GW[j][g] = 0.0f + Gr[j][g] * e;
    }
  }
  smoe_rows8_lane_sum(Z, z);
  smoe_rows8_lane_sum(GW, gw);
  SMOE_SIMD
  for (int g = 0; g < G; ++g) {
    s_ratio[g] = gw[g] / z[g];
    phi_scale[g] = 0.5f * smoe_exp_f32(-mu[g]) / ((1.0f - eps) * alpha[g]);
  }
  for (int j = 0; j < L; ++j) {
    SMOE_SIMD
    for (int g = 0; g < G; ++g) {
      const float gr = phi_scale[g] * W[j][g] * (Gr[j][g] - s_ratio[g]);
      W[j][g] = gr;
      Z[j][g] = 0.0f - gr * X[j][g];
    }
  }
  float ga_sum[G];
  smoe_rows8_lane_sum(Z, ga_sum);
  for (int g = 0; g < rows; ++g) {
    const int64_t row = row0 + g, base = row * n;
    if (redo[g]) {
      smoe_topk_bwd_row_f32(a, row, rs, is, 1, gk + row, ga + row);
      continue;
    }
    if (a->dtype == SMOE_F32) {
      float *dst = (float *)a->grad_scores + base;
      for (int64_t j = 0; j < n; ++j) dst[j] = 0.0f;
      for (int j = 0; j < count[g]; ++j) dst[I[j][g]] = W[j][g];
    } else {
      smoe_fill_row_f32(a->grad_scores, a->dtype, base, n, 0.0f);
      for (int j = 0; j < count[g]; ++j) smoe_store_f32(a->grad_scores, a->dtype, base + I[j][g], W[j][g]);
    }
    gk[row] = s_ratio[g];
    ga[row] = ga_sum[g];
  }
}

/* Backward of rows [begin, end) (smoe_rows8_fits), a group of rows at a time; rs / is as above. */
static inline void smoe_topk_bwd_rows8_loop(const smoe_topk_bwd_args *a, int64_t begin, int64_t end, float *rs,
                                            int32_t *is) {
  float *gk = (float *)a->grad_k_rows, *ga = (float *)a->grad_alpha_rows;
  for (int64_t row = begin; row < end; row += SMOE_ROWS8_GROUP)
    smoe_topk_bwd_rows8(a, row, (int)(end - row < SMOE_ROWS8_GROUP ? end - row : SMOE_ROWS8_GROUP), rs, is, gk, ga);
}

#undef SMOE_ROWS8_CX

#endif /* SMOE_LAPSUM_ROWS8_H */
