"""GlobalBudget: one expert budget shared by several SoftMoE layers, allocated by gradient."""
from typing import Sequence

import torch
from torch import nn

from .ops import soft_topk
from .layer import SoftMoELayer


class GlobalBudget(nn.Module):
    """Ties the soft expert counts ``k_l`` of ``L`` SoftMoE layers to a global budget.

    ``k_l = k_min + (k_max - k_min) * q_l`` where ``q = soft_topk(theta, target, alpha=1)`` is
    LapSum over the layers' logits ``theta`` with ``sum_l q_l = target = L * (mean_k - k_min) /
    (k_max - k_min)``. Hence, by construction and at every step,

    - ``sum_l k_l = L * mean_k`` exactly (to float rounding),
    - ``k_min < k_l < k_max`` for every layer (``q_l`` is in (0, 1)), so no layer collapses to
      zero experts or runs into its ``max_active`` cap,

    and the allocation moves with the gradient of the loss w.r.t. each ``k_l`` (the fixed-order
    reduction over tokens done by the soft top-k backward) through the LapSum Jacobian, which
    moves budget from layers where an extra expert helps less to layers where it helps more.
    ``k_max`` is the smallest ``k_max`` of the layers.

    The budget owns ``theta`` (a parameter: put the budget in your model, e.g. as an attribute of
    the module that holds the layers, so that optimizers and ``state_dict`` see it); the layers are
    referenced, not owned, so they are not duplicated in ``state_dict``. While attached, a layer's
    own ``k_logit`` is frozen and ``layer.k`` reads its share of the budget.

    Args:
        layers: the SoftMoE layers, in model order.
        mean_k: the mean soft number of experts per layer, ``k_min < mean_k < k_max``.
        k_min: floor of every ``k_l`` (default 1.0: at least one expert's worth of weight).
    """

    def __init__(self, layers: Sequence[SoftMoELayer], mean_k: float, k_min: float = 1.0) -> None:
        super().__init__()
        # A lone layer or None would otherwise fail inside list() with Python's "not iterable".
        if isinstance(layers, SoftMoELayer):
            raise TypeError("GlobalBudget: layers must be a list of SoftMoELayer, got a single SoftMoELayer (pass [layer])")
        if isinstance(layers, (str, bytes, torch.Tensor)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"GlobalBudget: layers must be a list of SoftMoELayer, got {type(layers).__name__}")
        layers = list(layers)
        if not layers:
            raise ValueError("GlobalBudget: layers must hold at least one SoftMoELayer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, SoftMoELayer):
                raise TypeError(f"GlobalBudget: layers[{i}] must be a SoftMoELayer, got {type(layer).__name__}")
            if getattr(layer, "_budget", None) is not None:
                raise ValueError(f"GlobalBudget: layers[{i}] is already attached to a GlobalBudget")
        if isinstance(mean_k, bool) or not isinstance(mean_k, (int, float)):
            raise TypeError(f"GlobalBudget: mean_k must be a float, got {type(mean_k).__name__}")
        if isinstance(k_min, bool) or not isinstance(k_min, (int, float)):
            raise TypeError(f"GlobalBudget: k_min must be a float, got {type(k_min).__name__}")
        k_max = min(layer.k_max for layer in layers)
        if not 0 < k_min < k_max:
            raise ValueError(f"GlobalBudget: k_min must satisfy 0 < k_min < k_max (= {k_max}), got {k_min}")
        if not k_min < mean_k < k_max:
            raise ValueError(
                f"GlobalBudget: mean_k must satisfy k_min (= {k_min}) < mean_k < k_max (= {k_max}, the "
                f"smallest layer cap max_active - 1), got {mean_k}"
            )
        self.num_layers = len(layers)
        self.mean_k = float(mean_k)
        self.k_min = float(k_min)
        self.k_max = float(k_max)
        self._layers = layers  # a plain list: referenced, not registered as submodules
        # Uniform start: equal logits give every layer mean_k.
        self.theta = nn.Parameter(torch.zeros(self.num_layers))
        for index, layer in enumerate(layers):
            layer.k_logit.requires_grad_(False)
            # plain attributes (not submodule registration): the model owns the budget once
            object.__setattr__(layer, "_budget", self)
            object.__setattr__(layer, "_budget_index", index)

    def _apply(self, fn, recurse=True):
        # theta steers the whole allocation: keep it float32 when the model is cast to 16 bits.
        kept = self.theta.detach().clone()
        super()._apply(fn, recurse)
        if self.theta.dtype in (torch.bfloat16, torch.float16) and kept.dtype == torch.float32:
            self.theta.data = kept.to(device=self.theta.device)
        return self

    @property
    def layers(self) -> list[SoftMoELayer]:
        return list(self._layers)

    def allocation(self) -> torch.Tensor:
        """The per-layer soft expert counts ``k_l`` ``[L]`` (differentiable w.r.t. ``theta``)."""
        target = self.num_layers * (self.mean_k - self.k_min) / (self.k_max - self.k_min)
        share = soft_topk(self.theta, target, alpha=1.0)
        return self.k_min + (self.k_max - self.k_min) * share

    def realised_active(self) -> torch.Tensor:
        """Mean number of active experts per token of each layer at its last forward ``[L]``."""
        values = [layer.last_stats.get("active_per_token") for layer in self._layers]
        return torch.stack([v if v is not None else torch.tensor(float("nan")) for v in values])

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, mean_k={self.mean_k}, k_range=({self.k_min}, {self.k_max})"
