/* The soft top-k's row loops for AVX2 (lapsum_loops.h); on other CPUs and compilers, nothing. */
#include "lapsum_loops.h"

#if SMOE_X86_DISPATCH
#define SMOE_LOOPS_ISA avx2
#define SMOE_LOOPS_SHORT_ATTRS __attribute__((flatten, target("avx2")))
#define SMOE_LOOPS_LONG_ATTRS SMOE_LOOPS_SHORT_ATTRS
#define SMOE_LOOPS_SPLIT_WIDTH 0
#define SMOE_LOOPS_LANES_MAX 32
#include "lapsum_loops_def.h"
#endif
