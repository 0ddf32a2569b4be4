/* LapSum soft top-k on the CPU: argument checks, scratch, and the choice of the row loops' set for
 * the CPU (lapsum_loops.h; each set is built in a file of its own). The per-row math lives in
 * lapsum_row.h and is shared with the CUDA kernels. */
#include <stdlib.h>

#include "lapsum_loops.h"
#include "smoe_math.h"

size_t smoe_topk_scratch_bytes(smoe_dtype dtype, int64_t n, int64_t max_active) {
  if (n < 1 || max_active < 1 || max_active > n) return 0;
  return smoe_topk_scratch_index_offset(dtype, n, max_active, 1) +
         (size_t)smoe_topk_scratch_indices(n, max_active) * sizeof(int32_t);
}

static int valid_range(int64_t rows, int64_t row_begin, int64_t row_end) {
  return 0 <= row_begin && row_begin <= row_end && row_end <= rows;
}

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
    smoe_topk_fwd_rows_avx512(a, row_begin, row_end, scratch, is);
  else if (isa == SMOE_ISA_AVX2)
    smoe_topk_fwd_rows_avx2(a, row_begin, row_end, scratch, is);
  else
#endif
    smoe_topk_fwd_rows_baseline(a, row_begin, row_end, scratch, is);
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
    smoe_topk_bwd_rows_avx512(a, row_begin, row_end, scratch, is);
  else if (isa == SMOE_ISA_AVX2)
    smoe_topk_bwd_rows_avx2(a, row_begin, row_end, scratch, is);
  else
#endif
    smoe_topk_bwd_rows_baseline(a, row_begin, row_end, scratch, is);
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
