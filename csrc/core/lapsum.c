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

/* Real words per row: 3 * max_active for the forward (sorted candidates and the two exponential
 * sums), 2 * n for the backward (x and the softmax weights of the active entries). Index words:
 * 2 * max_active for the forward (candidate indices and a merge buffer), n for the backward
 * (active indices). */
static int64_t real_words(int64_t n, int64_t max_active) {
  return 3 * max_active > 2 * n ? 3 * max_active : 2 * n;
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

smoe_status smoe_topk_fwd(const smoe_topk_fwd_args *a, int64_t row_begin, int64_t row_end) {
  if (!a || !valid_dtype(a->dtype) || !valid_shape(a->rows, a->n, a->max_active, a->eps, row_begin, row_end))
    return SMOE_ERR_ARG;
  if (row_begin == row_end) return SMOE_OK;
  if (!a->scores || !a->k || !a->alpha || !a->p || !a->threshold) return SMOE_ERR_ARG;
  if (a->k_stride < 0 || a->alpha_stride < 0) return SMOE_ERR_ARG;
  char *scratch = (char *)malloc(smoe_topk_scratch_bytes(a->dtype, a->n, a->max_active));
  if (!scratch) return SMOE_ERR_ALLOC;
  int32_t *is = (int32_t *)(scratch + (size_t)real_words(a->n, a->max_active) * real_size(a->dtype));
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
  if (!a || !valid_dtype(a->dtype) || !valid_shape(a->rows, a->n, a->max_active, a->eps, row_begin, row_end))
    return SMOE_ERR_ARG;
  if (row_begin == row_end) return SMOE_OK;
  if (!a->grad_p || !a->scores || !a->p || !a->threshold || !a->alpha || !a->grad_scores ||
      !a->grad_k_rows || !a->grad_alpha_rows || a->alpha_stride < 0)
    return SMOE_ERR_ARG;
  char *scratch = (char *)malloc(smoe_topk_scratch_bytes(a->dtype, a->n, a->max_active));
  if (!scratch) return SMOE_ERR_ALLOC;
  int32_t *is = (int32_t *)(scratch + (size_t)real_words(a->n, a->max_active) * real_size(a->dtype));
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
