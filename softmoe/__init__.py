"""softmoe: differentiable Mixture-of-Experts routing with LapSum truncated soft top-k.

>>> import torch, softmoe
>>> p = softmoe.soft_topk(torch.randn(4, 8), k=2.0, alpha=0.5, eps=1e-2)
>>> p.sum(-1)  # each row sums to k
"""
from . import baselines, ops  # noqa: F401  (ops loads the compiled library: torch.ops.softmoe.*)
from . import parallel  # noqa: F401  (expert / data parallelism over torch.distributed)
from .budget import GlobalBudget
from .experts import GroupedExperts
from .layer import SoftMoELayer
from .ops import DispatchPlan, combine_rows, dispatch_plan, expert_ffn, gather_rows, grouped_mm, soft_topk

__all__ = [
    "DispatchPlan",
    "GlobalBudget",
    "GroupedExperts",
    "SoftMoELayer",
    "baselines",
    "combine_rows",
    "dispatch_plan",
    "expert_ffn",
    "gather_rows",
    "grouped_mm",
    "parallel",
    "soft_topk",
]
__version__ = "0.1.0"
