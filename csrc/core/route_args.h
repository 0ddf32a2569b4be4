/* What the truncated dispatch's CPU entry points (route.c) and CUDA launchers (cuda/route.cu)
 * accept: one set of argument checks, so that both reject the same calls.
 *
 * Each op has a check of its sizes and dtypes (made first, whatever the range of work) and, where a
 * call can have nothing to do, a separate check of its pointers (made only when there is work: an
 * empty call may pass NULL buffers).
 */
#ifndef SMOE_ROUTE_ARGS_H
#define SMOE_ROUTE_ARGS_H

#include "smoe_dtype.h"

/* T, E, M valid and the products T * E, T * M representable in int64. */
SMOE_HD int smoe_route_valid_sizes(int64_t T, int64_t E, int64_t M) {
  if (T < 0 || E < 1 || M < 1 || M > E) return 0;
  return T <= INT64_MAX / E;
}

/* S slots of T tokens with M pairs each; smoe_route_valid_sizes(T, ., M) holds, so T * M fits. */
SMOE_HD int smoe_route_valid_slots(int64_t S, int64_t T, int64_t M) { return S >= 0 && S <= T * M; }

/* The plan: sizes, dtype and (with tokens) every pointer. */
SMOE_HD int smoe_route_valid_plan(const smoe_plan_args *a) {
  if (!a || !smoe_valid_dtype(a->dtype) || !smoe_route_valid_sizes(a->tokens, a->experts, a->max_active)) return 0;
  if (!a->offsets) return 0;
  return a->tokens == 0 || (a->p && a->pair_token && a->pair_expert && a->token_pairs);
}

SMOE_HD int smoe_route_valid_gather(const smoe_gather_args *a) {
  return a && smoe_valid_dtype(a->dtype) && a->tokens >= 0 && a->slots >= 0 && a->d >= 0;
}

SMOE_HD int smoe_route_gather_pointers(const smoe_gather_args *a) {
  return a->pair_token && a->xs && (a->tokens == 0 || a->x);
}

/* Without p (the backward of gather) the weights are 1 and `experts` is unused. */
SMOE_HD int smoe_route_valid_combine(const smoe_combine_args *a) {
  return a && smoe_valid_dtype(a->ys_dtype) && (!a->p || smoe_valid_dtype(a->p_dtype)) && a->d >= 0 &&
         smoe_route_valid_sizes(a->tokens, a->p ? a->experts : a->max_active, a->max_active) &&
         smoe_route_valid_slots(a->slots, a->tokens, a->max_active);
}

/* With no slots (nothing routed, trimmed plan) ys and pair_expert may be empty (NULL). */
SMOE_HD int smoe_route_combine_pointers(const smoe_combine_args *a) {
  return a->token_pairs && (a->d == 0 || (a->y && (a->slots == 0 || a->ys))) &&
         (!a->p || a->slots == 0 || a->pair_expert);
}

SMOE_HD int smoe_route_valid_combine_bwd(const smoe_combine_bwd_args *a) {
  return a && smoe_valid_dtype(a->ys_dtype) && smoe_valid_dtype(a->p_dtype) && a->d >= 0 &&
         smoe_route_valid_sizes(a->tokens, a->experts, a->max_active) &&
         smoe_route_valid_slots(a->slots, a->tokens, a->max_active);
}

SMOE_HD int smoe_route_combine_bwd_pointers(const smoe_combine_bwd_args *a) {
  return a->p && a->token_pairs && a->grad_p && (a->slots == 0 || (a->pair_token && a->pair_expert)) &&
         (a->d == 0 || (a->grad_y && (a->slots == 0 || (a->ys && a->grad_ys))));
}

#endif /* SMOE_ROUTE_ARGS_H */
