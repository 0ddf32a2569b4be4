/* The C test harness shared by the unit tests (tests/c) and the fuzz targets (tests/fuzz): checks,
 * allocation, and the buffers of a dispatch plan. Plain C11; storage values are read and written
 * with the C core's own smoe_load_f64 / smoe_store_f64 and sized with smoe_dtype_size.
 *
 * CHECK(cond, fmt, ...) counts a check and, when cond is false, prints "FAIL file:line: message".
 * A unit test goes on and ends with `return harness_summary();`. A fuzz target defines
 * HARNESS_AFTER_FAILURE (a void function) before including this file: it runs after the message
 * (the fuzz harness prints the decoded case and aborts, which libFuzzer reports as a crash).
 */
#ifndef SMOE_TEST_HARNESS_H
#define SMOE_TEST_HARNESS_H

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/smoe_dtype.h"

/* ---- checks ------------------------------------------------------------------------------------ */

static long long harness_checks = 0;
static long long harness_failures = 0;

#ifdef HARNESS_AFTER_FAILURE
static void HARNESS_AFTER_FAILURE(void);
#endif

static void harness_fail(const char *file, int line, const char *fmt, ...) {
  va_list ap;
  ++harness_failures;
  fprintf(stderr, "FAIL %s:%d: ", file, line);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\n");
  fflush(stderr);
#ifdef HARNESS_AFTER_FAILURE
  HARNESS_AFTER_FAILURE();
#endif
}

#define CHECK(cond, ...)                                        \
  do {                                                          \
    ++harness_checks;                                           \
    if (!(cond)) harness_fail(__FILE__, __LINE__, __VA_ARGS__); \
  } while (0)

/* Prints the tally; the exit status of a unit test. */
static inline int harness_summary(void) {
  printf("%lld passed, %lld failed\n", harness_checks - harness_failures, harness_failures);
  return harness_failures ? 1 : 0;
}

/* ---- allocation ------------------------------------------------------------------------------- */

/* malloc / calloc of at least one byte (so that an empty buffer is not NULL); out of memory aborts. */
static inline void *harness_alloc(size_t bytes) {
  void *p = malloc(bytes ? bytes : 1);
  if (!p) abort();
  return p;
}

static inline void *harness_calloc(size_t bytes) {
  void *p = calloc(bytes ? bytes : 1, 1);
  if (!p) abort();
  return p;
}

/* n values of storage dtype dt, each vals[i] rounded to dt. */
static inline void *harness_buffer(smoe_dtype dt, const double *vals, int64_t n) {
  void *b = harness_alloc((size_t)n * smoe_dtype_size(dt));
  for (int64_t i = 0; i < n; ++i) smoe_store_f64(b, dt, i, vals[i]);
  return b;
}

/* ---- dispatch plans ---------------------------------------------------------------------------- */

/* The output buffers of a plan for T tokens, E experts and M = max_active (P = T * M slots). */
typedef struct {
  int64_t T, E, M, P;
  int64_t *offsets, *pair_token, *pair_expert, *token_pairs;
} plan_t;

/* Exactly sized (ASan sees a write past the end) and poisoned, so that an unwritten output is
 * caught by the checks of its value. */
static inline plan_t plan_alloc(int64_t T, int64_t E, int64_t M) {
  plan_t pl;
  pl.T = T;
  pl.E = E;
  pl.M = M;
  pl.P = T * M;
  pl.offsets = (int64_t *)harness_alloc((size_t)(E + 1) * sizeof(int64_t));
  pl.pair_token = (int64_t *)harness_alloc((size_t)pl.P * sizeof(int64_t));
  pl.pair_expert = (int64_t *)harness_alloc((size_t)pl.P * sizeof(int64_t));
  pl.token_pairs = (int64_t *)harness_alloc((size_t)pl.P * sizeof(int64_t));
  memset(pl.offsets, 0xa5, (size_t)(E + 1) * sizeof(int64_t));
  memset(pl.pair_token, 0xa5, (size_t)pl.P * sizeof(int64_t));
  memset(pl.pair_expert, 0xa5, (size_t)pl.P * sizeof(int64_t));
  memset(pl.token_pairs, 0xa5, (size_t)pl.P * sizeof(int64_t));
  return pl;
}

static inline void plan_free(plan_t *pl) {
  free(pl->offsets);
  free(pl->pair_token);
  free(pl->pair_expert);
  free(pl->token_pairs);
}

/* The arguments of smoe_dispatch_plan (and its passes) writing into pl, for weights p of dtype dt. */
static inline smoe_plan_args plan_args(plan_t *pl, smoe_dtype dt, const void *p) {
  smoe_plan_args a;
  memset(&a, 0, sizeof a);
  a.tokens = pl->T;
  a.experts = pl->E;
  a.max_active = pl->M;
  a.dtype = dt;
  a.p = p;
  a.offsets = pl->offsets;
  a.pair_token = pl->pair_token;
  a.pair_expert = pl->pair_expert;
  a.token_pairs = pl->token_pairs;
  return a;
}

/* Whether two plans of the same sizes hold the same bits. */
static inline int plan_equal(const plan_t *a, const plan_t *b) {
  const size_t P = (size_t)a->P * sizeof(int64_t);
  return memcmp(a->offsets, b->offsets, (size_t)(a->E + 1) * sizeof(int64_t)) == 0 &&
         memcmp(a->pair_token, b->pair_token, P) == 0 && memcmp(a->pair_expert, b->pair_expert, P) == 0 &&
         memcmp(a->token_pairs, b->token_pairs, P) == 0;
}

#endif /* SMOE_TEST_HARNESS_H */
