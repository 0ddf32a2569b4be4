/* LapSum soft top-k on the CPU: argument checks, scratch, and the loop over rows.
 * The per-row math lives in lapsum_row.h and is shared with the CUDA kernels. */
#include <stdlib.h>

/* No fused multiply-add anywhere in this file (see the row loops below), set before any function. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "lapsum_args.h"
#include "smoe_math.h"

#define SMOE_SUFFIX f32
#include "lapsum_row.h"
#undef SMOE_SUFFIX
#include "lapsum_rows8.h" /* float rows with at most 8 candidates, a group of rows at a time */
#define SMOE_SUFFIX f64
#include "lapsum_row.h"
#undef SMOE_SUFFIX

size_t smoe_topk_scratch_bytes(smoe_dtype dtype, int64_t n, int64_t max_active) {
  if (n < 1 || max_active < 1 || max_active > n) return 0;
  return smoe_topk_scratch_index_offset(dtype, n, max_active, 1) +
         (size_t)smoe_topk_scratch_indices(n, max_active) * sizeof(int32_t);
}

static int valid_range(int64_t rows, int64_t row_begin, int64_t row_end) {
  return 0 <= row_begin && row_begin <= row_end && row_end <= rows;
}

/* The loops over rows: one per math type and direction, each flattened (every per-row function is
 * inlined into it, so the scratch stride 1 is a constant and the lane loops of lapsum_row.h become
 * vector code). On x86-64 with GCC or clang each is built three times: for the build's own target
 * (SSE2 unless told otherwise), for AVX2, and for AVX-512 (F, VL, BW, DQ: Intel Xeon since Skylake,
 * AMD since Zen 4), and the entry points pick the widest build the CPU runs. AVX-512 brings a mask
 * register per comparison (a blend in one instruction) and 32 vector registers.
 *
 * The grouped short rows (n <= 8), and the longer ones whose candidates are picked in the lanes, run
 * in functions of their own, so that the AVX-512 build can give them 512-bit vectors (a group's 16
 * rows in one register per step) and everything else 256-bit ones (GCC's choice otherwise: 512 for
 * these targets): on an Intel Xeon, forward and backward, the 512-bit short rows took 0.93x the
 * time of the 256-bit ones at E = 8, and the 512-bit longer rows with the per-row selection 1.07x
 * (E = 64) and 1.05x (E = 256) (benchmarks/results/bench_core_isa_intel.txt, appendix B).
 * Clang takes no vector-width preference in a target attribute and builds both with its own choice.
 *
 * Every build gives the same bits: nothing is contracted into a fused multiply-add (AVX2 here has no
 * FMA; AVX-512 has, and GCC's GNU modes and clang's default would contract there, a * b + c rounded
 * once where the baseline build rounds twice: hence the pragma at the top), and the lane sums are
 * fixed trees. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SMOE_X86_DISPATCH 1
#define SMOE_FLATTEN __attribute__((flatten))
#define SMOE_FLATTEN_AVX2 __attribute__((flatten, target("avx2")))
#define SMOE_AVX512 "avx512f,avx512vl,avx512bw,avx512dq"
#if defined(__clang__)
#define SMOE_FLATTEN_AVX512 __attribute__((flatten, target(SMOE_AVX512)))
#define SMOE_FLATTEN_AVX512_WIDE SMOE_FLATTEN_AVX512
#else
#define SMOE_FLATTEN_AVX512 __attribute__((flatten, target(SMOE_AVX512 ",prefer-vector-width=256")))
#define SMOE_FLATTEN_AVX512_WIDE __attribute__((flatten, target(SMOE_AVX512 ",prefer-vector-width=512")))
#endif
#define SMOE_NOINLINE __attribute__((noinline))
#else
#define SMOE_X86_DISPATCH 0
#if defined(__GNUC__)
#define SMOE_FLATTEN __attribute__((flatten))
#define SMOE_NOINLINE __attribute__((noinline))
#else
#define SMOE_FLATTEN
#define SMOE_NOINLINE
#endif
#endif

/* The loops of one build: short_attrs for the grouped short rows and the longer rows whose
 * candidates are picked in the lanes (n <= lanes_max), long_attrs for everything else. The lanes'
 * selection costs the same few vector steps per score; the per-row one fewer steps per score but
 * a sort and unpacking per row. On an Intel Xeon, forward ns per row, per-row / lanes selection at
 * max_active 8 (benchmarks/results/bench_core_select_lanes.txt, appendix B): AVX-512 (16 rows in a
 * 512-bit register) 90 / 50 at E = 16, 194 / 128 at 64, 508 / 473 at 256; AVX2 (two 256-bit
 * registers) 148 / 105 at E = 32, 200 / 208 at 64; baseline (SSE2, four registers) 172 / 170 at
 * 32, 223 / 298 at 64. */
