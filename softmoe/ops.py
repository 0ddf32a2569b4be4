"""The compiled ops: their public wrappers (soft_topk, dispatch_plan, gather_rows, combine_rows,
matmul, grouped_mm, expert_ffn), fake (meta) kernels and autograd.

The schemas (csrc/torch/schemas.cpp) and the CPU / CUDA kernels (csrc/torch/<family>.cpp /
<family>_cuda.cpp) are in the compiled extension; importing this module loads them.
"""
import math
from typing import NamedTuple, Optional, Union

import torch

from . import _autocast, _checks, _extension  # noqa: F401  (_autocast: the ops' torch.autocast rules)

_extension.load()  # softmoe._C: runs the TORCH_LIBRARY registrations


def _lead_shape(scores: torch.Tensor) -> torch.Size:
    return scores.shape[:-1]


def _check_same_device(op: str, *tensors: torch.Tensor) -> None:
    """Fake kernels also run when one argument is on the meta device and the rest are real; without
    this check they would return uninitialised memory instead of an error."""
    device = tensors[0].device
    torch._check(
        all(t.device == device for t in tensors),
        lambda: f"softmoe: {op}: all tensor arguments must be on one device, got "
        + ", ".join(str(t.device) for t in tensors),
    )


# Every backward op has an autograd kernel too, so that a backward taken with create_graph=True never
# meets torch's fallback for ops without one (it warns that this "may lead to silently incorrect
# behavior", then runs the kernel under autograd, where its out= matmuls fail). The linear backward
# ops (gather_rows_backward, combine_rows_backward, grouped_mm_weight_grad) are differentiated with
# the forward ops; the two whose second derivative would need kernels of its own (soft_topk_backward,
# expert_ffn_backward) raise when a second backward reaches them.


def _differentiable_once(forward: str, backward_op: str):
    """The autograd kernel of ``backward_op``: raises a NotImplementedError naming both ops when a second
    backward reaches it."""

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"softmoe: {forward} can be differentiated once, not twice: a second backward (after "
            f"torch.autograd.grad(..., create_graph=True), e.g. for a gradient penalty or a Hessian-vector "
            f"product) reached its backward op softmoe::{backward_op}, which has no derivative"
        )

    return backward


@torch.library.register_fake("softmoe::soft_topk")
def _soft_topk_fake(scores, k, alpha, eps, max_active):
    _check_same_device("soft_topk", scores, k, alpha)
    torch._check(scores.dim() >= 1, lambda: "softmoe: scores must have at least one dimension")
    p = torch.empty_like(scores, memory_format=torch.contiguous_format)
    threshold = scores.new_empty(_lead_shape(scores), dtype=torch.float64)
    return p, threshold


@torch.library.register_fake("softmoe::soft_topk_backward")
def _soft_topk_backward_fake(grad_p, scores, p, threshold, k, alpha, eps, max_active):
    _check_same_device("soft_topk_backward", grad_p, scores, p, threshold, k, alpha)
    grad_scores = torch.empty_like(scores, memory_format=torch.contiguous_format)
    return grad_scores, torch.empty_like(k), torch.empty_like(alpha)


def _soft_topk_setup_context(ctx, inputs, output):
    scores, k, alpha, eps, max_active = inputs
    p, threshold = output
    ctx.save_for_backward(scores, p, threshold, k, alpha)
    ctx.eps = eps
    ctx.max_active = max_active
    ctx.mark_non_differentiable(threshold)


def _soft_topk_backward(ctx, grad_p, grad_threshold):
    scores, p, threshold, k, alpha = ctx.saved_tensors
    grad_scores, grad_k, grad_alpha = torch.ops.softmoe.soft_topk_backward(
        grad_p, scores, p, threshold, k, alpha, ctx.eps, ctx.max_active
    )
    return grad_scores, grad_k, grad_alpha, None, None


torch.library.register_autograd(
    "softmoe::soft_topk", _soft_topk_backward, setup_context=_soft_topk_setup_context
)
torch.library.register_autograd(
    "softmoe::soft_topk_backward", _differentiable_once("soft_topk", "soft_topk_backward")
)


# The public wrapper (softmoe.soft_topk): torch.topk-like arguments, checked, on any dimension.
Number = Union[float, int]


