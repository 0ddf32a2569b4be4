/* What the soft top-k's CPU loop (lapsum.c) and CUDA launchers (cuda/lapsum.cu) share about a call:
 * the arguments they accept and the layout of a row's scratch.
 *
 * A row's scratch is `reals` words of the math type, then `indices` int32 words:
 *   reals   for the forward three arrays (sorted candidates and the two exponential sums) of
 *           max_active words rounded up to whole SMOE_LANES blocks plus one block (lapsum_row.h's
 *           blocked loops read up to a block past the candidates); for the backward three arrays
 *           (scores then x, upstream gradients, weights then gradients of the active entries) of
 *           n words rounded up to whole blocks; the larger of the two;
 *   indices max(2 * max_active, n): the forward's candidate indices and a merge buffer, the
 *           backward's active indices.
 * The CPU gives each call one row's scratch; the GPU interleaves `threads` rows' scratch word by
 * word (cuda/lapsum.cu), so its index words start `threads` times further in. Either way the index
 * words start at a multiple of the math type's size (>= 4) from an aligned base: int32-aligned.
 */
#ifndef SMOE_LAPSUM_ARGS_H
#define SMOE_LAPSUM_ARGS_H

#include "smoe_dtype.h"

/* The sizes every soft top-k entry point accepts (candidate indices are stored as int32). */
SMOE_HD int smoe_topk_valid_shape(int64_t rows, int64_t n, int64_t max_active, double eps) {
  if (rows < 0 || n < 1 || n > INT32_MAX) return 0;
  if (max_active < 1 || max_active > n) return 0;
  return eps >= 0.0 && eps < 0.5;
}

/* Arguments of a whole forward / backward call apart from its pointers (checked first). */
SMOE_HD int smoe_topk_fwd_valid(const smoe_topk_fwd_args *a) {
  return a && smoe_valid_dtype(a->dtype) && smoe_topk_valid_shape(a->rows, a->n, a->max_active, a->eps);
}

SMOE_HD int smoe_topk_bwd_valid(const smoe_topk_bwd_args *a) {
  return a && smoe_valid_dtype(a->dtype) && smoe_topk_valid_shape(a->rows, a->n, a->max_active, a->eps);
}

/* The pointers and strides, needed only when there are rows to compute. */
SMOE_HD int smoe_topk_fwd_pointers(const smoe_topk_fwd_args *a) {
  return a->scores && a->k && a->alpha && a->p && a->threshold && a->k_stride >= 0 && a->alpha_stride >= 0;
}

SMOE_HD int smoe_topk_bwd_pointers(const smoe_topk_bwd_args *a) {
  return a->grad_p && a->scores && a->p && a->threshold && a->alpha && a->grad_scores && a->grad_k_rows &&
         a->grad_alpha_rows && a->alpha_stride >= 0;
}

SMOE_HD int64_t smoe_topk_scratch_reals(int64_t n, int64_t max_active) {
  const int64_t fwd = 3 * (smoe_pad_lanes(max_active) + SMOE_LANES), bwd = 3 * smoe_pad_lanes(n);
  return fwd > bwd ? fwd : bwd;
}

SMOE_HD int64_t smoe_topk_scratch_indices(int64_t n, int64_t max_active) {
  return 2 * max_active > n ? 2 * max_active : n;
}

/* Bytes from the scratch base to the first index word when `threads` rows share the scratch
 * interleaved (1 for the CPU's one row at a time). */
SMOE_HD size_t smoe_topk_scratch_index_offset(smoe_dtype dtype, int64_t n, int64_t max_active, int64_t threads) {
  return (size_t)smoe_topk_scratch_reals(n, max_active) * smoe_real_size(dtype) * (size_t)threads;
}

#endif /* SMOE_LAPSUM_ARGS_H */