#define SMOE_DEFINE_ROW_LOOPS(isa, short_attrs, long_attrs, lanes_max)                                         \
  short_attrs SMOE_NOINLINE static void fwd_short_rows8_##isa(const smoe_topk_fwd_args *a, int64_t begin,      \
                                                              int64_t end) {                                   \
    smoe_topk_fwd_rows8_short(a, begin, end);                                                                  \
  }                                                                                                            \
  short_attrs SMOE_NOINLINE static void fwd_lanes_rows8_##isa(const smoe_topk_fwd_args *a, int64_t begin,      \
                                                              int64_t end) {                                   \
    smoe_topk_fwd_rows8_lanes(a, begin, end);                                                                  \
  }                                                                                                            \
  long_attrs SMOE_NOINLINE static void fwd_long_rows8_##isa(const smoe_topk_fwd_args *a, int64_t begin,        \
                                                            int64_t end) {                                     \
    smoe_topk_fwd_rows8_long(a, begin, end);                                                                   \
  }                                                                                                            \
  long_attrs static void fwd_rows_##isa(const smoe_topk_fwd_args *a, int64_t begin, int64_t end, void *rs,     \
                                        int32_t *is) {                                                         \
    if (a->dtype == SMOE_F64)                                                                                  \
      for (int64_t row = begin; row < end; ++row) smoe_topk_fwd_row_f64(a, row, (double *)rs, is, 1);          \
    else if (!smoe_rows8_fits(a->dtype, a->n, a->max_active))                                                  \
      for (int64_t row = begin; row < end; ++row) smoe_topk_fwd_row_f32(a, row, (float *)rs, is, 1);           \
    else if (a->n <= SMOE_ROWS8)                                                                               \
      fwd_short_rows8_##isa(a, begin, end);                                                                    \
    else if (a->n <= (lanes_max))                                                                              \
      fwd_lanes_rows8_##isa(a, begin, end);                                                                    \
    else                                                                                                       \
      fwd_long_rows8_##isa(a, begin, end);                                                                     \
  }                                                                                                            \
  short_attrs SMOE_NOINLINE static void bwd_short_rows8_##isa(const smoe_topk_bwd_args *a, int64_t begin,      \
                                                              int64_t end, float *rs, int32_t *is) {           \
    smoe_topk_bwd_rows8_loop(a, begin, end, rs, is);                                                           \
  }                                                                                                            \
  long_attrs SMOE_NOINLINE static void bwd_long_rows8_##isa(const smoe_topk_bwd_args *a, int64_t begin,        \
                                                            int64_t end, float *rs, int32_t *is) {             \
    smoe_topk_bwd_rows8_loop(a, begin, end, rs, is);                                                           \
  }                                                                                                            \
  long_attrs static void bwd_rows_##isa(const smoe_topk_bwd_args *a, int64_t begin, int64_t end, void *rs,     \
                                        int32_t *is) {                                                         \
    if (a->dtype == SMOE_F64) {                                                                                \
      double *gk = (double *)a->grad_k_rows, *ga = (double *)a->grad_alpha_rows;                               \
      for (int64_t row = begin; row < end; ++row)                                                              \
        smoe_topk_bwd_row_f64(a, row, (double *)rs, is, 1, gk + row, ga + row);                                \
    } else if (!smoe_rows8_fits(a->dtype, a->n, a->max_active)) {                                              \
      float *gk = (float *)a->grad_k_rows, *ga = (float *)a->grad_alpha_rows;                                  \
      for (int64_t row = begin; row < end; ++row)                                                              \
        smoe_topk_bwd_row_f32(a, row, (float *)rs, is, 1, gk + row, ga + row);                                 \
    } else if (a->n <= SMOE_ROWS8) {                                                                           \
      bwd_short_rows8_##isa(a, begin, end, (float *)rs, is);                                                   \
    } else {                                                                                                   \
      bwd_long_rows8_##isa(a, begin, end, (float *)rs, is);                                                    \
    }                                                                                                          \
  }

SMOE_DEFINE_ROW_LOOPS(baseline, SMOE_FLATTEN, SMOE_FLATTEN, 32)
#if SMOE_X86_DISPATCH
SMOE_DEFINE_ROW_LOOPS(avx2, SMOE_FLATTEN_AVX2, SMOE_FLATTEN_AVX2, 32)
SMOE_DEFINE_ROW_LOOPS(avx512, SMOE_FLATTEN_AVX512_WIDE, SMOE_FLATTEN_AVX512, 256)
#endif