def soft_topk(
    scores: torch.Tensor,
    k: Union[Number, torch.Tensor],
    alpha: Union[Number, torch.Tensor] = 1.0,
    dim: int = -1,
    eps: float = 0.0,
    max_active: Optional[int] = None,
    *,
    strict: bool = False,
) -> torch.Tensor:
    """Differentiable soft top-k (LapSum), optionally truncated to exact zeros.

    For each slice of ``scores`` along ``dim`` (E entries), returns weights ``p`` in [0, 1] with
    ``p.sum(dim) == k``: the Laplace CDF ``F((r_i - b) / alpha)`` at the threshold ``b`` that makes
    the weights sum to ``k``. Smaller ``alpha`` approaches the hard top-k indicator.

    With ``eps > 0`` the kernel is the left-truncated Laplace CDF: entries at least
    ``c * alpha`` below the threshold (``c = -ln(2 eps)``) get exactly 0, so only a few experts are
    active, and the sum is still exactly ``k``. ``max_active`` caps the candidates to the
    ``max_active`` largest scores (ties: lower index first); the others get 0.

    Args:
        scores: ``[..., E, ...]`` float32/float64/bfloat16/float16 scores (larger wins). Scores of
            ``-inf`` are never selected.
        k: the soft count. A float in ``(0, max_active)``, or a floating tensor, scalar or with the
            shape of ``scores`` without ``dim`` (one per slice); tensors receive gradients.
        alpha: the temperature, a float > 0 or a tensor like ``k``; tensors receive gradients.
        dim: the dimension of the E experts.
        eps: truncation level in ``[0, 0.5)``; 0 means the plain (never exactly zero) kernel.
        max_active: at most this many nonzero weights per slice (``ceil(k) <= max_active <= E``).
        strict: check the result and raise ``ValueError`` for slices that came out NaN (a NaN or
            +inf score, a tensor k/alpha out of range for that slice, or, float64 only, an alpha
            so large, about 1e305 and up, that the threshold overflows). This needs a device sync,
            so it is off by default: such slices are then NaN and all others are unaffected.

    Returns:
        ``p``: same shape and dtype as ``scores``. The math runs in float32 (float64 for float64
        input).

    A tensor ``k`` may be exactly 0 (slice of zeros) or exactly the number of candidates (ones on
    the candidates); these limits have zero gradients.
    """
    fn = "soft_topk"
    _checks.check_float_tensor(fn, "scores", scores)
    if scores.dim() == 0:
        raise ValueError(f"{fn}: scores must have at least one dimension (the experts), got a 0-d tensor")
    dim = _checks.normalize_dim(fn, dim, scores.dim())
    num_experts = scores.shape[dim]
    if num_experts == 0:
        raise ValueError(f"{fn}: scores must have at least one expert along dim {dim}, got 0")
    eps = _checks.check_eps(fn, eps)
    strict = _checks.check_bool(fn, "strict", strict)
    moved = scores.movedim(dim, -1)
    lead_shape = moved.shape[:-1]
    math_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32

    if isinstance(k, torch.Tensor):
        _checks.check_row_param(fn, "k", k, scores, lead_shape)
        max_active = _checks.check_max_active(fn, max_active, num_experts, None)
        k_tensor = k
    else:
        k_value = _checks.check_number(fn, "k", k, tensor_ok=True)
        if not math.isfinite(k_value):
            raise ValueError(f"{fn}: k must be a finite number with 0 < k < max_active, got {k_value}")
        max_active = _checks.check_max_active(fn, max_active, num_experts, max(k_value, 0.0))
        if not 0.0 < k_value < max_active:
            raise ValueError(
                f"{fn}: k must satisfy 0 < k < max_active (= {max_active}, the number of candidates), got {k_value}"
            )
        k_tensor = torch.tensor(k_value, dtype=math_dtype, device=scores.device)

    if isinstance(alpha, torch.Tensor):
        _checks.check_row_param(fn, "alpha", alpha, scores, lead_shape)
        alpha_tensor = alpha
    else:
        alpha_value = _checks.check_number(fn, "alpha", alpha, tensor_ok=True)
        if not (alpha_value > 0.0 and math.isfinite(alpha_value)):
            raise ValueError(f"{fn}: alpha must be a finite number > 0, got {alpha_value}")
        alpha_tensor = torch.tensor(alpha_value, dtype=math_dtype, device=scores.device)

    p, _ = torch.ops.softmoe.soft_topk(moved, k_tensor, alpha_tensor, eps, max_active)
    if strict:
        _raise_on_bad_rows(fn, moved, p, k_tensor, alpha_tensor, max_active)
    return p.movedim(-1, dim)


