/* softmoe C API: LapSum soft top-k (plain and left-truncated) and its deterministic reductions.
 *
 * Framework-free: plain pointers, sizes and a status code. Every function is valid C11 and C++17.
 * Row-major layout: `rows` rows of `n` contiguous scores (the expert dimension is last).
 * Storage dtypes are f32 / f64 / bf16 / f16; math runs in float for the 32- and 16-bit types and
 * in double for f64 (the "math type" below). Per-row parameters (k, alpha) are given in the math
 * type with a stride: 0 broadcasts one value to every row, 1 gives one value per row.
 */
#ifndef SOFTMOE_H
#define SOFTMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  SMOE_OK = 0,
  SMOE_ERR_ARG = 1,   /* a size, pointer or option is out of its documented range */
  SMOE_ERR_ALLOC = 2, /* scratch memory could not be allocated */
  SMOE_ERR_DEVICE = 3 /* a CUDA launch or runtime call failed */
} smoe_status;

typedef enum { SMOE_F32 = 0, SMOE_F64 = 1, SMOE_BF16 = 2, SMOE_F16 = 3 } smoe_dtype;

/* Forward of p = soft_topk(scores, k, alpha, eps, max_active) for rows [row_begin, row_end).
 *
 * A row's candidates are its `max_active` largest finite scores (ties: lower index first); -inf
 * scores are never candidates. With m candidates and 0 < k < m the threshold b solves
 * sum_i G((r_i - b) / alpha) = k where G is the Laplace CDF (eps = 0) or the left-truncated one
 * (eps > 0: exact zeros for x <= -c, c = -ln(2 eps)). Limits: k = 0 gives p = 0 and b = +inf,
 * k = m gives p = 1 on the candidates and b = -inf. A row with a NaN or +inf score, k outside
 * [0, m] or alpha not in (0, inf) gets p = NaN and b = NaN; no other row is touched. */
typedef struct {
  int64_t rows, n;
  smoe_dtype dtype;     /* storage dtype of scores and p */
  const void *scores;   /* [rows, n] */
  const void *k;        /* math type, k[row * k_stride] */
  int64_t k_stride;
  const void *alpha;    /* math type, alpha[row * alpha_stride] */
  int64_t alpha_stride;
  double eps;           /* [0, 0.5) */
  int64_t max_active;   /* [1, n] */
  void *p;              /* out [rows, n], storage dtype */
  double *threshold;    /* out [rows] */
} smoe_topk_fwd_args;

/* Backward (VJP) of soft_topk. Writes grad_scores and, per row, that row's contribution to the
 * gradients of k and alpha (grad_k_rows[row] = s, grad_alpha_rows[row]); reduce them with
 * smoe_sum_* when k or alpha is shared by all rows. Rows whose threshold is NaN get NaN; rows at a
 * limit (threshold = +-inf) get zero gradients. */
typedef struct {
  int64_t rows, n;
  smoe_dtype dtype;         /* storage dtype of grad_p, scores, p and grad_scores */
  const void *grad_p;       /* [rows, n] */
  const void *scores;       /* [rows, n] */
  const void *p;            /* [rows, n], the forward output */
  const double *threshold;  /* [rows], the forward output */
  const void *alpha;        /* math type, alpha[row * alpha_stride] */
  int64_t alpha_stride;
  double eps;
  int64_t max_active;
  void *grad_scores;        /* out [rows, n], storage dtype */
  void *grad_k_rows;        /* out [rows], math type */
  void *grad_alpha_rows;    /* out [rows], math type */
} smoe_topk_bwd_args;

/* Scratch the CPU entry points need per call (they allocate it themselves) and the CUDA launchers
 * need per concurrently running row (the caller provides it), in bytes. */
size_t smoe_topk_scratch_bytes(smoe_dtype dtype, int64_t n, int64_t max_active);

smoe_status smoe_topk_fwd(const smoe_topk_fwd_args *args, int64_t row_begin, int64_t row_end);
smoe_status smoe_topk_bwd(const smoe_topk_bwd_args *args, int64_t row_begin, int64_t row_end);

/* Deterministic sums: a fixed pairwise tree over the input order, independent of threads or of how
 * a caller chunks its work, so equal inputs give bit-identical results. This is the reduction
 * behind the gradient of a shared k (the budget gradient) and of a shared alpha. */
float smoe_sum_f32(const float *x, int64_t n);
double smoe_sum_f64(const double *x, int64_t n);

/* Storage conversions, exposed for tests (round to nearest even, NaN stays NaN). */
float smoe_bf16_bits_to_float(uint16_t bits);
uint16_t smoe_float_to_bf16_bits(float x);
float smoe_f16_bits_to_float(uint16_t bits);
uint16_t smoe_float_to_f16_bits(float x);

#ifdef __cplusplus
}
#endif

#endif /* SOFTMOE_H */
