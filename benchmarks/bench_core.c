/* The soft top-k kernels of the C core alone: no torch, no allocation, no autograd around them.
 *
 *   make bench-core                      # E = 8, 16, 32, 64, 128, 256; scores N(0, 1)
 *   make bench-core BENCH_CORE_ARGS="-e 8 -s 4 -p"
 *   make bench-core BENCH_CORE_ARGS="-e 8 -i avx2"   # one instruction-set build (default: auto)
 *   make bench-core BENCH_CORE_ARGS="-e 64 -d bf16"  # scores, p and gradients stored as bfloat16
 *
 * For each E: forward and backward of `rows` rows (k = 2, alpha = 1; truncated eps = 1e-2 with
 * max_active = min(8, E) as in bench_router.py's softmoe_trunc or -c's cap, or -p: plain, every
 * score a candidate), one thread, the minimum over the repeats in ns per row, and the realised active
 * scores per row. -s scales the scores: at alpha = 1, N(0, 1) scores leave nearly every candidate
 * active, N(0, 4^2) ones truncate most rows (a trained router's logits are spread like that).
 */
#define _POSIX_C_SOURCE 199309L
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "core/softmoe.h"

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static unsigned long long rng = 88172645463325252ull;
static double uniform(void) {
  rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
  return ((double)(rng >> 11) + 0.5) / 9007199254740992.0;
}
static double gauss(void) { return sqrt(-2.0 * log(uniform())) * cos(6.283185307179586 * uniform()); }

static void usage(void) {
  fprintf(stderr,
          "usage: bench_core [-e E[,E...]] [-s spread] [-c max_active] [-r repeats] [-n rows] [-p]\n"
          "                  [-i auto|baseline|avx2|avx512] [-d f32|bf16|f16]\n");
  exit(2);
}

/* The SMOE_ISA_* value of -i's name. */
static int isa_named(const char *name) {
  const char *names[4] = {"auto", "baseline", "avx2", "avx512"};
  const int values[4] = {SMOE_ISA_AUTO, SMOE_ISA_BASELINE, SMOE_ISA_AVX2, SMOE_ISA_AVX512};
  for (int i = 0; i < 4; ++i)
    if (!strcmp(name, names[i])) return values[i];
  usage();
  return SMOE_ISA_AUTO;
}

/* The float storage type of -d's name. */
static smoe_dtype dtype_named(const char *name) {
  if (!strcmp(name, "f32")) return SMOE_F32;
  if (!strcmp(name, "bf16")) return SMOE_BF16;
  if (!strcmp(name, "f16")) return SMOE_F16;
  usage();
  return SMOE_F32;
}

/* Element i of a tensor of dtype set to x (rounded to the storage type). */
static void store(void *t, smoe_dtype dtype, int64_t i, float x) {
  if (dtype == SMOE_F32)
    ((float *)t)[i] = x;
  else
    ((uint16_t *)t)[i] = dtype == SMOE_BF16 ? smoe_float_to_bf16_bits(x) : smoe_float_to_f16_bits(x);
}

/* Element i of a tensor of dtype, as float. */
static float load(const void *t, smoe_dtype dtype, int64_t i) {
  if (dtype == SMOE_F32) return ((const float *)t)[i];
  const uint16_t bits = ((const uint16_t *)t)[i];
  return dtype == SMOE_BF16 ? smoe_bf16_bits_to_float(bits) : smoe_f16_bits_to_float(bits);
}

