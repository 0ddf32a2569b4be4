/* LapSum soft top-k on the CPU: argument checks, scratch, and the loop over rows.
 * The per-row math lives in lapsum_row.h and is shared with the CUDA kernels. */
#include <stdlib.h>

#include "smoe_math.h"

#define SMOE_SUFFIX f32
#include "lapsum_row.h"
#undef SMOE_SUFFIX
#define SMOE_SUFFIX f64
#include "lapsum_row.h"
#undef SMOE_SUFFIX

static size_t real_size(smoe_dtype dtype) { return dtype == SMOE_F64 ? sizeof(double) : sizeof(float); }

/* Real words per row: for the forward three arrays (sorted candidates and the two exponential
 * sums) of max_active words rounded up to whole blocks plus one block (lapsum_row.h's blocked
 * loops read up to a block past the candidates); for the backward three arrays (scores then x,
 * upstream gradients, weights then gradients of the active entries) of n words rounded up to
 * whole blocks. Index words: 2 * max_active for the forward (candidate indices and a merge
 * buffer), n for the backward (active indices). */
static int64_t real_words(int64_t n, int64_t max_active) {
  const int64_t fwd = 3 * (smoe_pad_lanes(max_active) + SMOE_LANES), bwd = 3 * smoe_pad_lanes(n);
  return fwd > bwd ? fwd : bwd;
}

static int64_t index_words(int64_t n, int64_t max_active) {
  return 2 * max_active > n ? 2 * max_active : n;
}

size_t smoe_topk_scratch_bytes(smoe_dtype dtype, int64_t n, int64_t max_active) {
  if (n < 1 || max_active < 1 || max_active > n) return 0;
  return (size_t)real_words(n, max_active) * real_size(dtype) + (size_t)index_words(n, max_active) * sizeof(int32_t);
}

static int valid_dtype(smoe_dtype d) { return d == SMOE_F32 || d == SMOE_F64 || d == SMOE_BF16 || d == SMOE_F16; }

static int valid_shape(int64_t rows, int64_t n, int64_t max_active, double eps, int64_t row_begin,
                       int64_t row_end) {
  /* candidate indices are stored as int32 */
  if (rows < 0 || n < 1 || n > INT32_MAX) return 0;
  if (max_active < 1 || max_active > n) return 0;
  if (!(eps >= 0.0 && eps < 0.5)) return 0;
  return 0 <= row_begin && row_begin <= row_end && row_end <= rows;
}

/* The loops over rows: one per math type and direction, each flattened (every per-row function is
 * inlined into it, so the scratch stride 1 is a constant and the lane loops of lapsum_row.h become
 * vector code). On x86-64 with GCC or clang each is built twice, for the build's own target
 * (SSE2 unless told otherwise) and for AVX2, and the entry points pick the AVX2 build where the
 * CPU has it. AVX2 without FMA: nothing is contracted, so both builds give the same bits. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SMOE_X86_DISPATCH 1
#define SMOE_FLATTEN __attribute__((flatten))
#define SMOE_FLATTEN_AVX2 __attribute__((flatten, target("avx2")))
#else
#define SMOE_X86_DISPATCH 0
#if defined(__GNUC__)
#define SMOE_FLATTEN __attribute__((flatten))
#else
#define SMOE_FLATTEN
#endif
#endif

#define SMOE_DEFINE_ROW_LOOPS(isa, attrs)                                                                 \
  attrs static void fwd_rows_##isa(const smoe_topk_fwd_args *a, int64_t begin, int64_t end, void *rs,     \
                                   int32_t *is) {                                                         \
    if (a->dtype == SMOE_F64)                                                                             \
      for (int64_t row = begin; row < end; ++row) smoe_topk_fwd_row_f64(a, row, (double *)rs, is, 1);     \
    else                                                                                                  \
      for (int64_t row = begin; row < end; ++row) smoe_topk_fwd_row_f32(a, row, (float *)rs, is, 1);      \
  }                                                                                                       \
  attrs static void bwd_rows_##isa(const smoe_topk_bwd_args *a, int64_t begin, int64_t end, void *rs,     \
                                   int32_t *is) {                                                         \
    if (a->dtype == SMOE_F64) {                                                                           \
      double *gk = (double *)a->grad_k_rows, *ga = (double *)a->grad_alpha_rows;                          \
      for (int64_t row = begin; row < end; ++row)                                                         \
        smoe_topk_bwd_row_f64(a, row, (double *)rs, is, 1, gk + row, ga + row);                           \
    } else {                                                                                              \
      float *gk = (float *)a->grad_k_rows, *ga = (float *)a->grad_alpha_rows;                             \
      for (int64_t row = begin; row < end; ++row)                                                         \
        smoe_topk_bwd_row_f32(a, row, (float *)rs, is, 1, gk + row, ga + row);                            \
    }                                                                                                     \
  }

SMOE_DEFINE_ROW_LOOPS(baseline, SMOE_FLATTEN)
#if SMOE_X86_DISPATCH
SMOE_DEFINE_ROW_LOOPS(avx2, SMOE_FLATTEN_AVX2)
#endif

/* 1 where an AVX2 build of the loops exists and the CPU runs it. */
static int have_avx2(void) {
#if SMOE_X86_DISPATCH
  return __builtin_cpu_supports("avx2") != 0;
#else
  return 0;
#endif
}

