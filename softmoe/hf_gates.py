"""Gates of pretrained MoE routers in SoftMoE terms: which scores the soft top-k ranks, and how the
router's gate scores weight the chosen experts (the ``"gate"`` combine of a converted block).

A transformers MoE router computes logits ``l = x W^T`` (plus a bias for gpt-oss) and then, per
family, chooses the top-k experts of a *selection score* and weights them by *gate scores*:

==========================  =====================================  ==========================================
family (examples)           choice                                 weights of the chosen experts
==========================  =====================================  ==========================================
Mixtral, Qwen3-MoE, OLMoE   top-k of ``softmax(l)``                ``softmax(l)``, renormalised if the router does
gpt-oss, Granite-MoE        top-k of ``l``                         ``softmax`` over the chosen logits
DeepSeek-V3, GLM-4-MoE      top-k of ``sigmoid(l) + b`` within     ``sigmoid(l)``, renormalised, times a
                            the best groups of experts             routed scaling factor
Llama 4                     top-k of ``l``                         ``sigmoid(l)``, multiplying the expert *input*
PhiMoE                      top-2 of ``l`` (sparse mixer)          a softmax over the experts near each chosen one
==========================  =====================================  ==========================================

:class:`Gate` describes one such router. A converted block ranks :meth:`Gate.selection` with the
soft top-k (``p = soft_topk(selection(l), k, alpha)``) and weights expert ``i`` by
:meth:`Gate.weights`: ``p_i g_i``, renormalised over the active experts when the router
renormalises, times the scaling factor. Where ``p`` is the hard top-k indicator (an integer
``k`` equal to the router's top-k and ``alpha`` much smaller than the gaps between the scores)
this is exactly the router's own gate; away from it gradients reach the router through ``g`` and
``p``, and ``k`` and ``alpha`` through ``p``.

Plain torch, no transformers import: :mod:`softmoe.hf` reads these from a model.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from ._keep_float32 import apply_keeping_float32

Score = Literal["softmax", "sigmoid"]
ChooseBy = Literal["logits", "scores"]
GroupScore = Literal["top2", "max"]

__all__ = ["Gate", "SparseMixerGate"]


class Gate(nn.Module):
    """A pretrained router's choice and gate, for a SoftMoE block that keeps them (see the module doc).

    Args:
        num_experts: E.
        score: gate scores ``g``: ``"softmax"`` over the E logits or elementwise ``"sigmoid"``.
        normalize: renormalise ``p * g`` over the experts (the router divides its top-k gate
            scores by their sum).
        scale: the routed scaling factor the weights are multiplied by.
        choose_by: what the top-k ranks: ``"logits"`` (the same order as softmax or sigmoid
            scores; ``alpha`` is then in units of the logits) or ``"scores"`` (``g``, used when a
            selection bias is added to the probabilities; ``alpha`` in units of ``g``).
        bias: ``[E]`` selection bias added to what ``choose_by`` names (DeepSeek-V3's
            ``e_score_correction_bias``), or None. Kept as a buffer: it steers the choice only.
        groups: ``(n_group, topk_group)``: only experts of the ``topk_group`` best of ``n_group``
            equal groups can be chosen (group-limited routing), or None.
        group_score: how a group is scored: ``"top2"`` (sum of its two best selection scores,
            DeepSeek-V3) or ``"max"`` (its best, DeepSeek-V2).
        group_fill: the selection score of experts outside the chosen groups: ``-inf`` (never
            chosen) or a number (A.X-K2 fills 0, so such an expert can still beat a negative score).
        denominator_eps: added to the renormalisation's denominator, as the router does (1e-20).
        denominator_min: the denominator is clamped to at least this (ERNIE-4.5's ``moe_norm_min``).
        softcap: ``c > 0``: the logits are soft-capped to ``c * tanh(l / c)`` first (Laguna).
        on_input: the gate scores multiply each expert's input instead of its output (Llama 4);
            :meth:`weights` is then ``p`` times the scale.
    """

    def __init__(
        self,
        num_experts: int,
        score: Score = "softmax",
        normalize: bool = True,
        scale: float = 1.0,
        choose_by: ChooseBy = "logits",
        bias: torch.Tensor | None = None,
        groups: tuple[int, int] | None = None,
        group_score: GroupScore = "top2",
        group_fill: float = float("-inf"),
        denominator_eps: float = 0.0,
        denominator_min: float = 0.0,
        softcap: float | None = None,
        on_input: bool = False,
    ) -> None:
        super().__init__()
        fn = type(self).__name__
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"{fn}: score must be 'softmax' or 'sigmoid', got {score!r}")
        if choose_by not in ("logits", "scores"):
            raise ValueError(f"{fn}: choose_by must be 'logits' or 'scores', got {choose_by!r}")
        if group_score not in ("top2", "max"):
            raise ValueError(f"{fn}: group_score must be 'top2' or 'max', got {group_score!r}")
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"{fn}: scale must be a finite number > 0, got {scale!r}")
        if softcap is not None and not softcap > 0:
            raise ValueError(f"{fn}: softcap must be None or > 0, got {softcap!r}")
        if groups is not None:
            n_group, topk_group = groups
            if n_group < 1 or num_experts % n_group or not 1 <= topk_group <= n_group:
                raise ValueError(f"{fn}: groups (n_group, topk_group) must split the {num_experts} experts into equal "
                                 f"groups with 1 <= topk_group <= n_group, got {groups}")
            if group_score == "top2" and num_experts // n_group < 2:
                raise ValueError(f"{fn}: group_score 'top2' needs at least 2 experts per group, got {groups}")
        self.num_experts = num_experts
        self.score = score
        self.normalize = bool(normalize)
        self.scale = float(scale)
        self.choose_by = choose_by
        self.groups = None if groups is None or groups[0] == 1 else (int(groups[0]), int(groups[1]))
        self.group_score = group_score
        self.group_fill = float(group_fill)
        self.denominator_eps = float(denominator_eps)
        self.denominator_min = float(denominator_min)
        self.softcap = None if softcap is None else float(softcap)
        self.on_input = bool(on_input)
        if bias is None:
            self.register_buffer("bias", None)
        else:
            if bias.shape != (num_experts,):
                raise ValueError(f"{fn}: bias must have shape [{num_experts}], got {list(bias.shape)}")
            self.register_buffer("bias", bias.detach().to(torch.float32).clone())

    @property
    def eligible(self) -> int:
        """How many experts a token can choose from (those of its ``topk_group`` groups)."""
        if self.groups is None or math.isfinite(self.group_fill):
            return self.num_experts
        n_group, topk_group = self.groups
        return topk_group * (self.num_experts // n_group)

    def _apply(self, fn, recurse=True):
        # The selection bias decides ties between experts: keep it float32 under a 16-bit cast.
        apply_keeping_float32(self, ("bias",), lambda: super(Gate, self)._apply(fn, recurse))
        return self

    def logits(self, raw: torch.Tensor) -> torch.Tensor:
        """The router logits the gate works on (float32/64 ``[T, E]``): soft-capped if the router does."""
        if self.softcap is None:
            return raw
        return torch.tanh(raw / self.softcap) * self.softcap

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """Gate scores ``g`` ``[T, E]``."""
        return torch.softmax(logits, dim=-1) if self.score == "softmax" else torch.sigmoid(logits)

    def selection(self, logits: torch.Tensor) -> torch.Tensor:
        """What the soft top-k ranks ``[T, E]``: ``-inf`` for experts outside the chosen groups."""
        s = logits if self.choose_by == "logits" else self.scores(logits)
        if self.bias is not None:
            s = s + self.bias.to(s.dtype)
        if self.groups is None:
            return s
        n_group, topk_group = self.groups
        with torch.no_grad():  # the group choice is hard, as in the router
            grouped = s.detach().view(-1, n_group, self.num_experts // n_group)
            if self.group_score == "top2":
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            else:
                group_scores = grouped.amax(-1)
            chosen = group_scores.topk(topk_group, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen, True)
            keep = keep.repeat_interleave(self.num_experts // n_group, dim=1)
        return s.masked_fill(~keep, self.group_fill)

    def weights(self, logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Combine weights ``[T, E]`` from the logits and the soft top-k ``p`` (zero where p is)."""
        if self.on_input:
            return p * self.scale if self.scale != 1.0 else p
        w = p * self.scores(logits)
        if self.normalize:
            denominator = w.sum(-1, keepdim=True)
            if self.denominator_eps:
                denominator = denominator + self.denominator_eps
            if self.denominator_min:
                denominator = denominator.clamp_min(self.denominator_min)
            w = w / denominator
        return w * self.scale if self.scale != 1.0 else w

    def extra_repr(self) -> str:
        parts = [f"score={self.score!r}", f"normalize={self.normalize}", f"choose_by={self.choose_by!r}"]
        if self.scale != 1.0:
            parts.append(f"scale={self.scale}")
        if self.bias is not None:
            parts.append("selection_bias=True")
        if self.groups is not None:
            parts.append(f"groups={self.groups}, group_score={self.group_score!r}")
        if self.softcap is not None:
            parts.append(f"softcap={self.softcap}")
        if self.on_input:
            parts.append("on_input=True")
        return ", ".join(parts)


class SparseMixerGate(Gate):
    """PhiMoE's sparse mixer (evaluation form), extended to any number of active experts.

    PhiMoE picks the best expert, weights it by the softmax over the experts whose logits are
    within a relative ``2 * jitter_eps`` of its logit, then repeats without it for the second.
    Here the expert at rank ``r`` of a token gets ``g = exp(l_r) / sum_{j in C_r} exp(l_j)`` over
    ``C_r = {j of rank >= r : (l_r - l_j) / max(|l_j|, l_r) <= 2 jitter_eps}``, and weight
    ``p_r * g_r`` (not renormalised, as in PhiMoE); for the top-2 this is PhiMoE's multiplier.
    The memberships are hard (no gradient), the softmax is differentiable. Cost ``O(E^2)`` per
    token. (PhiMoE samples its choice in training; a converted block routes by the soft top-k.)
    """

    def __init__(self, num_experts: int, jitter_eps: float) -> None:
        super().__init__(num_experts, score="softmax", normalize=False)
        if not (math.isfinite(jitter_eps) and jitter_eps >= 0):
            raise ValueError(f"SparseMixerGate: jitter_eps must be a finite number >= 0, got {jitter_eps!r}")
        self.jitter_eps = float(jitter_eps)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        order = torch.sort(logits.detach(), dim=-1, descending=True, stable=True).indices
        ranked = logits.gather(-1, order)  # [T, E], best first
        with torch.no_grad():
            top = ranked.detach().unsqueeze(-1)  # l_r            [T, E, 1]
            other = ranked.detach().unsqueeze(-2)  # l_j          [T, 1, E]
            factor = torch.maximum(other.abs(), top)
            # written as PhiMoE's mask ("> 2 eps" is out), so that a 0 / 0 keeps the expert as it does
            near = ~((top - other) / factor > 2 * self.jitter_eps)
            later = torch.ones(ranked.shape[-1], ranked.shape[-1], dtype=torch.bool, device=ranked.device).triu()
            members = near & later  # j in C_r
        masked = ranked.unsqueeze(-2).masked_fill(~members, float("-inf"))
        g_ranked = torch.exp(ranked - torch.logsumexp(masked, dim=-1))
        return torch.empty_like(g_ranked).scatter(-1, order, g_ranked)

    def extra_repr(self) -> str:
        return f"sparse mixer, jitter_eps={self.jitter_eps}"