/* 1 where a build of the loops for isa exists and the CPU runs it. */
static int cpu_runs(int isa) {
#if SMOE_X86_DISPATCH
  if (isa == SMOE_ISA_AVX2) return __builtin_cpu_supports("avx2") != 0;
  if (isa == SMOE_ISA_AVX512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
#endif
  return isa == SMOE_ISA_BASELINE;
}

/* The ISA to run, or -1 for a request this build or CPU cannot serve. */
static int pick_isa(int isa) {
  if (isa == SMOE_ISA_AUTO)
    return cpu_runs(SMOE_ISA_AVX512) ? SMOE_ISA_AVX512 : cpu_runs(SMOE_ISA_AVX2) ? SMOE_ISA_AVX2 : SMOE_ISA_BASELINE;
  return cpu_runs(isa) ? isa : -1;
}

/* The per-call scratch of the row loops: the reals, then the index words at *is (one free). */
static void *alloc_scratch(smoe_dtype dtype, int64_t n, int64_t max_active, int32_t **is) {
  char *scratch = (char *)malloc(smoe_topk_scratch_bytes(dtype, n, max_active));
  if (scratch) *is = (int32_t *)(scratch + smoe_topk_scratch_index_offset(dtype, n, max_active, 1));
  return scratch;
}

smoe_status smoe_topk_fwd_isa(const smoe_topk_fwd_args *a, int64_t row_begin, int64_t row_end, int isa) {
  isa = pick_isa(isa);
  if (isa < 0 || !smoe_topk_fwd_valid(a) || !valid_range(a->rows, row_begin, row_end)) return SMOE_ERR_ARG;
  if (row_begin == row_end) return SMOE_OK;
  if (!smoe_topk_fwd_pointers(a)) return SMOE_ERR_ARG;
  int32_t *is = 0;
  void *scratch = alloc_scratch(a->dtype, a->n, a->max_active, &is);
  if (!scratch) return SMOE_ERR_ALLOC;
#if SMOE_X86_DISPATCH
  if (isa == SMOE_ISA_AVX512)
    fwd_rows_avx512(a, row_begin, row_end, scratch, is);
  else if (isa == SMOE_ISA_AVX2)
    fwd_rows_avx2(a, row_begin, row_end, scratch, is);
  else
#endif
    fwd_rows_baseline(a, row_begin, row_end, scratch, is);
  free(scratch);
  return SMOE_OK;
}

smoe_status smoe_topk_bwd_isa(const smoe_topk_bwd_args *a, int64_t row_begin, int64_t row_end, int isa) {
  isa = pick_isa(isa);
  if (isa < 0 || !smoe_topk_bwd_valid(a) || !valid_range(a->rows, row_begin, row_end)) return SMOE_ERR_ARG;
  if (row_begin == row_end) return SMOE_OK;
  if (!smoe_topk_bwd_pointers(a)) return SMOE_ERR_ARG;
  int32_t *is = 0;
  void *scratch = alloc_scratch(a->dtype, a->n, a->max_active, &is);
  if (!scratch) return SMOE_ERR_ALLOC;
#if SMOE_X86_DISPATCH
  if (isa == SMOE_ISA_AVX512)
    bwd_rows_avx512(a, row_begin, row_end, scratch, is);
  else if (isa == SMOE_ISA_AVX2)
    bwd_rows_avx2(a, row_begin, row_end, scratch, is);
  else
#endif
    bwd_rows_baseline(a, row_begin, row_end, scratch, is);
  free(scratch);
  return SMOE_OK;
}

smoe_status smoe_topk_fwd(const smoe_topk_fwd_args *a, int64_t row_begin, int64_t row_end) {
  return smoe_topk_fwd_isa(a, row_begin, row_end, SMOE_ISA_AUTO);
}

smoe_status smoe_topk_bwd(const smoe_topk_bwd_args *a, int64_t row_begin, int64_t row_end) {
  return smoe_topk_bwd_isa(a, row_begin, row_end, SMOE_ISA_AUTO);
}

float smoe_bf16_bits_to_float(uint16_t bits) { return smoe_bf16_to_float(bits); }
uint16_t smoe_float_to_bf16_bits(float x) { return smoe_float_to_bf16(x); }
float smoe_f16_bits_to_float(uint16_t bits) { return smoe_f16_to_float(bits); }
uint16_t smoe_float_to_f16_bits(float x) { return smoe_float_to_f16(x); }
