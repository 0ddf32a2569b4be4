/* Truncated dispatch on the CPU: argument checks, the three plan passes, and the loops over tokens
 * or slots of gather / combine. The per-token and per-element math lives in route_row.h and is
 * shared with the CUDA kernels. Every entry point works on a caller-given range so that the
 * binding can split the work over its thread pool; results never depend on that split. */
#include <stdlib.h>
#include <string.h>

#include "route_args.h"
#include "smoe_math.h"

#define SMOE_SUFFIX f32
#include "route_row.h"
#undef SMOE_SUFFIX
#define SMOE_SUFFIX f64
#include "route_row.h"
#undef SMOE_SUFFIX

static int valid_range(int64_t begin, int64_t end, int64_t n) { return 0 <= begin && begin <= end && end <= n; }

smoe_status smoe_plan_count(const smoe_plan_args *a, int64_t begin, int64_t end, int64_t *counts) {
  if (!smoe_route_valid_plan(a) || !valid_range(begin, end, a->tokens) || !counts) return SMOE_ERR_ARG;
  const int64_t E = a->experts, M = a->max_active;
  memset(counts, 0, (size_t)E * sizeof(int64_t));
  for (int64_t t = begin; t < end; ++t) {
    int64_t *row = a->token_pairs + t * M;
    const int64_t m = smoe_route_select(a->p, a->dtype, E, M, t, row);
    for (int64_t j = 0; j < m; ++j) ++counts[row[j]];
  }
  return SMOE_OK;
}

smoe_status smoe_plan_scan(const smoe_plan_args *a, int64_t chunks, int64_t *counts) {
  if (!smoe_route_valid_plan(a) || chunks < 0 || (a->tokens > 0 && chunks < 1) || (chunks > 0 && !counts))
    return SMOE_ERR_ARG;
  const int64_t E = a->experts;
  int64_t run = 0;
  for (int64_t e = 0; e < E; ++e) {
    a->offsets[e] = run;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t n = counts[c * E + e];
      counts[c * E + e] = run;
      run += n;
    }
  }
  a->offsets[E] = run;
  return SMOE_OK;
}

smoe_status smoe_plan_place(const smoe_plan_args *a, int64_t begin, int64_t end, int64_t *base) {
  if (!smoe_route_valid_plan(a) || !valid_range(begin, end, a->tokens) || !base) return SMOE_ERR_ARG;
  const int64_t E = a->experts, M = a->max_active;
  const int64_t N = a->offsets[E];
  if (N < 0 || N > a->tokens * M) return SMOE_ERR_ARG;
  int bad = 0;
  for (int64_t t = begin; t < end; ++t) {
    int64_t *row = a->token_pairs + t * M;
    for (int64_t j = 0; j < M; ++j) {
      const int64_t e = row[j];
      if (e < 0) continue; /* padding (pass 1 writes -1 after the last expert) */
      const int64_t s = e < E ? base[e]++ : -1;
      if (s < 0 || s >= N) { /* counts inconsistent with pass 1: never from smoe_plan_scan */
        row[j] = -1;
        bad = 1;
        continue;
      }
      a->pair_token[s] = t;
      a->pair_expert[s] = e;
      row[j] = s;
    }
  }
  for (int64_t s = (begin * M > N ? begin * M : N); s < end * M; ++s) {
    a->pair_token[s] = -1;
    a->pair_expert[s] = -1;
  }
  return bad ? SMOE_ERR_ARG : SMOE_OK;
}

smoe_status smoe_dispatch_plan(const smoe_plan_args *a, int64_t chunk) {
  if (!smoe_route_valid_plan(a) || chunk < 1) return SMOE_ERR_ARG;
  const int64_t T = a->tokens, E = a->experts;
  const int64_t chunks = T / chunk + (T % chunk != 0);
  if (chunks == 0) return smoe_plan_scan(a, 0, NULL);
  int64_t *counts = (int64_t *)malloc((size_t)(chunks * E) * sizeof(int64_t));
  if (!counts) return SMOE_ERR_ALLOC;
  smoe_status st = SMOE_OK;
  for (int64_t c = 0; c < chunks && st == SMOE_OK; ++c) {
    const int64_t b = c * chunk, e = b + chunk < T ? b + chunk : T;
    st = smoe_plan_count(a, b, e, counts + c * E);
  }
  if (st == SMOE_OK) st = smoe_plan_scan(a, chunks, counts);
  for (int64_t c = 0; c < chunks && st == SMOE_OK; ++c) {
    const int64_t b = c * chunk, e = b + chunk < T ? b + chunk : T;
    st = smoe_plan_place(a, b, e, counts + c * E);
  }
  free(counts);
  return st;
}

