/* extern "C" launchers of the CUDA kernels. Includable without CUDA: streams are void*. */
#ifndef SOFTMOE_CUDA_LAUNCH_H
#define SOFTMOE_CUDA_LAUNCH_H

#include <stddef.h>
#include <stdint.h>

#include "../core/softmoe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Number of threads the soft top-k kernels run for `rows` rows (one row per thread, grid-stride).
 * The caller allocates threads * smoe_topk_scratch_bytes(...) bytes of device workspace. */
int64_t smoe_cuda_topk_threads(int64_t rows);

/* Same arguments and semantics as smoe_topk_fwd / smoe_topk_bwd for all rows; every pointer in
 * args is a device pointer. One launch, on `stream` (a cudaStream_t). */
smoe_status smoe_cuda_topk_fwd(const smoe_topk_fwd_args *args, void *workspace, int64_t threads, void *stream);
smoe_status smoe_cuda_topk_bwd(const smoe_topk_bwd_args *args, void *workspace, int64_t threads, void *stream);

/* Deterministic sum of n float (SMOE_F32) or double (SMOE_F64) values into *out (device pointers):
 * a fixed two-level tree with no atomics, bit-identical run to run. */
size_t smoe_cuda_sum_workspace_bytes(int64_t n);
smoe_status smoe_cuda_sum(const void *x, smoe_dtype dtype, int64_t n, void *out, void *workspace, void *stream);

/* ---- Truncated dispatch (route.cu): same arguments and semantics as the CPU entry points in
 * core/softmoe.h, for all tokens / slots at once; every pointer in args is a device pointer and
 * every launch goes to `stream`. Out-of-range indices are skipped as padding (no error report). */

/* Device workspace the plan needs: the per-token expert lists, the per-(expert, chunk) counts and
 * the scan's tile sums. */
size_t smoe_cuda_plan_workspace_bytes(int64_t tokens, int64_t experts, int64_t max_active);
/* The plan from integer counts and scans only (no atomics, no host sync): select, count per
 * (expert, chunk of tokens), exclusive scan in (expert, chunk) order, ordered placement. */
smoe_status smoe_cuda_dispatch_plan(const smoe_plan_args *args, void *workspace, void *stream);
smoe_status smoe_cuda_gather_rows(const smoe_gather_args *args, void *stream);
smoe_status smoe_cuda_combine_rows(const smoe_combine_args *args, void *stream);
smoe_status smoe_cuda_combine_bwd(const smoe_combine_bwd_args *args, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* SOFTMOE_CUDA_LAUNCH_H */