def _raise_on_bad_rows(
    fn: str, scores: torch.Tensor, p: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor, max_active: int
) -> None:
    bad = torch.isnan(p).any(-1)
    if not bool(bad.any()):
        return
    row = tuple(int(i) for i in torch.nonzero(bad)[0])
    r = scores[row].double()
    math_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    kv = float(k.reshape(-1)[0] if k.numel() == 1 else k[row])
    av = float(alpha.reshape(-1)[0] if alpha.numel() == 1 else alpha[row])
    if torch.isnan(r).any():
        reason = "its scores contain NaN"
    elif torch.isposinf(r).any():
        reason = "its scores contain +inf"
    elif not (av > 0.0 and math.isfinite(av)):
        reason = f"alpha = {av} is not a finite number > 0"
    elif bool(torch.tensor(av, dtype=math_dtype).reciprocal().isinf()):  # 1 / alpha in the kernel's math type
        reason = f"alpha = {av} is so small that 1 / alpha overflows {math_dtype}"
    elif not 0.0 <= kv <= min(max_active, int((r > -math.inf).sum())):
        reason = f"k = {kv} is outside [0, number of candidates]"
    else:  # float64 only: the threshold s - alpha * tau passes the double range (alpha ~1e305 and up)
        reason = f"alpha = {av} is so large that the threshold overflows float64"
    raise ValueError(f"{fn}: row {row} of scores produced NaN because {reason} (strict=True)")


# ==== Truncated dispatch: dispatch_plan, gather_rows, combine_rows ============================
#
# T tokens, E experts, M = max_active, P = T * M slots. The plan permutes the active (token, expert)
# pairs (p != 0; at most the first M per token, in expert order) into expert-contiguous order so
# that the experts run on contiguous row segments; every shape is fixed by (T, E, M), so nothing
# depends on the data and nothing syncs with the host. Padding slots (s >= N, the number of routed
# pairs) carry index -1 and zero rows. Eager callers may drop them (DispatchPlan.trim, one read of
# N): gather and combine accept any S slots with N <= S <= P.


@torch.library.register_fake("softmoe::dispatch_plan")
def _dispatch_plan_fake(p, max_active):
    torch._check(p.dim() == 2, lambda: "softmoe: dispatch_plan: p must be 2-D [tokens, experts]")
    tokens, experts = p.shape
    idx = dict(dtype=torch.int64)
    return (
        p.new_empty((experts + 1,), **idx),
        p.new_empty((tokens * max_active,), **idx),
        p.new_empty((tokens * max_active,), **idx),
        p.new_empty((tokens, max_active), **idx),
    )


@torch.library.register_fake("softmoe::gather_rows")
def _gather_rows_fake(x, pair_token, token_pairs):
    _check_same_device("gather_rows", x, pair_token, token_pairs)
    return x.new_empty((pair_token.shape[0], x.shape[1]))


@torch.library.register_fake("softmoe::gather_rows_backward")
def _gather_rows_backward_fake(grad_xs, token_pairs):
    _check_same_device("gather_rows_backward", grad_xs, token_pairs)
    return grad_xs.new_empty((token_pairs.shape[0], grad_xs.shape[1]))


@torch.library.register_fake("softmoe::combine_rows")
def _combine_rows_fake(ys, p, pair_token, pair_expert, token_pairs):
    _check_same_device("combine_rows", ys, p, pair_token, pair_expert, token_pairs)
    return ys.new_empty((token_pairs.shape[0], ys.shape[1]))


@torch.library.register_fake("softmoe::combine_rows_backward")
def _combine_rows_backward_fake(grad_y, ys, p, pair_token, pair_expert, token_pairs):
    _check_same_device("combine_rows_backward", grad_y, ys, p, pair_token, pair_expert, token_pairs)
    return ys.new_empty(ys.shape), p.new_empty(p.shape)


def _gather_rows_setup_context(ctx, inputs, output):
    _, _, token_pairs = inputs
    ctx.save_for_backward(token_pairs)


def _gather_rows_backward(ctx, grad_xs):
    (token_pairs,) = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.softmoe.gather_rows_backward(grad_xs, token_pairs)
    return grad_x, None, None


