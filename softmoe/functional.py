"""User-facing functions with torch-style signatures."""
import math
from typing import Optional, Union

import torch

from . import _checks

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
            +inf score, or a tensor k/alpha out of range for that slice). This needs a device sync,
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
        _raise_on_bad_rows(fn, moved, p, k_tensor, alpha_tensor)
    return p.movedim(-1, dim)


def _raise_on_bad_rows(
    fn: str, scores: torch.Tensor, p: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor
) -> None:
    bad = torch.isnan(p).any(-1)
    if not bool(bad.any()):
        return
    row = tuple(int(i) for i in torch.nonzero(bad)[0])
    r = scores[row].double()
    kv = float(k.reshape(-1)[0] if k.numel() == 1 else k[row])
    av = float(alpha.reshape(-1)[0] if alpha.numel() == 1 else alpha[row])
    if torch.isnan(r).any():
        reason = "its scores contain NaN"
    elif torch.isposinf(r).any():
        reason = "its scores contain +inf"
    elif not (av > 0.0 and math.isfinite(av)):
        reason = f"alpha = {av} is not a finite number > 0"
    else:
        reason = f"k = {kv} is outside [0, number of candidates]"
    raise ValueError(f"{fn}: row {row} of scores produced NaN because {reason} (strict=True)")
