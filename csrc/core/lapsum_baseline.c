/* The soft top-k's row loops for the build's own target (lapsum_loops.h): the set every CPU runs. */
#include "lapsum_loops.h"

#if defined(__GNUC__)
#define SMOE_LOOPS_SHORT_ATTRS __attribute__((flatten))
#else
#define SMOE_LOOPS_SHORT_ATTRS
#endif
#define SMOE_LOOPS_ISA baseline
#define SMOE_LOOPS_LONG_ATTRS SMOE_LOOPS_SHORT_ATTRS
#define SMOE_LOOPS_SPLIT_WIDTH 0
#define SMOE_LOOPS_LANES_MAX 0
#include "lapsum_loops_def.h"