torch.library.register_autograd(
    "softmoe::gather_rows", _gather_rows_backward, setup_context=_gather_rows_setup_context
)


def _slot_tokens(token_pairs: torch.Tensor, slots: int) -> torch.Tensor:
    """A plan's ``pair_token`` ``[slots]`` rebuilt from its ``token_pairs`` ``[T, M]`` (each routed slot
    appears there once; the others are padding, -1). Shapes depend on (T, M, slots) only: the padding
    entries of token_pairs write to one extra slot that is dropped."""
    tokens, width = token_pairs.shape
    owner = torch.arange(tokens, dtype=torch.int64, device=token_pairs.device).unsqueeze(1).expand(tokens, width)
    target = torch.where(token_pairs >= 0, token_pairs, slots)
    pair_token = torch.full((slots + 1,), -1, dtype=torch.int64, device=token_pairs.device)
    return pair_token.scatter_(0, target.reshape(-1), owner.reshape(-1))[:slots]


def _gather_rows_backward_setup_context(ctx, inputs, output):
    grad_xs, token_pairs = inputs
    ctx.save_for_backward(token_pairs)
    ctx.slots = grad_xs.shape[0]


def _gather_rows_backward_backward(ctx, grad_grad_x):
    # gather_rows_backward sums each token's slots: its adjoint copies the token's row to its slots.
    (token_pairs,) = ctx.saved_tensors
    pair_token = _slot_tokens(token_pairs, ctx.slots)
    return torch.ops.softmoe.gather_rows(grad_grad_x, pair_token, token_pairs), None


torch.library.register_autograd(
    "softmoe::gather_rows_backward", _gather_rows_backward_backward, setup_context=_gather_rows_backward_setup_context
)


def _combine_rows_setup_context(ctx, inputs, output):
    ys, p, pair_token, pair_expert, token_pairs = inputs
    ctx.save_for_backward(ys, p, pair_token, pair_expert, token_pairs)


def _combine_rows_backward(ctx, grad_y):
    ys, p, pair_token, pair_expert, token_pairs = ctx.saved_tensors
    grad_ys = grad_p = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        grad_ys, grad_p = torch.ops.softmoe.combine_rows_backward(grad_y, ys, p, pair_token, pair_expert, token_pairs)
    return (
        grad_ys if ctx.needs_input_grad[0] else None,
        grad_p if ctx.needs_input_grad[1] else None,
        None,
        None,
        None,
    )


torch.library.register_autograd(
    "softmoe::combine_rows", _combine_rows_backward, setup_context=_combine_rows_setup_context
)


def _combine_rows_backward_setup_context(ctx, inputs, output):
    grad_y, ys, p, pair_token, pair_expert, token_pairs = inputs
    ctx.save_for_backward(grad_y, ys, p, pair_token, pair_expert, token_pairs)


def _combine_rows_backward_backward(ctx, grad_grad_ys, grad_grad_p):
    # combine_rows_backward is bilinear: grad_ys[s] = p[t, e] * grad_y[t] and grad_p[t, e] =
    # <grad_y[t], ys[s]> over the plan's pairs (s, t, e); each term of its derivative is one of the
    # two combine ops again.
    grad_y, ys, p, pair_token, pair_expert, token_pairs = ctx.saved_tensors
    plan = (pair_token, pair_expert, token_pairs)
    need_grad_y, need_ys, need_p = ctx.needs_input_grad[:3]
    d_grad_y = d_ys = d_p = None
    if need_grad_y:
        d_grad_y = torch.ops.softmoe.combine_rows(grad_grad_ys, p, *plan) + torch.ops.softmoe.combine_rows(
            ys, grad_grad_p, *plan
        )
        d_grad_y = d_grad_y.to(grad_y.dtype)
    if need_ys:
        d_ys = torch.ops.softmoe.combine_rows_backward(grad_y, ys, grad_grad_p, *plan)[0]
    if need_p:
        d_p = torch.ops.softmoe.combine_rows_backward(grad_y, grad_grad_ys, p, *plan)[1]
    return d_grad_y, d_ys, d_p, None, None, None


torch.library.register_autograd(
    "softmoe::combine_rows_backward", _combine_rows_backward_backward, setup_context=_combine_rows_backward_setup_context
)


