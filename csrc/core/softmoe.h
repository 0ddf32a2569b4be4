/* softmoe C API: LapSum soft top-k (plain and left-truncated) and its deterministic reductions.
 *
 * Framework-free: plain pointers, sizes and a status code. Every function is valid C11 and C++17.
 * Row-major layout: `rows` rows of `n` contiguous scores (the expert dimension is last).
 * Storage dtypes are f32 / f64 / bf16 / f16; math runs in float for the 32- and 16-bit types and
 * in double for f64 (the "math type" below). Per-row parameters (k, alpha) are given in the math
 * type with a stride: 0 broadcasts one value to every row, 1 gives one value per row.
 */
#ifndef SOFTMOE_H
#define SOFTMOE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  SMOE_OK = 0,
  SMOE_ERR_ARG = 1,   /* a size, pointer or option is out of its documented range */
  SMOE_ERR_ALLOC = 2, /* scratch memory could not be allocated */
  SMOE_ERR_DEVICE = 3 /* a CUDA launch or runtime call failed */
} smoe_status;

/* A fixed English phrase for a status ("ok", "invalid argument", ...), for error messages; a
 * value outside the enum gives "unknown status". */
const char *smoe_status_string(smoe_status status);

typedef enum { SMOE_F32 = 0, SMOE_F64 = 1, SMOE_BF16 = 2, SMOE_F16 = 3 } smoe_dtype;

/* Forward of p = soft_topk(scores, k, alpha, eps, max_active) for rows [row_begin, row_end).
 *
 * A row's candidates are its `max_active` largest finite scores (ties: lower index first); -inf
 * scores are never candidates. With m candidates and 0 < k < m the threshold b solves
 * sum_i G((r_i - b) / alpha) = k where G is the Laplace CDF (eps = 0) or the left-truncated one
 * (eps > 0: exact zeros for x <= -c, c = -ln(2 eps)). Limits: k = 0 gives p = 0 and b = +inf,
 * k = m gives p = 1 on the candidates and b = -inf. A row with a NaN or +inf score, k outside
 * [0, m] or alpha not in (0, inf) gets p = NaN and b = NaN; no other row is touched. */
typedef struct {
  int64_t rows, n;
  smoe_dtype dtype;     /* storage dtype of scores and p */
  const void *scores;   /* [rows, n] */
  const void *k;        /* math type, k[row * k_stride] */
  int64_t k_stride;
  const void *alpha;    /* math type, alpha[row * alpha_stride] */
  int64_t alpha_stride;
  double eps;           /* [0, 0.5) */
  int64_t max_active;   /* [1, n] */
  void *p;              /* out [rows, n], storage dtype */
  double *threshold;    /* out [rows] */
} smoe_topk_fwd_args;

/* Backward (VJP) of soft_topk. Writes grad_scores and, per row, that row's contribution to the
 * gradients of k and alpha (grad_k_rows[row] = s, grad_alpha_rows[row]); reduce them with
 * smoe_sum_* when k or alpha is shared by all rows. Rows whose threshold is NaN get NaN; rows at a
 * limit (threshold = +-inf) get zero gradients. */
typedef struct {
  int64_t rows, n;
  smoe_dtype dtype;         /* storage dtype of grad_p, scores, p and grad_scores */
  const void *grad_p;       /* [rows, n] */
  const void *scores;       /* [rows, n] */
  const void *p;            /* [rows, n], the forward output */
  const double *threshold;  /* [rows], the forward output */
  const void *alpha;        /* math type, alpha[row * alpha_stride] */
  int64_t alpha_stride;
  double eps;
  int64_t max_active;
  void *grad_scores;        /* out [rows, n], storage dtype */
  void *grad_k_rows;        /* out [rows], math type */
  void *grad_alpha_rows;    /* out [rows], math type */
} smoe_topk_bwd_args;

/* Scratch the CPU entry points need per call (they allocate it themselves) and the CUDA launchers
 * need per concurrently running row (the caller provides it), in bytes. */
size_t smoe_topk_scratch_bytes(smoe_dtype dtype, int64_t n, int64_t max_active);

smoe_status smoe_topk_fwd(const smoe_topk_fwd_args *args, int64_t row_begin, int64_t row_end);
smoe_status smoe_topk_bwd(const smoe_topk_bwd_args *args, int64_t row_begin, int64_t row_end);

