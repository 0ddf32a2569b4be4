"""The one rule for routing state under a 16-bit cast: a few float32 tensors (k, alpha, the budget
logits, a router's selection bias) steer which experts every token uses, so ``module.to(bfloat16)``
keeps them float32 (bfloat16 would round k = 2.3 to 2.297 and train it at that resolution).
Casts to float64, devices and other dtypes apply as usual."""
from typing import Callable

import torch
from torch import nn


def apply_keeping_float32(module: nn.Module, names: tuple[str, ...], apply: Callable[[], object]) -> None:
    """Runs ``apply()`` (the caller's ``super()._apply(fn, recurse)``) and gives the float32 tensors
    ``names`` of ``module`` back their float32 values where it made them 16-bit. Names that
    ``module`` does not have, or that are None, are skipped."""
    kept = {}
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
            kept[name] = value.detach().clone()
    apply()
    for name, old in kept.items():
        new = getattr(module, name)
        if new.dtype in (torch.bfloat16, torch.float16):
            new.data = old.to(device=new.device)