class DispatchPlan(NamedTuple):
    """The truncated-dispatch plan of routing weights p (T tokens, E experts, M = max_active).

    All four tensors are int64 on p's device, with shapes fixed by (T, E, M):

    - ``offsets`` ``[E + 1]``: expert e's pairs are the slots ``offsets[e] .. offsets[e + 1]``;
      ``offsets[E] = N``, the number of routed (token, expert) pairs.
    - ``pair_token`` ``[T * M]``: the token of slot s (slots sorted by expert, then token); -1 for
      the padding slots s >= N.
    - ``pair_expert`` ``[T * M]``: the expert of slot s; -1 for padding.
    - ``token_pairs`` ``[T, M]``: token t's slots in increasing expert order, then -1.
    """

    offsets: torch.Tensor
    pair_token: torch.Tensor
    pair_expert: torch.Tensor
    token_pairs: torch.Tensor

    def tokens_per_expert(self) -> torch.Tensor:
        """``[E]`` int64: how many tokens each expert receives (no host sync)."""
        return self.offsets[1:] - self.offsets[:-1]

    def trim(self) -> "DispatchPlan":
        """The same plan without its padding slots: ``pair_token`` and ``pair_expert`` keep their
        first N (routed) entries, so :func:`gather_rows` returns ``[N, d]`` instead of ``[T * M, d]``
        and the experts' buffers hold routed pairs only (the memory of a hard top-k at the same
        realised count). Reads N on the host: a sync on CUDA, and a data-dependent shape that
        ``torch.compile`` would specialise on, so compiled code keeps the untrimmed plan."""
        routed = int(self.offsets[-1])
        return self._replace(pair_token=self.pair_token[:routed], pair_expert=self.pair_expert[:routed])


def _check_plan(fn: str, plan: object) -> DispatchPlan:
    if not isinstance(plan, DispatchPlan):
        raise TypeError(f"{fn}: plan must be the DispatchPlan returned by dispatch_plan, got {type(plan).__name__}")
    return plan


def dispatch_plan(p: torch.Tensor, max_active: int) -> DispatchPlan:
    """Builds the truncated-dispatch plan of routing weights ``p``.

    Args:
        p: ``[..., E]`` routing weights (float32/float64/bfloat16/float16) with exact zeros, e.g.
            from ``soft_topk(..., eps > 0, max_active=M)``. The leading dimensions are flattened
            into T tokens. An entry is active iff it is != 0 (NaN is active, -0.0 is not).
        max_active: M, the most experts a token is routed to, ``1 <= M <= E``. A token with more
            than M active entries keeps its first M in expert order (lowest expert indices); the
            rest are silently not routed. ``soft_topk(..., max_active=M)`` never produces more.

    Returns:
        A :class:`DispatchPlan` (offsets ``[E + 1]``, pair_token ``[T * M]``, pair_expert
        ``[T * M]``, token_pairs ``[T, M]``). Not differentiable; deterministic (integer counts and
        scans only), and identical on CPU and CUDA.
    """
    fn = "dispatch_plan"
    _checks.check_float_tensor(fn, "p", p)
    if p.dim() == 0:
        raise ValueError(f"{fn}: p must have at least one dimension (the experts), got a 0-d tensor")
    experts = p.shape[-1]
    if experts == 0:
        raise ValueError(f"{fn}: p must have at least one expert along its last dimension, got shape {tuple(p.shape)}")
    if isinstance(max_active, bool) or not isinstance(max_active, int):
        raise TypeError(f"{fn}: max_active must be an int, got {type(max_active).__name__}")
    if not 1 <= max_active <= experts:
        raise ValueError(f"{fn}: max_active must satisfy 1 <= max_active <= {experts} (the number of experts), got {max_active}")
    offsets, pair_token, pair_expert, token_pairs = torch.ops.softmoe.dispatch_plan(p.reshape(-1, experts), max_active)
    return DispatchPlan(offsets, pair_token, pair_expert, token_pairs)


