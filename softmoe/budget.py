"""GlobalBudget: one expert budget shared by several SoftMoE layers, allocated by gradient."""
from typing import Sequence

import torch
from torch import nn

from ._keep_float32 import apply_keeping_float32
from .layer import SoftMoELayer
from .ops import soft_topk


class GlobalBudget(nn.Module):
    """Shares one budget of experts among ``L`` SoftMoE layers; the split is learned by gradient.

    The budget is stated in one of two units:

    - ``mean_active`` (the compute a user pays for): the realised mean number of active experts per
      token, averaged over the layers. Layer l is steered to ``a_l`` active experts per token (the
      layers must be built with ``active=``, which makes each layer adjust its soft count k until
      the experts it actually computes match its target), with ``sum_l a_l = L * mean_active``.
    - ``mean_k``: the mean *soft count* (sum of routing weights per token) ``k_l``; a token then
      activates at least ``ceil(k_l)`` experts plus those in the truncation band, so the realised
      count is larger than ``k_l`` and not set by the budget. Layers built with ``k=`` (or neither).

    Either way the shares are ``lo + (hi - lo) * q_l`` with ``q = soft_topk(theta, target,
    alpha=1)`` over the layers' logits ``theta`` and ``sum_l q_l = target = L * (mean - lo) / (hi -
    lo)``; so at every step the shares sum to ``L * mean`` exactly (to float rounding) and stay in
    ``(lo, hi)``: ``lo = active_min`` (default 1: a layer can go down to one expert per token) and
    ``hi`` = the smallest layer ``max_active - 0.25`` for ``mean_active``; ``lo = k_min``, ``hi`` =
    the smallest layer ``k_max`` for ``mean_k``. The allocation moves with the gradient of the loss
    through each layer's k (``k_l`` itself, or ``k_l = r_l a_l`` with the layer's steering ratio
    ``r_l``), which moves budget to the layers where more experts help most.

    The budget owns ``theta`` (float32 whatever the default dtype, kept float32 under 16-bit
    casts). Make the budget an attribute of your model (``model.budget = GlobalBudget(...)``) so
    that ``model.parameters()`` and ``state_dict`` hold it; the layers are referenced, not owned
    (``budget.layers``; each layer's ``layer.budget`` / ``layer.budget_index`` point back). While
    attached, a layer's ``k_logit`` is a frozen buffer. A layer built with an explicit ``k`` /
    ``active`` must have been given the budget's mean (every layer starts there), so that the
    budget never silently overrides a value a user chose.

    Args:
        layers: the SoftMoE layers, in model order.
        mean_k: the mean soft count per layer, ``k_min < mean_k < k_max``.
        k_min: floor of every ``k_l`` (default 1.0: at least one expert's worth of weight).
        mean_active: the mean realised active experts per token and layer,
            ``active_min < mean_active < hi``. Give ``mean_k`` or ``mean_active``.
        active_min: floor of every layer's target (default 1.0, one expert per token).
    """

    def __init__(
        self,
        layers: Sequence[SoftMoELayer],
        mean_k: float | None = None,
        k_min: float = 1.0,
        *,
        mean_active: float | None = None,
        active_min: float = 1.0,
    ) -> None:
        super().__init__()
        fn = "GlobalBudget"
        # A lone layer or None would otherwise fail inside list() with Python's "not iterable".
        if isinstance(layers, SoftMoELayer):
            raise TypeError(f"{fn}: layers must be a list of SoftMoELayer, got a single SoftMoELayer (pass [layer])")
        if isinstance(layers, (str, bytes, torch.Tensor)) or not hasattr(layers, "__iter__"):
            raise TypeError(f"{fn}: layers must be a list of SoftMoELayer, got {type(layers).__name__}")
        layers = list(layers)
        if not layers:
            raise ValueError(f"{fn}: layers must hold at least one SoftMoELayer")
        if (mean_k is None) == (mean_active is None):
            raise ValueError(f"{fn}: give exactly one of mean_k (soft count) and mean_active (realised active "
                             "experts per token)")
        unit = "mean_active" if mean_active is not None else "mean_k"
        mean = mean_active if mean_active is not None else mean_k
        floor_name = "active_min" if unit == "mean_active" else "k_min"
        floor = active_min if unit == "mean_active" else k_min
        for name, value in ((unit, mean), (floor_name, floor)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{fn}: {name} must be a float, got {type(value).__name__}")
        for i, layer in enumerate(layers):
            if not isinstance(layer, SoftMoELayer):
                raise TypeError(f"{fn}: layers[{i}] must be a SoftMoELayer, got {type(layer).__name__}")
            if layer.budget is not None:
                raise ValueError(f"{fn}: layers[{i}] is already attached to a GlobalBudget")
            if unit == "mean_active" and layer.active is None:
                raise ValueError(f"{fn}: layers[{i}] was built with a soft count k; a budget in mean_active "
                                 f"needs layers built with active=... (active={float(mean)})")
            if unit == "mean_k" and layer.active is not None:
                raise ValueError(f"{fn}: layers[{i}] was built with active={layer.active}; a budget in mean_k "
                                 f"needs layers built with k=... (or neither)")
        if unit == "mean_active":
            lo, hi = float(floor), min(layer.max_active for layer in layers) - 0.25
            if not 1.0 <= lo < hi:
                raise ValueError(f"{fn}: active_min must satisfy 1 <= active_min < the smallest layer max_active "
                                 f"- 0.25 (= {hi}), got {lo}")
        else:
            lo, hi = float(floor), min(layer.k_max for layer in layers)
            if not 0 < lo < hi:
                raise ValueError(f"{fn}: k_min must satisfy 0 < k_min < k_max (= {hi}), got {lo}")
        if not lo < mean < hi:
            ceiling = ("max_active - 0.25 (= {hi}, the smallest layer's)" if unit == "mean_active"
                       else "k_max (= {hi}, the smallest layer cap max_active - 1)").format(hi=hi)
            raise ValueError(f"{fn}: {unit} must satisfy {floor_name} (= {lo}) < {unit} < {ceiling}, got {mean}")
        for i, layer in enumerate(layers):
            chosen = layer.active if unit == "mean_active" else (layer._k_start if layer.k_given else None)
            if chosen is not None and chosen != mean:
                name = "active" if unit == "mean_active" else "k"
                raise ValueError(f"{fn}: layers[{i}] was built with {name}={chosen}, but every layer starts at "
                                 f"{unit}={float(mean)} and the budget then sets it: build the layers with "
                                 f"{name}={float(mean)}" + (" or without k" if unit == "mean_k" else ""))
        self.unit = unit
        self.mean = float(mean)
        self.low = lo
        self.high = hi
        self.num_layers = len(layers)
        self._layers = layers  # a plain list: referenced, not registered as submodules
        # Uniform start: equal logits give every layer the mean.
        self.theta = nn.Parameter(torch.zeros(self.num_layers, dtype=torch.float32, device=layers[0].router.weight.device))
        for index, layer in enumerate(layers):
            layer.attach_budget(self, index)

    @property
    def mean_k(self) -> float | None:
        """The mean soft count per layer (None for a budget in ``mean_active``)."""
        return self.mean if self.unit == "mean_k" else None

    @property
    def mean_active(self) -> float | None:
        """The mean realised active experts per token and layer (None for a budget in ``mean_k``)."""
        return self.mean if self.unit == "mean_active" else None

    def _apply(self, fn, recurse=True):
        apply_keeping_float32(self, ("theta",), lambda: super(GlobalBudget, self)._apply(fn, recurse))
        return self

    @property
    def layers(self) -> list[SoftMoELayer]:
        return list(self._layers)

    def allocation(self) -> torch.Tensor:
        """The per-layer shares ``[L]`` (float32, differentiable w.r.t. ``theta``): soft counts
        ``k_l`` for ``mean_k``, active-expert targets ``a_l`` for ``mean_active``."""
        target = self.num_layers * (self.mean - self.low) / (self.high - self.low)
        share = soft_topk(self.theta, target, alpha=1.0)
        return self.low + (self.high - self.low) * share

    def realised_active(self) -> torch.Tensor:
        """Mean number of active experts per token of each layer at its last forward ``[L]``."""
        values = [layer.last_stats.get("active_per_token") for layer in self._layers]
        return torch.stack([v.float().cpu() if v is not None else torch.tensor(float("nan")) for v in values])

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, {self.unit}={self.mean}, range=({self.low}, {self.high})"
