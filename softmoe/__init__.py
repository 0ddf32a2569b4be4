"""softmoe: differentiable Mixture-of-Experts routing with LapSum truncated soft top-k.

>>> import torch, softmoe
>>> p = softmoe.soft_topk(torch.randn(4, 8), k=2.0, alpha=0.5, eps=1e-2)
>>> p.sum(-1)  # each row sums to k
"""
from . import ops  # noqa: F401  (loads the compiled library and registers torch.ops.softmoe.*)
from .functional import soft_topk

__all__ = ["soft_topk"]
__version__ = "0.1.0"