def gather_rows(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Permutes token rows into the plan's expert-contiguous slot order.

    Args:
        x: ``[..., d]`` token features whose leading dimensions flatten to the plan's T tokens.
        plan: from :func:`dispatch_plan`.

    Returns:
        ``xs`` ``[S, d]``, dtype of x, with S = ``len(plan.pair_token)`` (``T * M``, or N for a
        trimmed plan, see :meth:`DispatchPlan.trim`): ``xs[s] = x[pair_token[s]]`` for the N routed slots
        (expert e's rows are ``offsets[e] .. offsets[e + 1]``), zero rows for the padding slots.
        Differentiable in x: the gradient of token t is the sum of its slots' gradients, in the
        fixed order of ``token_pairs[t]`` (deterministic).
    """
    fn = "gather_rows"
    plan = _check_plan(fn, plan)
    _checks.check_float_tensor(fn, "x", x)
    if x.dim() == 0:
        raise ValueError(f"{fn}: x must have at least one dimension (the features), got a 0-d tensor")
    tokens = plan.token_pairs.shape[0]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    if x2.shape[0] != tokens:
        raise ValueError(f"{fn}: x must hold the plan's {tokens} tokens ([..., d] flattening to [{tokens}, d]), got shape {tuple(x.shape)}")
    return torch.ops.softmoe.gather_rows(x2, plan.pair_token, plan.token_pairs)


def combine_rows(ys: torch.Tensor, p: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Weighted, deterministic sum of the slots' rows back per token.

    Args:
        ys: ``[S, d]`` expert outputs in slot order, one row per entry of ``plan.pair_token``
            (``T * M``, or N for a trimmed plan); rows of padding slots are ignored.
        p: ``[..., E]`` routing weights, the tensor the plan was built from (or any tensor of the
            same shape: only the plan's pairs are read, e.g. ``p / k`` for normalised combining).
        plan: from :func:`dispatch_plan`.

    Returns:
        ``y`` ``[..., d]`` (p's leading shape), dtype of ys:
        ``y[t] = sum_j p[t, pair_expert[s_j]] * ys[s_j]`` over ``s_j = token_pairs[t, j] >= 0`` in
        j order (a fixed order: deterministic), math in float32 (float64 when ys or p is float64).
        Differentiable in ys and p; the gradient of p is zero outside the plan's pairs.
    """
    fn = "combine_rows"
    plan = _check_plan(fn, plan)
    _checks.check_float_tensor(fn, "ys", ys)
    _checks.check_float_tensor(fn, "p", p)
    if ys.dim() != 2:
        raise ValueError(f"{fn}: ys must be 2-D [slots, d], got shape {tuple(ys.shape)}")
    if p.dim() == 0:
        raise ValueError(f"{fn}: p must have at least one dimension (the experts), got a 0-d tensor")
    # Checked here because the compiled op can only name its own arguments (token_pairs, max_active)
    # when p is the tensor of the wrong shape.
    tokens, experts = plan.token_pairs.shape[0], plan.offsets.shape[0] - 1
    if p.shape[-1] < experts:
        raise ValueError(
            f"{fn}: p must have at least the plan's {experts} experts along its last dimension, got shape {tuple(p.shape)}"
        )
    lead = p.shape[:-1]
    p2 = p.reshape(-1, p.shape[-1]) if p.dim() != 2 else p
    if p2.shape[0] != tokens:
        raise ValueError(
            f"{fn}: p must hold the plan's {tokens} tokens ([..., E] flattening to [{tokens}, E]), got shape {tuple(p.shape)}"
        )
    y = torch.ops.softmoe.combine_rows(ys, p2, plan.pair_token, plan.pair_expert, plan.token_pairs)
    return y if p.dim() == 2 else y.reshape(*lead, ys.shape[-1])


# ==== A matmul whose bits do not depend on the thread count (the router's) ========================


@torch.library.register_fake("softmoe::matmul")
def _matmul_fake(a, b):
    _check_same_device("matmul", a, b)
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: "softmoe: matmul: a and b must be 2-D")
    return a.new_empty((a.shape[0], b.shape[1]))


def _matmul_setup_context(ctx, inputs, output):
    a, b = inputs
    ctx.save_for_backward(a if ctx.needs_input_grad[1] else None, b if ctx.needs_input_grad[0] else None)


def _matmul_backward(ctx, grad):
    a, b = ctx.saved_tensors
    grad_a = torch.ops.softmoe.matmul(grad, b.t()) if ctx.needs_input_grad[0] else None
    grad_b = torch.ops.softmoe.matmul(a.t(), grad) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b


torch.library.register_autograd("softmoe::matmul", _matmul_backward, setup_context=_matmul_setup_context)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for 2-D ``a`` ``[M, K]`` and ``b`` ``[K, N]`` (one floating dtype, one device), with the
    same bits for any ``torch.set_num_threads``: on the CPU the product is cut into pieces by the
    shapes alone, each one single-threaded BLAS call (csrc/torch/experts.cpp, ``reproducible_mm_out``); a plain
    ``torch.mm`` with MKL sums long reductions in a thread-count dependent order. Differentiable in
    both (the backward uses the same op). Returns ``[M, N]``."""
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"matmul: {name} must be a torch.Tensor, got {type(value).__name__}")
    return torch.ops.softmoe.matmul(a, b)


# ==== Expert compute: grouped matmul over expert-contiguous segments ============================


@torch.library.register_fake("softmoe::grouped_mm")
def _grouped_mm_fake(x, w, offsets):
    _check_same_device("grouped_mm", x, w, offsets)
    torch._check(x.dim() == 2 and w.dim() == 3, lambda: "softmoe: grouped_mm: x must be 2-D and w 3-D")
    return x.new_empty((x.shape[0], w.shape[2]))


@torch.library.register_fake("softmoe::grouped_mm_weight_grad")
def _grouped_mm_weight_grad_fake(x, grad_y, offsets, experts):
    _check_same_device("grouped_mm_weight_grad", x, grad_y, offsets)
    return x.new_empty((experts, x.shape[1], grad_y.shape[1]))


def _grouped_mm_setup_context(ctx, inputs, output):
    x, w, offsets = inputs
    ctx.save_for_backward(x, w, offsets)


def _grouped_mm_backward(ctx, grad_y):
    x, w, offsets = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.softmoe.grouped_mm(grad_y, w.transpose(1, 2), offsets)
    if ctx.needs_input_grad[1]:
        grad_w = torch.ops.softmoe.grouped_mm_weight_grad(x, grad_y, offsets, w.shape[0])
    return grad_x, grad_w, None


torch.library.register_autograd("softmoe::grouped_mm", _grouped_mm_backward, setup_context=_grouped_mm_setup_context)


def _grouped_mm_weight_grad_setup_context(ctx, inputs, output):
    x, grad_y, offsets, experts = inputs
    ctx.save_for_backward(x, grad_y, offsets)


def _grouped_mm_weight_grad_backward(ctx, grad_grad_w):
    # grad_w[e] = x[seg_e]^T grad_y[seg_e], bilinear: its derivatives are grouped matmuls.
    x, grad_y, offsets = ctx.saved_tensors
    grad_grad_w = grad_grad_w.contiguous()
    d_x = d_grad_y = None
    if ctx.needs_input_grad[0]:
        d_x = torch.ops.softmoe.grouped_mm(grad_y.contiguous(), grad_grad_w.transpose(1, 2), offsets)
    if ctx.needs_input_grad[1]:
        d_grad_y = torch.ops.softmoe.grouped_mm(x, grad_grad_w, offsets)
    return d_x, d_grad_y, None, None


torch.library.register_autograd(
    "softmoe::grouped_mm_weight_grad", _grouped_mm_weight_grad_backward,
    setup_context=_grouped_mm_weight_grad_setup_context,
)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Per-expert matmul over expert-contiguous row segments.

    Args:
        x: ``[P, K]`` rows; rows ``offsets[e]:offsets[e + 1]`` belong to expert ``e``, rows from
            ``offsets[E]`` on are padding.
        w: ``[E, K, N]`` one weight matrix per expert (same dtype as x).
        offsets: ``[E + 1]`` int64 segment bounds (``DispatchPlan.offsets``).

    Returns:
        ``[P, N]``: ``x[seg_e] @ w[e]`` per segment, zeros on padding rows. Differentiable in x and w.
    """
    # The dispatcher would reject a list with its own schema message and turn None into an undefined
    # tensor that the kernel reports as "shape [0]".
    for name, value in (("x", x), ("w", w), ("offsets", offsets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"grouped_mm: {name} must be a torch.Tensor, got {type(value).__name__}")
    return torch.ops.softmoe.grouped_mm(x, w, offsets)


# ==== Fused expert FFN: matmul, activation, matmul over expert-contiguous segments ===============


@torch.library.register_fake("softmoe::expert_ffn")
def _expert_ffn_fake(x, w_in, w_out, offsets, activation, keep_hidden):
    _check_same_device("expert_ffn", x, w_in, w_out, offsets)
    torch._check(x.dim() == 2 and w_in.dim() == 3 and w_out.dim() == 3,
                 lambda: "softmoe: expert_ffn: x must be 2-D and w_in, w_out 3-D")
    y = x.new_empty((x.shape[0], w_out.shape[2]))
    hidden = x.new_empty((x.shape[0] if keep_hidden else 0, w_in.shape[2]))
    return y, hidden


@torch.library.register_fake("softmoe::expert_ffn_backward")
def _expert_ffn_backward_fake(grad_y, x, hidden, w_in, w_out, offsets, activation, output_mask):
    _check_same_device("expert_ffn_backward", grad_y, x, hidden, w_in, w_out, offsets)
    grad_x = x.new_empty((x.shape[0] if output_mask[0] else 0, x.shape[1]))
    grad_w_in = w_in.new_empty(w_in.shape) if output_mask[1] else x.new_empty((0,))
    grad_w_out = w_out.new_empty(w_out.shape) if output_mask[2] else x.new_empty((0,))
    return grad_x, grad_w_in, grad_w_out


def _expert_ffn_setup_context(ctx, inputs, output):
    x, w_in, w_out, offsets, activation, keep_hidden = inputs
    hidden = output[1]
    ctx.mark_non_differentiable(hidden)
    # hidden gets no gradient: without this autograd would hand the backward a zero-filled [P, W]
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, hidden, w_in, w_out, offsets)
    ctx.activation = activation
    ctx.keep_hidden = keep_hidden


def _expert_ffn_backward(ctx, grad_y, _grad_hidden):
    if not ctx.keep_hidden:
        raise RuntimeError(
            "softmoe: expert_ffn was called with keep_hidden=False, so it saved nothing to differentiate; "
            "call it with keep_hidden=True (softmoe.expert_ffn does when gradients are needed)"
        )
    if grad_y is None:  # y did not reach the loss (grads are not materialised, see setup)
        return None, None, None, None, None, None
    x, hidden, w_in, w_out, offsets = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[i]) for i in range(3)]
    grad_x, grad_w_in, grad_w_out = torch.ops.softmoe.expert_ffn_backward(
        grad_y, x, hidden, w_in, w_out, offsets, ctx.activation, mask
    )
    return (grad_x if mask[0] else None, grad_w_in if mask[1] else None, grad_w_out if mask[2] else None,
            None, None, None)