/* The ISA to run, or -1 for a request this build or CPU cannot serve. */
static int pick_isa(int isa) {
  if (isa == SMOE_ISA_AUTO) return have_avx2() ? SMOE_ISA_AVX2 : SMOE_ISA_BASELINE;
  if (isa == SMOE_ISA_BASELINE) return isa;
  if (isa == SMOE_ISA_AVX2 && have_avx2()) return isa;
  return -1;
}

/* The per-call scratch of the row loops: the reals, then the index words at *is (one free). */
static void *alloc_scratch(smoe_dtype dtype, int64_t n, int64_t max_active, int32_t **is) {
  char *scratch = (char *)malloc(smoe_topk_scratch_bytes(dtype, n, max_active));
  if (scratch) *is = (int32_t *)(scratch + (size_t)real_words(n, max_active) * real_size(dtype));
  return scratch;
}

smoe_status smoe_topk_fwd_isa(const smoe_topk_fwd_args *a, int64_t row_begin, int64_t row_end, int isa) {
  isa = pick_isa(isa);
  if (isa < 0 || !a || !valid_dtype(a->dtype) ||
      !valid_shape(a->rows, a->n, a->max_active, a->eps, row_begin, row_end))
    return SMOE_ERR_ARG;
  if (row_begin == row_end) return SMOE_OK;
  if (!a->scores || !a->k || !a->alpha || !a->p || !a->threshold) return SMOE_ERR_ARG;
  if (a->k_stride < 0 || a->alpha_stride < 0) return SMOE_ERR_ARG;
  int32_t *is = 0;
  void *scratch = alloc_scratch(a->dtype, a->n, a->max_active, &is);
  if (!scratch) return SMOE_ERR_ALLOC;
#if SMOE_X86_DISPATCH
  if (isa == SMOE_ISA_AVX2)
    fwd_rows_avx2(a, row_begin, row_end, scratch, is);
  else
#endif
    fwd_rows_baseline(a, row_begin, row_end, scratch, is);
  free(scratch);
  return SMOE_OK;
}

smoe_status smoe_topk_bwd_isa(const smoe_topk_bwd_args *a, int64_t row_begin, int64_t row_end, int isa) {
  isa = pick_isa(isa);
  if (isa < 0 || !a || !valid_dtype(a->dtype) ||
      !valid_shape(a->rows, a->n, a->max_active, a->eps, row_begin, row_end))
    return SMOE_ERR_ARG;
  if (row_begin == row_end) return SMOE_OK;
  if (!a->grad_p || !a->scores || !a->p || !a->threshold || !a->alpha || !a->grad_scores ||
      !a->grad_k_rows || !a->grad_alpha_rows || a->alpha_stride < 0)
    return SMOE_ERR_ARG;
  int32_t *is = 0;
  void *scratch = alloc_scratch(a->dtype, a->n, a->max_active, &is);
  if (!scratch) return SMOE_ERR_ALLOC;
#if SMOE_X86_DISPATCH
  if (isa == SMOE_ISA_AVX2)
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
