/* The soft top-k's row loops for AVX-512 F, VL, BW, DQ (lapsum_loops.h); on other CPUs and
 * compilers, nothing.
 *
 * The grouped short rows (n <= 8), and the longer ones whose candidates are picked in the lanes,
 * take 512-bit vectors (a group's 16 rows in one register per step), everything else 256-bit ones
 * (GCC's choice otherwise: 512 for these targets): on an Intel Xeon, forward and backward, the
 * 512-bit short rows took 0.93x the time of the 256-bit ones at E = 8, and the 512-bit longer rows
 * with the per-row selection 1.07x (E = 64) and 1.05x (E = 256)
 * (benchmarks/results/bench_core_isa_intel.txt, appendix B). Clang takes no vector-width preference
 * in a target attribute and builds both with its own choice. */
#include "lapsum_loops.h"

#if SMOE_X86_DISPATCH
#define SMOE_LOOPS_ISA avx512
#define SMOE_AVX512 "avx512f,avx512vl,avx512bw,avx512dq"
#if defined(__clang__)
#define SMOE_LOOPS_SHORT_ATTRS __attribute__((flatten, target(SMOE_AVX512)))
#define SMOE_LOOPS_LONG_ATTRS SMOE_LOOPS_SHORT_ATTRS
#define SMOE_LOOPS_SPLIT_WIDTH 0
#else
#define SMOE_LOOPS_SHORT_ATTRS __attribute__((flatten, target(SMOE_AVX512 ",prefer-vector-width=512")))
#define SMOE_LOOPS_LONG_ATTRS __attribute__((flatten, target(SMOE_AVX512 ",prefer-vector-width=256")))
#define SMOE_LOOPS_SPLIT_WIDTH 1
#endif
#define SMOE_LOOPS_LANES_MAX 256
#include "lapsum_loops_def.h"
#endif
