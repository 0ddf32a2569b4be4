/* Shared helpers of the libFuzzer targets in tests/fuzz (see README.md there).
 *
 * A target is one `LLVMFuzzerTestOneInput` in plain C11. It decodes every parameter from the fuzz
 * bytes with the reader below (reads past the end give zeros, so every input decodes to *some*
 * case), calls the C core, and checks invariants with the CHECK of the shared C test harness
 * (tests/c/harness.h); a violation prints what was checked and the decoded case (fz_case), then
 * aborts, which libFuzzer (or replay_main.c) reports as a crash.
 */
#ifndef SMOE_FUZZ_COMMON_H
#define SMOE_FUZZ_COMMON_H

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The case being run, printed with any failure (each target fills it in after decoding). */
static char fz_case[512];

static void fz_after_failure(void) {
  fprintf(stderr, "==== case: %s\n", fz_case);
  fflush(stderr);
  abort();
}

#define HARNESS_AFTER_FAILURE fz_after_failure
#include "../c/harness.h"

/* ---- byte reader ------------------------------------------------------------------------------ */

typedef struct {
  const uint8_t *data;
  size_t size, pos;
} fz_reader;

static inline uint8_t fz_u8(fz_reader *r) { return r->pos < r->size ? r->data[r->pos++] : 0; }

static inline uint16_t fz_u16(fz_reader *r) {
  uint16_t lo = fz_u8(r);
  return (uint16_t)(lo | (uint16_t)fz_u8(r) << 8);
}

static inline uint32_t fz_u32(fz_reader *r) {
  uint32_t lo = fz_u16(r);
  return lo | (uint32_t)fz_u16(r) << 16;
}

static inline uint64_t fz_u64(fz_reader *r) {
  uint64_t lo = fz_u32(r);
  return lo | (uint64_t)fz_u32(r) << 32;
}

static inline float fz_f32_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline double fz_f64_bits(uint64_t u) {
  double f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* ---- a tiny deterministic PRNG for bulk data seeded by the fuzz bytes ------------------------ */

typedef struct {
  uint64_t s;
} fz_rng;

static inline uint64_t fz_rng_next(fz_rng *g) { /* splitmix64 */
  uint64_t z = (g->s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

static inline double fz_rng_unit(fz_rng *g) { return (double)(fz_rng_next(g) >> 11) * (1.0 / 9007199254740992.0); }

static inline double fz_rng_normal(fz_rng *g) {
  double s = 0;
  for (int i = 0; i < 6; ++i) s += fz_rng_unit(g);
  return (s - 3.0) * 1.41421356237;
}

/* ---- storage dtypes --------------------------------------------------------------------------- */

static inline const char *fz_dtype_name(smoe_dtype dt) {
  switch (dt) {
    case SMOE_F32: return "f32";
    case SMOE_F64: return "f64";
    case SMOE_BF16: return "bf16";
    default: return "f16";
  }
}

/* Largest finite value of a storage dtype. */
static inline double fz_storage_max(smoe_dtype dt) {
  switch (dt) {
    case SMOE_F64: return DBL_MAX;
    case SMOE_F16: return 65504.0;
    default: return (double)FLT_MAX; /* f32 and bf16 (bf16 max is a bit below; see callers) */
  }
}

/* Half an ulp at 1, relative rounding of the storage dtype. */
static inline double fz_storage_u(smoe_dtype dt) {
  switch (dt) {
    case SMOE_F64: return 0x1p-53;
    case SMOE_F32: return 0x1p-24;
    case SMOE_BF16: return 0x1p-8;
    default: return 0x1p-11;
  }
}

/* Absolute rounding near 0 (half the smallest subnormal step) of the storage dtype. */
static inline double fz_storage_tiny(smoe_dtype dt) {
  switch (dt) {
    case SMOE_F64: return 0x1p-1074;
    case SMOE_F32: return 0x1p-150;
    case SMOE_BF16: return 0x1p-134;
    default: return 0x1p-25;
  }
}

static inline int fz_same_value(double a, double b) { return a == b || (a != a && b != b); }

#endif /* SMOE_FUZZ_COMMON_H */
