"""Registration glue for the compiled ops: fake (meta) kernels and autograd.

The schemas and the CPU/CUDA kernels live in csrc/bindings.cpp; importing this module loads them.
"""
import torch

try:
    from . import _C  # noqa: F401  (runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "softmoe's compiled extension is missing; build it with "
        "`pip install --no-build-isolation -e .` after installing torch"
    ) from exc


def _lead_shape(scores: torch.Tensor) -> torch.Size:
    return scores.shape[:-1]


@torch.library.register_fake("softmoe::soft_topk")
def _soft_topk_fake(scores, k, alpha, eps, max_active):
    torch._check(scores.dim() >= 1, lambda: "softmoe: scores must have at least one dimension")
    p = torch.empty_like(scores, memory_format=torch.contiguous_format)
    threshold = scores.new_empty(_lead_shape(scores), dtype=torch.float64)
    return p, threshold


@torch.library.register_fake("softmoe::soft_topk_backward")
def _soft_topk_backward_fake(grad_p, scores, p, threshold, k, alpha, eps, max_active):
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