torch.library.register_autograd("softmoe::expert_ffn", _expert_ffn_backward, setup_context=_expert_ffn_setup_context)
torch.library.register_autograd(
    "softmoe::expert_ffn_backward", _differentiable_once("expert_ffn", "expert_ffn_backward")
)


def expert_ffn(
    x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, offsets: torch.Tensor, activation: str = "swiglu"
) -> torch.Tensor:
    """The expert FFN over expert-contiguous row segments, fused:
    ``grouped_mm(act(grouped_mm(x, w_in, offsets)), w_out, offsets)`` with the activation (and its
    gradient) computed chunk by chunk in reused buffers, so that no ``[P, d_hidden]`` temporary is
    allocated beyond the pre-activation kept for the backward.

    Args:
        x: ``[P, d_model]`` rows; rows ``offsets[e]:offsets[e + 1]`` belong to expert ``e``, rows
            from ``offsets[E]`` on are padding.
        w_in: ``[E, d_model, 2 * d_hidden]`` (``"swiglu"``: gate columns, then up) or
            ``[E, d_model, d_hidden]`` (``"gelu"``).
        w_out: ``[E, d_hidden, d_out]``.
        offsets: ``[E + 1]`` int64 segment bounds (``DispatchPlan.offsets``).
        activation: ``"swiglu"`` (``silu(gate) * up``) or ``"gelu"`` (exact, erf form).

    Returns:
        ``[P, d_out]``, zeros on padding rows. Differentiable in x, w_in and w_out.
    """
    for name, value in (("x", x), ("w_in", w_in), ("w_out", w_out), ("offsets", offsets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"expert_ffn: {name} must be a torch.Tensor, got {type(value).__name__}")
    if activation not in ("swiglu", "gelu"):
        raise ValueError(f"expert_ffn: activation must be 'swiglu' or 'gelu', got {activation!r}")
    # The pre-activation is only worth keeping (P x width) when a backward can follow.
    keep_hidden = torch.is_grad_enabled() and (x.requires_grad or w_in.requires_grad or w_out.requires_grad)
    return torch.ops.softmoe.expert_ffn(x, w_in, w_out, offsets, activation, keep_hidden)[0]
