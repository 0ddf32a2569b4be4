/* Deterministic reductions over rows: the gradient of a shared k (the per-layer budget gradient)
 * and of a shared alpha. The summation tree depends only on n, never on threads or chunking, so a
 * training step gives bit-identical budget gradients run to run. */
#include "softmoe.h"

/* Leaves of the pairwise tree are runs of this many terms, summed left to right. */
#define SMOE_SUM_LEAF 64

static double sum_f64_range(const double *x, int64_t n) {
  if (n <= SMOE_SUM_LEAF) {
    double acc = 0.0;
    for (int64_t i = 0; i < n; ++i) acc += x[i];
    return acc;
  }
  int64_t half = n / 2;
  return sum_f64_range(x, half) + sum_f64_range(x + half, n - half);
}

/* float inputs are accumulated in double: the tree is the same, the rounding far smaller. */
static double sum_f32_range(const float *x, int64_t n) {
  if (n <= SMOE_SUM_LEAF) {
    double acc = 0.0;
    for (int64_t i = 0; i < n; ++i) acc += (double)x[i];
    return acc;
  }
  int64_t half = n / 2;
  return sum_f32_range(x, half) + sum_f32_range(x + half, n - half);
}

float smoe_sum_f32(const float *x, int64_t n) { return (x && n > 0) ? (float)sum_f32_range(x, n) : 0.0f; }

double smoe_sum_f64(const double *x, int64_t n) { return (x && n > 0) ? sum_f64_range(x, n) : 0.0; }