/* The CPU entry points above run the build's baseline instruction set or, on x86-64 CPUs that have
 * them, an AVX2 or AVX-512 (F, VL, BW, DQ) build of the same code, the widest the CPU runs
 * (SMOE_ISA_AUTO). All give the same bits; these variants take the choice as an argument so that
 * tests and benchmarks can compare them. A request this build or CPU cannot serve (SMOE_ISA_AVX512
 * without AVX-512, or on another architecture) returns SMOE_ERR_ARG. */
enum { SMOE_ISA_AUTO = -1, SMOE_ISA_BASELINE = 0, SMOE_ISA_AVX2 = 1, SMOE_ISA_AVX512 = 2 };
smoe_status smoe_topk_fwd_isa(const smoe_topk_fwd_args *args, int64_t row_begin, int64_t row_end, int isa);
smoe_status smoe_topk_bwd_isa(const smoe_topk_bwd_args *args, int64_t row_begin, int64_t row_end, int isa);

/* Deterministic sums: a fixed pairwise tree over the input order, independent of threads or of how
 * a caller chunks its work, so equal inputs give bit-identical results. This is the reduction
 * behind the gradient of a shared k (the budget gradient) and of a shared alpha. */
float smoe_sum_f32(const float *x, int64_t n);
double smoe_sum_f64(const double *x, int64_t n);

/* Storage conversions, exposed for tests (round to nearest even, NaN stays NaN). */
float smoe_bf16_bits_to_float(uint16_t bits);
uint16_t smoe_float_to_bf16_bits(float x);
float smoe_f16_bits_to_float(uint16_t bits);
uint16_t smoe_float_to_f16_bits(float x);

/* ==== Truncated dispatch (route.c, route_row.h, cuda/route.cu) ================================ *
 *
 * T tokens, E experts, M = max_active, P = T * M slots. From routing weights p [T, E] with exact
 * zeros a *plan* permutes the active (token, expert) pairs into expert-contiguous order:
 *   - an entry is active iff p != 0 (NaN is active, -0.0 is not); a token keeps its first M active
 *     experts in expert order, later actives of that token are ignored (never routed);
 *   - offsets [E + 1]: offsets[0] = 0, offsets[e + 1] - offsets[e] = tokens routed to expert e,
 *     offsets[E] = N, the number of routed pairs;
 *   - pair_token [P], pair_expert [P]: token and expert of slot s < N, sorted by (expert, token);
 *     -1 for the padding slots s >= N;
 *   - token_pairs [T, M]: the slots of token t's pairs in increasing expert order, then -1.
 * The plan is a pure function of the zero pattern of p: integer counts and scans only, identical
 * however the tokens are chunked (and on the GPU).
 *
 * All index arrays are int64. gather / combine trust that the index arrays come from one plan
 * (each active slot referenced by exactly one token); an index outside its range ([-1, T) for
 * pair_token, [-1, S) for token_pairs, [0, E) for pair_expert of a referenced slot) is skipped as
 * if it were padding, and the CPU entry points then return SMOE_ERR_ARG.
 *
 * gather / combine work on S slots, N <= S <= P: S = P keeps every shape fixed by (T, E, M) (what
 * a compiled graph needs); S = N, the routed prefix of pair_token / pair_expert, drops the padding
 * rows, so the expert buffers hold only routed pairs (eager callers that can read N). */

/* The plan. The CPU runs it in three passes over token chunks (the caller may run the chunks of a
 * pass in parallel): count, scan (serial, O(chunks * E)), place. Chunk c holds the tokens
 * [c * chunk, min(T, (c + 1) * chunk)). */
typedef struct {
  int64_t tokens, experts, max_active; /* T >= 0, E >= 1, 1 <= M <= E */
  smoe_dtype dtype;                    /* storage dtype of p */
  const void *p;                       /* [T, E] */
  int64_t *offsets;                    /* out [E + 1] */
  int64_t *pair_token;                 /* out [P] */
  int64_t *pair_expert;                /* out [P] */
  int64_t *token_pairs;                /* out [T, M] */
} smoe_plan_args;

/* Pass 1 for the tokens [begin, end): selects each token's experts (written to token_pairs as
 * expert ids for now, -1 padded) and writes this chunk's per-expert counts to counts[0..E). */