int main(int argc, char **argv) {
  char experts[256] = "8,16,32,64,128,256";
  double spread = 1.0;
  int repeats = 15, plain = 0, cap_arg = 8, isa = SMOE_ISA_AUTO;
  const char *isa_name = "auto", *dtype_name = "f32";
  smoe_dtype dtype = SMOE_F32;
  int64_t rows = 65536;
  for (int i = 1; i < argc; ++i) {
    if (!strcmp(argv[i], "-p")) {
      plain = 1;
    } else if (i + 1 < argc && !strcmp(argv[i], "-e")) {
      snprintf(experts, sizeof experts, "%s", argv[++i]);
    } else if (i + 1 < argc && !strcmp(argv[i], "-s")) {
      spread = atof(argv[++i]);
    } else if (i + 1 < argc && !strcmp(argv[i], "-c")) {
      cap_arg = atoi(argv[++i]);
    } else if (i + 1 < argc && !strcmp(argv[i], "-r")) {
      repeats = atoi(argv[++i]);
    } else if (i + 1 < argc && !strcmp(argv[i], "-i")) {
      isa_name = argv[++i];
      isa = isa_named(isa_name);
    } else if (i + 1 < argc && !strcmp(argv[i], "-d")) {
      dtype_name = argv[++i];
      dtype = dtype_named(dtype_name);
    } else if (i + 1 < argc && !strcmp(argv[i], "-n")) {
      rows = atoll(argv[++i]);
    } else {
      usage();
    }
  }
  if (repeats < 1 || rows < 1 || cap_arg < 1 || !(spread > 0)) usage();
  printf("%-5s %-9s %-8s %-5s %4s %7s %7s %12s %12s %8s\n", "E", "kernel", "isa", "dtype", "cap", "spread", "rows",
         "fwd ns/row", "bwd ns/row", "active");
  for (char *tok = strtok(experts, ","); tok; tok = strtok(NULL, ",")) {
    const int64_t n = atoll(tok);
    if (n < 1) usage();
    const int64_t cap = plain || n < cap_arg ? n : cap_arg;
    const double eps = plain ? 0.0 : 1e-2;
    const size_t bytes = (dtype == SMOE_F32 ? sizeof(float) : sizeof(uint16_t)) * (size_t)(rows * n);
    void *scores = malloc(bytes), *p = malloc(bytes), *g = malloc(bytes), *grad = malloc(bytes);
    float *gk = malloc(sizeof(float) * rows), *ga = malloc(sizeof(float) * rows);
    double *threshold = malloc(sizeof(double) * rows);
    if (!scores || !p || !g || !grad || !gk || !ga || !threshold) return 1;
    for (int64_t i = 0; i < rows * n; ++i)
      store(scores, dtype, i, (float)(spread * gauss())), store(g, dtype, i, (float)gauss());
    float k = 2.0f, alpha = 1.0f;
    if (k >= (float)cap) k = 0.5f * (float)cap;
    smoe_topk_fwd_args fa = {rows, n, dtype, scores, &k, 0, &alpha, 0, eps, cap, p, threshold};
    smoe_topk_bwd_args ba = {rows, n, dtype, g, scores, p, threshold, &alpha, 0, eps, cap, grad, gk, ga};
    double fwd = INFINITY, bwd = INFINITY;
    for (int r = 0; r < repeats; ++r) {
      double t = now();
      if (smoe_topk_fwd_isa(&fa, 0, rows, isa) != SMOE_OK) {
        fprintf(stderr, "bench_core: this build or CPU has no %s build of the kernels\n", isa_name);
        return 1;
      }
      t = now() - t;
      fwd = t < fwd ? t : fwd;
      t = now();
      if (smoe_topk_bwd_isa(&ba, 0, rows, isa) != SMOE_OK) return 1;
      t = now() - t;
      bwd = t < bwd ? t : bwd;
    }
    double active = 0;
    for (int64_t i = 0; i < rows * n; ++i) active += load(p, dtype, i) != 0.0f;
    printf("%-5lld %-9s %-8s %-5s %4lld %7.2f %7lld %12.1f %12.1f %8.2f\n", (long long)n,
           plain ? "plain" : "truncated", isa_name, dtype_name, (long long)cap, spread, (long long)rows, 1e9 * fwd / (double)rows, 1e9 * bwd / (double)rows,
           active / (double)rows);
    free(scores), free(p), free(g), free(grad), free(gk), free(ga), free(threshold);
  }
  return 0;
}
