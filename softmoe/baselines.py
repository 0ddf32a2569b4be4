"""Baselines on the same experts code as SoftMoELayer, for fair comparisons.

- ``TopKMoE``: Switch / Mixtral routing (softmax, hard top-k, renormalise) with the
  load-balancing loss and the router z-loss.
- ``SlotSoftMoE``: the slot-based Soft MoE of Puigcerver et al. (2023). It mixes tokens of a
  sequence, so it is NOT causal.
"""
import math
import warnings

import torch
from torch import nn

from . import _checks, ops
from .experts import Activation, GroupedExperts


def _check_config(fn: str, activation: object, dtype: object, **sizes: int) -> None:
    for name, value in sizes.items():
        _checks.check_int(fn, name, value)
    _checks.check_activation(fn, activation)
    _checks.check_module_dtype(fn, dtype)


class TopKMoE(nn.Module):
    """Hard top-k MoE FFN (Switch for ``top_k=1``, Mixtral for ``top_k=2``).

    ``normalize`` (default: ``top_k > 1``) renormalises the top-k probabilities to sum to 1.

    ``forward(x[..., d_model]) -> [..., d_model]``. After each forward, ``aux_loss`` holds
    ``lb_coef * load_balancing_loss + z_coef * router_z_loss`` (add it to the task loss) and
    ``last_losses`` both terms separately. The load-balancing loss is
    ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of routed (token, expert) pairs that go to
    expert e and ``P_e`` its mean router probability (1 when perfectly balanced); the z-loss is
    ``mean(logsumexp(logits)^2)``.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        top_k: int = 2,
        activation: Activation = "swiglu",
        normalize: bool | None = None,
        lb_coef: float = 1e-2,
        z_coef: float = 1e-3,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fn = "TopKMoE"
        _check_config(fn, activation, dtype, d_model=d_model, d_hidden=d_hidden, num_experts=num_experts, top_k=top_k)
        if top_k > num_experts:
            raise ValueError(f"{fn}: top_k must be <= num_experts (= {num_experts}), got {top_k}")
        if normalize is not None and not isinstance(normalize, bool):
            raise TypeError(f"{fn}: normalize must be a bool or None, got {type(normalize).__name__}")
        lb_coef = _checks.check_coef(fn, "lb_coef", lb_coef)
        z_coef = _checks.check_coef(fn, "z_coef", z_coef)
        self.d_model = d_model
        self.num_experts = num_experts
        self.top_k = top_k
        # Renormalising a single weight makes it exactly 1, which would leave the top-1 router
        # without a task-loss gradient: Switch (top_k = 1) keeps the softmax probability.
        self.normalize = top_k > 1 if normalize is None else normalize
        self.lb_coef = lb_coef
        self.z_coef = z_coef
        factory = {"device": device, "dtype": dtype}
        self.router = nn.Linear(d_model, num_experts, bias=False, **factory)
        self.experts = GroupedExperts(num_experts, d_model, d_hidden, activation, **factory)
        self.aux_loss = torch.zeros(())
        self.last_losses: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.check_layer_input("TopKMoE", x, self.d_model, self.router.weight)
        shape = x.shape
        tokens = x.reshape(-1, self.d_model)
        logits = self.router(tokens).to(torch.float64 if tokens.dtype == torch.float64 else torch.float32)
        probs = torch.softmax(logits, dim=-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            top_w = top_w / top_w.sum(-1, keepdim=True)
        p = torch.zeros_like(probs).scatter(-1, top_i, top_w)
        plan = ops.dispatch_plan(p, self.top_k)
        ys = self.experts(ops.gather_rows(tokens, plan), plan.offsets)
        y = ops.combine_rows(ys, p, plan)

        routed = torch.zeros_like(probs).scatter(-1, top_i, 1.0)
        # Means over max(T, 1) tokens: an empty batch gives 0 losses (not 0 / 0 = NaN) that are still
        # connected to the router, so backward and DDP see the same graph as for any other batch.
        count = max(tokens.shape[0], 1)
        fraction = routed.sum(0) / (count * self.top_k)
        load_balancing = self.num_experts * (fraction * (probs.sum(0) / count)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().sum() / count
        self.last_losses = {"load_balancing": load_balancing, "router_z": z_loss}
        self.aux_loss = self.lb_coef * load_balancing + self.z_coef * z_loss
        return y.reshape(shape)


class SlotSoftMoE(nn.Module):
    """Slot-based Soft MoE (Puigcerver et al., 2023, "From Sparse to Soft Mixtures of Experts").

    Each expert has ``slots_per_expert`` slots. Every slot is a softmax-weighted average of all
    tokens of the sequence (dispatch, softmax over tokens); the experts run on the slots; every
    token reads a softmax-weighted average of all slot outputs (combine, softmax over slots).

    Not causal: a slot averages over the whole sequence, so a token's output depends on later
    tokens. Do not use it for autoregressive decoding; ``causal=True`` warns.

    ``forward(x[batch, seq, d_model]) -> [batch, seq, d_model]``.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        slots_per_expert: int = 1,
        activation: Activation = "swiglu",
        causal: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_config(
            "SlotSoftMoE", activation, dtype,
            d_model=d_model, d_hidden=d_hidden, num_experts=num_experts, slots_per_expert=slots_per_expert,
        )
        _checks.check_bool("SlotSoftMoE", "causal", causal)
        if causal:
            warnings.warn(
                "SlotSoftMoE mixes all tokens of a sequence into every slot, so it is not causal; "
                "outputs at position t depend on later tokens",
                stacklevel=2,
            )
        self.d_model = d_model
        self.num_experts = num_experts
        self.slots_per_expert = slots_per_expert
        factory = {"device": device, "dtype": dtype}
        self.slot_embed = nn.Parameter(torch.randn(d_model, num_experts * slots_per_expert, **factory) / math.sqrt(d_model))
        self.experts = GroupedExperts(num_experts, d_model, d_hidden, activation, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.check_layer_input("SlotSoftMoE", x, self.d_model, self.slot_embed, batched=True)
        batch, _, _ = x.shape
        slots = self.num_experts * self.slots_per_expert
        logits = x @ self.slot_embed  # [B, N, slots]
        dispatch = torch.softmax(logits, dim=1)
        combine = torch.softmax(logits, dim=2)
        slot_in = torch.einsum("bns,bnd->bsd", dispatch, x)  # [B, slots, d]
        # expert-contiguous rows: expert e owns its slots of every sequence in the batch
        rows = slot_in.reshape(batch, self.num_experts, self.slots_per_expert, self.d_model)
        rows = rows.transpose(0, 1).reshape(-1, self.d_model)
        per_expert = batch * self.slots_per_expert
        offsets = torch.arange(self.num_experts + 1, device=x.device, dtype=torch.int64) * per_expert
        slot_out = self.experts(rows, offsets)
        slot_out = slot_out.reshape(self.num_experts, batch, self.slots_per_expert, self.d_model)
        slot_out = slot_out.transpose(0, 1).reshape(batch, slots, self.d_model)
        return torch.einsum("bns,bsd->bnd", combine, slot_out)