smoe_status smoe_plan_count(const smoe_plan_args *args, int64_t begin, int64_t end, int64_t *counts);
/* Pass 2: counts [chunks, E] (row c from pass 1 on chunk c) become, in place, the first slot of
 * chunk c's pairs with expert e (an exclusive scan in (expert, chunk) order); writes offsets. */
smoe_status smoe_plan_scan(const smoe_plan_args *args, int64_t chunks, int64_t *counts);
/* Pass 3 for the tokens [begin, end) of one chunk, given that chunk's row of the scanned counts
 * (advanced in place): writes pair_token / pair_expert of the chunk's pairs, replaces the expert
 * ids in token_pairs by slots, and writes -1 to the padding slots among [begin * M, end * M). */
smoe_status smoe_plan_place(const smoe_plan_args *args, int64_t begin, int64_t end, int64_t *base);
/* The three passes in one serial call with chunks of `chunk` >= 1 tokens (scratch allocated here).
 * The result does not depend on `chunk`. */
smoe_status smoe_dispatch_plan(const smoe_plan_args *args, int64_t chunk);

/* gather: xs[s] = x[pair_token[s]] for the slots [slot_begin, slot_end), a zero row where
 * pair_token[s] = -1. A bit copy: x and xs have the same storage dtype. */
typedef struct {
  int64_t tokens, slots, d; /* T, S (N <= S <= P), features */
  smoe_dtype dtype;         /* storage dtype of x and xs */
  const void *x;            /* [T, d] */
  const int64_t *pair_token; /* [S] */
  void *xs;                 /* out [S, d] */
} smoe_gather_args;

smoe_status smoe_gather_rows(const smoe_gather_args *args, int64_t slot_begin, int64_t slot_end);

/* combine for the tokens [begin, end): y[t] = sum_j w_j * ys[s_j] over s_j = token_pairs[t, j] >= 0
 * in j order, w_j = p[t, pair_expert[s_j]], or w_j = 1 when p is NULL (the backward of gather,
 * which then needs neither p nor pair_expert). The math type is double when ys or p is f64, float
 * otherwise; y has the storage dtype of ys. */
typedef struct {
  int64_t tokens, experts, max_active, d; /* T, E (unused without p), M, features */
  smoe_dtype ys_dtype;                    /* storage dtype of ys and y */
  const void *ys;                         /* [S, d] */
  smoe_dtype p_dtype;
  const void *p;                          /* [T, E] or NULL */
  const int64_t *pair_expert;             /* [S] (unused without p) */
  const int64_t *token_pairs;             /* [T, M] */
  void *y;                                /* out [T, d] */
  int64_t slots;                          /* S, N <= S <= T * M */
} smoe_combine_args;

smoe_status smoe_combine_rows(const smoe_combine_args *args, int64_t begin, int64_t end);

/* VJP of combine for the tokens [begin, end) and their slot range [begin * M, end * M) (clipped
 * to S):
 *   grad_ys[s] = p[t, e] * grad_y[t] for an active slot s of pair (t, e), a zero row for padding;
 *   grad_p[t, e] = <grad_y[t], ys[s]> (see smoe_route_dot) for the routed pairs, 0 elsewhere.
 * grad_y and grad_ys have the storage dtype of ys, grad_p that of p; math type as for combine. */
typedef struct {
  int64_t tokens, experts, max_active, d;
  smoe_dtype ys_dtype;
  const void *grad_y;         /* [T, d] */
  const void *ys;             /* [S, d] */
  smoe_dtype p_dtype;
  const void *p;              /* [T, E] */
  const int64_t *pair_token;  /* [S] */
  const int64_t *pair_expert; /* [S] */
  const int64_t *token_pairs; /* [T, M] */
  void *grad_ys;              /* out [S, d] */
  void *grad_p;               /* out [T, E] */
  int64_t slots;              /* S, N <= S <= T * M */
} smoe_combine_bwd_args;

smoe_status smoe_combine_bwd(const smoe_combine_bwd_args *args, int64_t begin, int64_t end);

/* ==== end of truncated dispatch ============================================================== */

#ifdef __cplusplus
}
#endif

#endif /* SOFTMOE_H */
