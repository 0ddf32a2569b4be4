/* extern "C" launchers of the CUDA kernels. Includable without CUDA: streams are void*. */
#ifndef SOFTMOE_CUDA_LAUNCH_H
#define SOFTMOE_CUDA_LAUNCH_H

#include <stddef.h>
#include <stdint.h>

#include "../core/softmoe.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Launch shape of the soft top-k kernels for `rows` rows of `row_scratch_bytes` scratch each
 * (smoe_topk_scratch_bytes) on a device of `sm_count` multiprocessors: *threads threads in all (one
 * row per thread, grid-stride; 0 for no rows) in blocks of *block (32, 64 or 128: small enough for a
 * block on every multiprocessor when the rows allow). The caller allocates
 * *threads * row_scratch_bytes bytes of device workspace: at most 64 MiB, or one warp per
 * multiprocessor's scratch when that is more. Host only, no device needed. */
void smoe_cuda_topk_shape(int64_t rows, size_t row_scratch_bytes, int sm_count, int64_t *threads, int *block);

/* Same arguments and semantics as smoe_topk_fwd / smoe_topk_bwd for all rows; every pointer in
 * args is a device pointer. One launch of the shape above, on `stream` (a cudaStream_t). */
smoe_status smoe_cuda_topk_fwd(const smoe_topk_fwd_args *args, void *workspace, int64_t threads, int block,
                               void *stream);
smoe_status smoe_cuda_topk_bwd(const smoe_topk_bwd_args *args, void *workspace, int64_t threads, int block,
                               void *stream);

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

/* ---- Grouped matmul over expert-contiguous row segments (grouped.cu): the expert compute of the
 * CUDA binding. offsets [experts + 1] (int64, device) are read on the device only, never checked on
 * the host: the kernels turn them into valid bounds (see grouped.cu), so bad offsets give defined
 * output, not an error. Strides are in elements; every pointer is a device pointer. Each call is a
 * fixed number of launches (two) on `stream`, whatever `experts`. */
typedef struct {
  int64_t experts, rows, k, n; /* x [rows, k], w [experts, k, n], y [rows, n] */
  smoe_dtype dtype;            /* of x, w and y (math in float; double for SMOE_F64) */
  const void *x;
  int64_t x_row_stride, x_col_stride;
  const void *w;
  int64_t w_expert_stride, w_row_stride, w_col_stride;
  const int64_t *offsets;
  void *y; /* rows of y_row_stride, columns contiguous; padding rows (from offsets[experts]) get 0 */
  int64_t y_row_stride;
} smoe_grouped_mm_args;

typedef struct {
  int64_t experts, rows, k, n; /* x [rows, k], grad_y [rows, n], grad_w [experts, k, n] contiguous */
  smoe_dtype dtype;
  const void *x;
  int64_t x_row_stride, x_col_stride;
  const void *grad_y;
  int64_t g_row_stride, g_col_stride;
  const int64_t *offsets;
  void *grad_w;
} smoe_grouped_wgrad_args;

/* Device workspace of either call (the segment bounds and the tile numbering). */
size_t smoe_cuda_grouped_workspace_bytes(int64_t experts);
smoe_status smoe_cuda_grouped_mm(const smoe_grouped_mm_args *args, void *workspace, void *stream);
smoe_status smoe_cuda_grouped_mm_weight_grad(const smoe_grouped_wgrad_args *args, void *workspace, void *stream);

/* "cudaErrorName: text" of a cudaError_t code ("" for cudaSuccess), and of the CUDA error behind the
 * last SMOE_ERR_DEVICE a launcher returned on this host thread. Host-only; no device needed. The
 * string lives until the thread's next call. */
const char *smoe_cuda_error_text(int error);
const char *smoe_cuda_last_error(void);

#ifdef __cplusplus
}
#endif

#endif /* SOFTMOE_CUDA_LAUNCH_H */