smoe_status smoe_gather_rows(const smoe_gather_args *a, int64_t slot_begin, int64_t slot_end) {
  if (!smoe_route_valid_gather(a) || !valid_range(slot_begin, slot_end, a->slots)) return SMOE_ERR_ARG;
  if (slot_begin == slot_end || a->d == 0) return SMOE_OK;
  if (!smoe_route_gather_pointers(a)) return SMOE_ERR_ARG;
  const size_t row = (size_t)a->d * smoe_dtype_size(a->dtype);
  const char *x = (const char *)a->x;
  char *xs = (char *)a->xs;
  int bad = 0;
  for (int64_t s = slot_begin; s < slot_end; ++s) {
    const int64_t t = a->pair_token[s];
    if (t >= 0 && t < a->tokens) {
      memcpy(xs + (size_t)s * row, x + (size_t)t * row, row);
    } else {
      memset(xs + (size_t)s * row, 0, row);
      if (t != -1) bad = 1;
    }
  }
  return bad ? SMOE_ERR_ARG : SMOE_OK;
}

static int combine_math_f64(smoe_dtype ys_dtype, const void *p, smoe_dtype p_dtype) {
  return ys_dtype == SMOE_F64 || (p && p_dtype == SMOE_F64);
}

smoe_status smoe_combine_rows(const smoe_combine_args *a, int64_t begin, int64_t end) {
  if (!smoe_route_valid_combine(a) || !valid_range(begin, end, a->tokens)) return SMOE_ERR_ARG;
  if (begin == end) return SMOE_OK;
  if (!smoe_route_combine_pointers(a)) return SMOE_ERR_ARG;
  const int f64 = combine_math_f64(a->ys_dtype, a->p, a->p_dtype);
  const size_t word = f64 ? sizeof(double) : sizeof(float);
  void *acc = malloc((size_t)(a->d > 0 ? a->d : 1) * word);
  if (!acc) return SMOE_ERR_ALLOC;
  int bad = 0;
  for (int64_t t = begin; t < end; ++t)
    bad |= f64 ? smoe_route_combine_row_f64(a, t, (double *)acc) : smoe_route_combine_row_f32(a, t, (float *)acc);
  free(acc);
  return bad ? SMOE_ERR_ARG : SMOE_OK;
}

smoe_status smoe_combine_bwd(const smoe_combine_bwd_args *a, int64_t begin, int64_t end) {
  if (!smoe_route_valid_combine_bwd(a) || !valid_range(begin, end, a->tokens)) return SMOE_ERR_ARG;
  if (begin == end) return SMOE_OK;
  if (!smoe_route_combine_bwd_pointers(a)) return SMOE_ERR_ARG;
  const int f64 = combine_math_f64(a->ys_dtype, a->p, a->p_dtype);
  const int64_t M = a->max_active, d = a->d;
  int bad = 0;
  for (int64_t t = begin; t < end; ++t)
    bad |= f64 ? smoe_route_combine_bwd_row_f64(a, t) : smoe_route_combine_bwd_row_f32(a, t);
  /* zero rows for the padding slots of this token range (routed slots were written above) */
  const size_t row = (size_t)d * smoe_dtype_size(a->ys_dtype);
  const int64_t slot_end = end * M < a->slots ? end * M : a->slots;
  for (int64_t s = begin * M; s < slot_end; ++s) {
    const int64_t t = a->pair_token[s];
    if (t >= 0 && t < a->tokens) continue;
    if (t != -1) bad = 1;
    if (row) memset((char *)a->grad_ys + (size_t)s * row, 0, row);
  }
  return bad ? SMOE_ERR_ARG : SMOE_OK;
}
