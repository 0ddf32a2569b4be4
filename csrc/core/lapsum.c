/* LapSum soft top-k on the CPU: argument checks, scratch, and the loop over rows.
 * The per-row math lives in lapsum_row.h and is shared with the CUDA kernels. */
#include <stdlib.h>

#include "lapsum_args.h"
#include "smoe_math.h"

#define SMOE_SUFFIX f32
#include "lapsum_row.h"
#undef SMOE_SUFFIX
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

smoe_status smoe_topk_fwd(const smoe_topk_fwd_args *a, int64_t row_begin, int64_t row_end) {
  if (!smoe_topk_fwd_valid(a) || !valid_range(a->rows, row_begin, row_end)) return SMOE_ERR_ARG;
  if (row_begin == row_end) return SMOE_OK;
  if (!smoe_topk_fwd_pointers(a)) return SMOE_ERR_ARG;
  char *scratch = (char *)malloc(smoe_topk_scratch_bytes(a->dtype, a->n, a->max_active));
  if (!scratch) return SMOE_ERR_ALLOC;
  int32_t *is = (int32_t *)(scratch + smoe_topk_scratch_index_offset(a->dtype, a->n, a->max_active, 1));
  for (int64_t row = row_begin; row < row_end; ++row) {
    if (a->dtype == SMOE_F64)
      smoe_topk_fwd_row_f64(a, row, (double *)scratch, is, 1);
    else
      smoe_topk_fwd_row_f32(a, row, (float *)scratch, is, 1);
  }
  free(scratch);
  return SMOE_OK;
}

smoe_status smoe_topk_bwd(const smoe_topk_bwd_args *a, int64_t row_begin, int64_t row_end) {
  if (!smoe_topk_bwd_valid(a) || !valid_range(a->rows, row_begin, row_end)) return SMOE_ERR_ARG;
  if (row_begin == row_end) return SMOE_OK;
  if (!smoe_topk_bwd_pointers(a)) return SMOE_ERR_ARG;
  char *scratch = (char *)malloc(smoe_topk_scratch_bytes(a->dtype, a->n, a->max_active));
  if (!scratch) return SMOE_ERR_ALLOC;
  int32_t *is = (int32_t *)(scratch + smoe_topk_scratch_index_offset(a->dtype, a->n, a->max_active, 1));
  for (int64_t row = row_begin; row < row_end; ++row) {
    if (a->dtype == SMOE_F64) {
      double *gk = (double *)a->grad_k_rows + row, *ga = (double *)a->grad_alpha_rows + row;
      smoe_topk_bwd_row_f64(a, row, (double *)scratch, is, 1, gk, ga);
    } else {
      float *gk = (float *)a->grad_k_rows + row, *ga = (float *)a->grad_alpha_rows + row;
      smoe_topk_bwd_row_f32(a, row, (float *)scratch, is, 1, gk, ga);
    }
  }
  free(scratch);
  return SMOE_OK;
}

float smoe_bf16_bits_to_float(uint16_t bits) { return smoe_bf16_to_float(bits); }
uint16_t smoe_float_to_bf16_bits(float x) { return smoe_float_to_bf16(x); }
float smoe_f16_bits_to_float(uint16_t bits) { return smoe_f16_to_float(bits); }
uint16_t smoe_float_to_f16_bits(float x) { return smoe_float_to_f16(x); }
