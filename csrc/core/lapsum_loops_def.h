/* The definition of one set of lapsum_loops.h's row loops; a file that builds a set defines
 *   SMOE_LOOPS_ISA          the set's name (baseline, avx2, avx512);
 *   SMOE_LOOPS_SHORT_ATTRS  the attributes of the grouped short rows' loops (n <= 8), and of the
 *                           longer rows' whose candidates are picked in the lanes;
 *   SMOE_LOOPS_LONG_ATTRS   those of everything else;
 *   SMOE_LOOPS_SPLIT_WIDTH  1 where the two differ (the backward then has a loop for each), else 0;
 *   SMOE_LOOPS_LANES_MAX    the longest row whose candidates are picked in the lanes, 0 for none
 * and then includes this file once.
 *
 * Each loop is flattened: every per-row function is inlined into it, so the scratch stride 1 is a
 * constant and the lane loops of lapsum_row.h become vector code. The kinds of rows run in noinline
 * functions of their own, so that each gets its attributes and its own code (in one function with
 * the longer rows' selection, the short rows' code took 7 % more instructions).
 *
 * The lanes' selection costs the same few vector steps per score; the per-row one fewer steps per
 * score but a sort and unpacking per row. On an Intel Xeon, forward ns per row, per-row / lanes
 * selection at max_active 8 (benchmarks/results/bench_core_select_lanes.txt, appendix B): AVX-512
 * (16 rows in a 512-bit register) 90 / 50 at E = 16, 194 / 128 at 64, 508 / 473 at 256; AVX2 (two
 * 256-bit registers) 148 / 105 at E = 32, 200 / 208 at 64; baseline (SSE2, four registers) 172 / 170
 * at 32, 223 / 298 at 64: not worth its code there. */
#include "lapsum_loops.h"
#include "smoe_math.h"

#define SMOE_SUFFIX f32
#include "lapsum_row.h"
#undef SMOE_SUFFIX
#include "lapsum_rows8.h" /* float rows with at most 8 candidates, a group of rows at a time */
#define SMOE_SUFFIX f64
#include "lapsum_row.h"
#undef SMOE_SUFFIX

#if defined(__GNUC__)
#define SMOE_LOOPS_NOINLINE __attribute__((noinline))
#else
#define SMOE_LOOPS_NOINLINE
#endif

#define SMOE_LOOPS_CAT2(name, isa) name##_##isa
#define SMOE_LOOPS_CAT(name, isa) SMOE_LOOPS_CAT2(name, isa)
#define SMOE_LOOPS_FN(name) SMOE_LOOPS_CAT(name, SMOE_LOOPS_ISA)

SMOE_LOOPS_SHORT_ATTRS SMOE_LOOPS_NOINLINE static void fwd_short_rows8(const smoe_topk_fwd_args *a, int64_t begin,
                                                                       int64_t end) {
  smoe_topk_fwd_rows8_short(a, begin, end);
}
#if SMOE_LOOPS_LANES_MAX > 0
SMOE_LOOPS_SHORT_ATTRS SMOE_LOOPS_NOINLINE static void fwd_lanes_rows8(const smoe_topk_fwd_args *a, int64_t begin,
                                                                       int64_t end) {
  smoe_topk_fwd_rows8_lanes(a, begin, end);
}
#endif
SMOE_LOOPS_LONG_ATTRS SMOE_LOOPS_NOINLINE static void fwd_long_rows8(const smoe_topk_fwd_args *a, int64_t begin,
                                                                     int64_t end) {
  smoe_topk_fwd_rows8_long(a, begin, end);
}

SMOE_LOOPS_LONG_ATTRS void SMOE_LOOPS_FN(smoe_topk_fwd_rows)(const smoe_topk_fwd_args *a, int64_t begin, int64_t end,
                                                             void *rs, int32_t *is) {
  if (a->dtype == SMOE_F64)
    for (int64_t row = begin; row < end; ++row) smoe_topk_fwd_row_f64(a, row, (double *)rs, is, 1);
  else if (!smoe_rows8_fits(a->dtype, a->n, a->max_active))
    for (int64_t row = begin; row < end; ++row) smoe_topk_fwd_row_f32(a, row, (float *)rs, is, 1);
  else if (a->n <= SMOE_ROWS8)
    fwd_short_rows8(a, begin, end);
#if SMOE_LOOPS_LANES_MAX > 0
  else if (a->n <= SMOE_LOOPS_LANES_MAX)
    fwd_lanes_rows8(a, begin, end);
#endif
  else
    fwd_long_rows8(a, begin, end);
}

/* The grouped rows' backward is the same code for short and longer rows: one loop unless the
 * short rows take other attributes. */
#if SMOE_LOOPS_SPLIT_WIDTH
SMOE_LOOPS_SHORT_ATTRS SMOE_LOOPS_NOINLINE static void bwd_short_rows8(const smoe_topk_bwd_args *a, int64_t begin,
                                                                       int64_t end, float *rs, int32_t *is) {
  smoe_topk_bwd_rows8_loop(a, begin, end, rs, is);
}
#endif
SMOE_LOOPS_LONG_ATTRS SMOE_LOOPS_NOINLINE static void bwd_rows8(const smoe_topk_bwd_args *a, int64_t begin,
                                                                int64_t end, float *rs, int32_t *is) {
  smoe_topk_bwd_rows8_loop(a, begin, end, rs, is);
}

SMOE_LOOPS_LONG_ATTRS void SMOE_LOOPS_FN(smoe_topk_bwd_rows)(const smoe_topk_bwd_args *a, int64_t begin, int64_t end,
                                                             void *rs, int32_t *is) {
  if (a->dtype == SMOE_F64) {
    double *gk = (double *)a->grad_k_rows, *ga = (double *)a->grad_alpha_rows;
    for (int64_t row = begin; row < end; ++row) smoe_topk_bwd_row_f64(a, row, (double *)rs, is, 1, gk + row, ga + row);
  } else if (!smoe_rows8_fits(a->dtype, a->n, a->max_active)) {
    float *gk = (float *)a->grad_k_rows, *ga = (float *)a->grad_alpha_rows;
    for (int64_t row = begin; row < end; ++row) smoe_topk_bwd_row_f32(a, row, (float *)rs, is, 1, gk + row, ga + row);
#if SMOE_LOOPS_SPLIT_WIDTH
  } else if (a->n <= SMOE_ROWS8) {
    bwd_short_rows8(a, begin, end, (float *)rs, is);
#endif
  } else {
    bwd_rows8(a, begin, end, (float *)rs, is);
  }
}
