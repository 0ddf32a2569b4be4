/* The soft top-k's loops over rows on the CPU, one set per instruction set: what lapsum.c (the
 * entry points, which pick a set for the CPU) and the files that build each set (lapsum_baseline.c,
 * lapsum_avx2.c, lapsum_avx512.c, through lapsum_loops_def.h) share.
 *
 * Each set is a translation unit of its own: the three are the bulk of the core's compile time
 * (every per-row function is inlined into each loop), and apart a parallel build compiles them at
 * once.
 *
 * On x86-64 with GCC or clang the sets are built for the build's own target (SSE2 unless told
 * otherwise), for AVX2, and for AVX-512 (F, VL, BW, DQ: Intel Xeon since Skylake, AMD since Zen 4);
 * elsewhere only the first. AVX-512 brings a mask register per comparison (a blend in one
 * instruction) and 32 vector registers.
 *
 * Every set gives the same bits: nothing is contracted into a fused multiply-add (AVX2 here has no
 * FMA; AVX-512 has, and GCC's GNU modes and clang's default would contract there, a * b + c rounded
 * once where the baseline build rounds twice: hence the pragma below, before any function of the
 * including file), and the lane sums are fixed trees. */
#ifndef SMOE_LAPSUM_LOOPS_H
#define SMOE_LAPSUM_LOOPS_H

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "lapsum_args.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SMOE_X86_DISPATCH 1
#else
#define SMOE_X86_DISPATCH 0
#endif

/* The loops of one set over rows [begin, end) of a call whose arguments are valid; rs / is: one
 * row's scratch (lapsum_args.h), for the rows the per-row functions compute. */
#define SMOE_DECLARE_ROW_LOOPS(isa)                                                                       \
  void smoe_topk_fwd_rows_##isa(const smoe_topk_fwd_args *a, int64_t begin, int64_t end, void *rs, int32_t *is); \
  void smoe_topk_bwd_rows_##isa(const smoe_topk_bwd_args *a, int64_t begin, int64_t end, void *rs, int32_t *is);
SMOE_DECLARE_ROW_LOOPS(baseline)
#if SMOE_X86_DISPATCH
SMOE_DECLARE_ROW_LOOPS(avx2)
SMOE_DECLARE_ROW_LOOPS(avx512)
#endif
#undef SMOE_DECLARE_ROW_LOOPS

#endif /* SMOE_LAPSUM_LOOPS_H */
