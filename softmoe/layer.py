"""SoftMoELayer: a drop-in FFN whose experts are chosen per token by truncated LapSum soft top-k."""
import math
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from . import _checks, ops
from ._keep_float32 import apply_keeping_float32
from .experts import Activation, GroupedExperts
from .ops import soft_topk

if TYPE_CHECKING:  # pragma: no cover
    from .parallel import ExpertGroup, ExpertShard

Combine = Literal["normalized", "sum", "gate", "scaled"]

# Router logits start with this standard deviation, in units of alpha, for unit-variance inputs.
# Measured (E = 8 / 64, k = 2, eps = 1e-2): at 1 the truncated routing is dense (all 8 / 52 of 64
# experts active); at 4 it is 5.2 / 11.5 active before the max_active cap, and the router still
# spreads weight (mean largest weight 0.93 / 0.83 of 1) so every chosen expert gets gradient.
ROUTER_INIT_STD = 4.0
# With active=... the truncation is the steering's job, not the initial spread's: the router starts
# with soft gates (logit standard deviation 0.6, about nn.Linear's default), which the quality
# benchmark found much better than 4 for steered layers (docs/compute_budget.md).
ACTIVE_ROUTER_INIT_STD = 0.6

# The soft count a layer starts from when neither k nor active is given.
DEFAULT_K = 2.0
# Count steering (``active=``): every training forward moves log(k / target) by COUNT_GAIN per expert
# of error between the target and the measured mean count; k stays within [K_RATIO_MIN, 1] x target
# (k above the target would force more experts than wanted: a token has at least ceil(k)).
COUNT_GAIN = 0.05
K_RATIO_START = 0.5
K_RATIO_MIN = 1e-5  # k far below eps makes the band ~ (k / eps) alpha wide: near-ties still split
# Switch-style load balancing (E * sum_e f_e P_e), the same term TopKMoE uses: without it a layer whose
# tokens mostly use one expert collapses onto a few experts.
LB_COEF = 0.01
# Router z-loss (mean of logsumexp(logits)^2), TopKMoE's default weight; on by default with active=...
# where it keeps the scores near the temperature's scale.
ACTIVE_Z_COEF = 1e-3


class Router(nn.Linear):
    """The router's linear map (no bias): ``[..., d_model] -> [..., num_experts]`` logits through
    :func:`softmoe.ops.matmul`, whose bits do not depend on the thread count (its weight gradient sums
    over every token, and torch's own matmul sums that in a thread-count dependent order). An
    ``nn.Linear`` otherwise: same parameter, same state_dict key."""

    def __init__(self, d_model: int, num_experts: int, **factory) -> None:
        super().__init__(d_model, num_experts, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.matmul(x.reshape(-1, self.in_features), self.weight.t()).reshape(*x.shape[:-1], self.out_features)


class SoftMoELayer(nn.Module):
    """Mixture-of-experts FFN with differentiable, per-token truncated soft top-k routing.

    Per token, ``p = soft_topk(router(x), k, alpha, eps, max_active)`` gives expert weights in
    [0, 1] that sum to ``k`` with exact zeros outside at most ``max_active`` experts; only active
    (token, expert) pairs are computed: ``y = sum_{i: p_i > 0} w_i * Expert_i(x)`` with
    ``w = p / k`` (``combine="normalized"``, total weight 1), ``w = p`` (``"sum"``, total k) or
    ``w_i = p_i g_i / sum_j p_j g_j`` with ``g = softmax(logits)`` (``"gate"``: the router's own
    gate scores modulated by the soft top-k, total weight 1; as alpha -> 0 with an integer k this is
    the softmax renormalised over the top-k, the gate of Mixtral-style routers).
    Routing uses no other token, so the layer is causal.

    Args:
        d_model: input and output width.
        d_hidden: hidden width of each expert.
        num_experts: E >= 1.
        k: initial soft number of experts per token, in ``(k_min, k_max)`` (default 2.0). Give ``k``
            or ``active``, not both.
        active: instead of a soft count, the realised mean number of active experts per token the
            layer is steered to (``1 <= active < max_active``): k becomes state (the buffer
            ``log_k_ratio``, ``k = exp(log_k_ratio) * active``) that every training forward moves by
            ``count_gain`` times the difference between ``active`` and the measured count, so the
            experts actually computed follow ``active`` (a :class:`GlobalBudget` with
            ``mean_active`` sets each layer's target). ``active=1`` routes each token to exactly one
            expert (max_active 1).
        alpha: LapSum temperature (> 0).
        eps: truncation level in ``(0, 0.5)``; smaller keeps more experts active.
        max_active: cap on active experts per token; default ``min(E, ceil(k) + 2)``.
        activation: ``"swiglu"`` or ``"gelu"`` experts.
        combine: ``"normalized"``, ``"sum"``, ``"gate"`` or ``"scaled"`` (see :meth:`combine_weights`);
            default ``"normalized"``, ``"scaled"`` with ``active``.
        learn_k: make k a trained parameter (else a fixed buffer).
        learn_alpha: make alpha a trained parameter (kept positive: stored as log alpha). The
            operator depends on logits / alpha only, so with a trained router this is rarely needed.
        k_min, k_max: the range k is kept in by construction; defaults 1 (at least one expert's
            worth of weight; ``min(1, k / 2)`` for a smaller k) and ``max_active - 1`` (room below
            the cap; halfway between k and max_active if that is larger).
        lb_coef: weight of the load-balancing loss ``E * sum_e f_e P_e`` in :attr:`aux_loss` (``f_e``
            the share of routed (token, expert) pairs of expert e, ``P_e`` its mean router
            probability); add ``aux_loss`` to the training loss (0 turns it off).
        z_coef: weight of the router z-loss ``mean(logsumexp(logits)^2)`` in :attr:`aux_loss`
            (default 0, 1e-3 with ``active``).
        count_gain: the step of the count steering (``active`` mode only).
        router_init_std: the router logits' initial standard deviation in units of alpha for
            unit-variance inputs (default 4: the truncation is sparse from the first step; 0.6 with
            ``active``, whose steering makes it sparse).
        expert_group: expert parallelism (``softmoe/parallel.py``, docs/distributed.md): a
            ``torch.distributed`` ProcessGroup, a 1-D DeviceMesh or ``(DeviceMesh, dim_name)`` of W
            ranks; this rank keeps experts ``[rank * E / W, (rank + 1) * E / W)`` (E divisible by W)
            and the forward exchanges the routed rows with the other ranks (every rank of the group
            must build and run the same layers in the same order). None: all experts are local.

    Shapes: ``forward(x[..., d_model]) -> [..., d_model]``. After each forward ``aux_loss`` holds the
    weighted load-balancing loss (a 0-d tensor) and ``last_stats`` the routing statistics.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        k: float | None = None,
        alpha: float = 1.0,
        eps: float = 1e-2,
        max_active: int | None = None,
        activation: Activation = "swiglu",
        combine: Combine | None = None,
        learn_k: bool = True,
        learn_alpha: bool = False,
        k_min: float | None = None,
        k_max: float | None = None,
        *,
        active: float | None = None,
        lb_coef: float = LB_COEF,
        z_coef: float | None = None,
        count_gain: float = COUNT_GAIN,
        router_init_std: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        expert_group: "ExpertGroup | None" = None,
    ) -> None:
        super().__init__()
        fn = "SoftMoELayer"
        for name, value in (("d_model", d_model), ("d_hidden", d_hidden), ("num_experts", num_experts)):
            _checks.check_int(fn, name, value)
        if combine is None:
            combine = "normalized" if active is None else "scaled"
        if combine not in ("normalized", "sum", "gate", "scaled"):
            raise ValueError(f"{fn}: combine must be 'normalized', 'sum', 'gate' or 'scaled', got {combine!r}")
        _checks.check_activation(fn, activation)
        _checks.check_module_dtype(fn, dtype)
        _checks.check_bool(fn, "learn_k", learn_k)
        _checks.check_bool(fn, "learn_alpha", learn_alpha)
        alpha = _checks.check_number(fn, "alpha", alpha)
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"{fn}: alpha must be a finite number > 0, got {alpha}")
        eps = _checks.check_eps(fn, eps)
        if eps == 0:
            raise ValueError(f"{fn}: eps must be > 0 so that routing has exact zeros (got 0)")
        lb_coef = _checks.check_coef(fn, "lb_coef", lb_coef)
        z_coef = _checks.check_coef(fn, "z_coef", (0.0 if active is None else ACTIVE_Z_COEF) if z_coef is None else z_coef)
        if router_init_std is None:
            router_init_std = ROUTER_INIT_STD if active is None else ACTIVE_ROUTER_INIT_STD
        router_init_std = _checks.check_coef(fn, "router_init_std", router_init_std)
        count_gain = _checks.check_coef(fn, "count_gain", count_gain)
        self.k_given = k is not None
        if active is not None:
            if k is not None or k_min is not None or k_max is not None:
                raise ValueError(f"{fn}: give k (with k_min / k_max) or active, not both: with active the "
                                 "layer steers its own k")
            active = _checks.check_number(fn, "active", active)
            if not math.isfinite(active):
                raise ValueError(f"{fn}: active must satisfy 1 <= active < max_active, got {active}")
            if max_active is None:
                max_active = 1 if active == 1 else min(num_experts, math.ceil(active) + 2)
            max_active = _checks.check_max_active(fn, max_active, num_experts, None)
            if not (1 <= active < max_active or active == max_active == 1):
                raise ValueError(f"{fn}: active must satisfy 1 <= active < max_active (= {max_active}), or "
                                 f"active = max_active = 1, got {active}")
            k = active * K_RATIO_START
        else:
            k = DEFAULT_K if k is None else _checks.check_number(fn, "k", k)
            if not 0 < k < num_experts:
                raise ValueError(f"{fn}: k must satisfy 0 < k < num_experts (= {num_experts}), got {k}")
            if max_active is None:
                max_active = min(num_experts, math.ceil(k) + 2)
            max_active = _checks.check_max_active(fn, max_active, num_experts, k)
            k_min = min(1.0, k / 2) if k_min is None else _checks.check_number(fn, "k_min", k_min)
            if k_max is None:
                k_max = max(max_active - 1.0, (k + max_active) / 2)
            k_max = _checks.check_number(fn, "k_max", k_max)
            if not 0 < k_min < k < k_max < max_active:
                raise ValueError(
                    f"{fn}: need 0 < k_min < k < k_max < max_active, got k_min={k_min}, k={k}, "
                    f"k_max={k_max}, max_active={max_active}"
                )

        self.d_model = d_model
        self.num_experts = num_experts
        self.eps = eps
        self.max_active = max_active
        self.combine = combine
        self.k_min = k_min  # None with active: k is steered, not kept in a range
        self.k_max = k_max
        self.active = active
        self.lb_coef = lb_coef
        self.z_coef = z_coef
        self.count_gain = count_gain
        self._k_start = k  # what a GlobalBudget checks the layer was built with (no silent override)
        factory = {"device": device, "dtype": dtype}
        self.router = Router(d_model, num_experts, **factory)
        nn.init.normal_(self.router.weight, std=router_init_std * alpha / math.sqrt(d_model))
        # Either module runs forward(xs, offsets) over all E experts; the sharded one exchanges rows with
        # the ranks that own them. parallel.py (torch.distributed) is imported only for that case.
        self.expert_shard: "ExpertShard | None" = None
        if expert_group is None:
            self.experts = GroupedExperts(num_experts, d_model, d_hidden, activation, **factory)
        else:
            from .parallel import shard_experts

            self.experts = shard_experts(self, expert_group, d_hidden=d_hidden, activation=activation, k=k,
                                         alpha=alpha, learn_k=learn_k, learn_alpha=learn_alpha, **factory)
            self.expert_shard = self.experts.shard
        log_alpha = torch.tensor(math.log(alpha), dtype=torch.float32, device=device)
        if learn_alpha:
            self.log_alpha = nn.Parameter(log_alpha)
        else:
            self.register_buffer("log_alpha", log_alpha)
        if active is None:
            # k = k_min + (k_max - k_min) * sigmoid(k_logit) stays strictly inside (k_min, k_max).
            frac = (k - k_min) / (k_max - k_min)
            k_logit = torch.tensor(math.log(frac / (1 - frac)), dtype=torch.float32, device=device)
            if learn_k:
                self.k_logit = nn.Parameter(k_logit)
            else:
                self.register_buffer("k_logit", k_logit)
        else:
            self.register_buffer("log_k_ratio", torch.tensor(math.log(K_RATIO_START), dtype=torch.float32, device=device))
        self.last_stats: dict[str, torch.Tensor] = {}
        self.aux_loss = torch.zeros((), device=device)
        self._budget: "nn.Module | None" = None  # set by attach_budget
        self._budget_index = 0

    @property
    def budget(self) -> "nn.Module | None":
        """The :class:`GlobalBudget` that sets this layer's share (None when the layer has none)."""
        return self._budget

    @property
    def budget_index(self) -> int:
        """This layer's index in its budget's ``layers``."""
        return self._budget_index

    def attach_budget(self, budget: nn.Module, index: int) -> None:
        """Called by :class:`GlobalBudget` when it takes this layer as its ``layers[index]``: from then
        on the budget sets the layer's k (soft count) or its active target, and the layer's own
        ``k_logit`` becomes a frozen buffer (a parameter that never gets a gradient would still be
        decayed by the optimizer and trip DDP's unused-parameter check)."""
        if self._budget is not None:
            raise ValueError("SoftMoELayer.attach_budget: the layer is already attached to a GlobalBudget")
        if self.active is None and isinstance(self.k_logit, nn.Parameter):
            k_logit = self.k_logit.detach().clone()
            del self.k_logit
            self.register_buffer("k_logit", k_logit)
        # Plain attributes: nn.Module would register the budget as a submodule of every layer (its
        # theta then L times in state_dict); the model that holds the layers holds the budget.
        object.__setattr__(self, "_budget", budget)
        self._budget_index = index

    @property
    def target_active(self) -> torch.Tensor | None:
        """``active`` mode: the mean active experts per token the layer is steered to (its budget share,
        differentiable w.r.t. the budget's ``theta``, or its fixed ``active``); None otherwise."""
        if self.active is None:
            return None
        if self._budget is not None:
            return self._budget.allocation()[self._budget_index]
        return torch.tensor(self.active, dtype=torch.float32, device=self.log_k_ratio.device)

    def soft_count(self, target: torch.Tensor | None = None) -> torch.Tensor:
        """The soft number of experts per token k (a 0-d float32 tensor). ``target``: the
        :attr:`target_active` already computed for this forward (active mode)."""
        if self.active is not None:
            if target is None:
                target = self.target_active
            return torch.exp(self.log_k_ratio) * target
        if self._budget is not None:
            return self._budget.allocation()[self._budget_index]
        return self.k_min + (self.k_max - self.k_min) * torch.sigmoid(self.k_logit)

    @property
    def k(self) -> torch.Tensor:
        """The current soft number of experts per token (a 0-d float32 tensor): the layer's share of
        its GlobalBudget when it has one, steered by the count in ``active`` mode."""
        return self.soft_count()

    @property
    def alpha(self) -> torch.Tensor:
        """The LapSum temperature (a 0-d float32 tensor)."""
        return torch.exp(self.log_alpha)

    def route(self, x: torch.Tensor, k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits ``[T, E]`` (float32) and routing weights ``p`` ``[T, E]`` for ``x`` ``[T, d_model]``;
        ``k``: the soft count of this forward (default :attr:`k`)."""
        logits = self.router(x).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        p = soft_topk(logits, self.k if k is None else k, self.alpha, eps=self.eps, max_active=self.max_active)
        return logits, p

    def combine_weights(self, logits: torch.Tensor, p: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        """Combine weights ``[T, E]`` of the experts from router ``logits`` and routing weights ``p``
        (both ``[T, E]``; only entries where ``p > 0`` are used); ``k``: the soft count p was
        computed with (default :attr:`k`).

        ``"gate"`` multiplies p by the router's gate scores ``softmax(logits)`` and renormalises:
        gradients reach the router through both factors and k / alpha through p, and where p is the
        hard top-k indicator it is exactly the softmax renormalised over the top-k. ``"scaled"``
        multiplies ``p / k`` by the gate scores without renormalising (total weight <= 1): a token
        with one active expert (``p = k`` there) gets the router's probability as its weight, as in
        Switch routing, so the router learns from it; ``"normalized"`` gives such a token weight 1
        and the router nothing.
        """
        if self.combine == "normalized":
            return p / (self.k if k is None else k)
        if self.combine == "sum":
            return p
        if self.combine == "scaled":
            return p / (self.k if k is None else k) * torch.softmax(logits, dim=-1)
        gated = p * torch.softmax(logits, dim=-1)
        return gated / gated.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.check_layer_input("SoftMoELayer", x, self.d_model, self.router.weight)
        shape = x.shape
        tokens = x.reshape(-1, self.d_model)
        # The soft count once per forward (under a budget it is a soft top-k over the layers' logits).
        target = self.target_active
        k = self.soft_count(target)
        logits, p = self.route(tokens, k)
        weights = self.combine_weights(logits, p, k)
        plan = ops.dispatch_plan(p, self.max_active)
        capturing = p.is_cuda and torch.cuda.is_current_stream_capturing()
        if not torch.compiler.is_compiling() and p.device.type != "meta" and not capturing:
            # Eager code can afford to read the routed count (once per forward): the expert buffers
            # then hold N rows instead of T * max_active (padding rows cost memory, though no FLOPs).
            # Meta tensors have no count to read, and a CUDA graph being captured cannot wait for
            # one; they keep the fixed shapes, as compiled code does.
            plan = plan.trim()
        xs = ops.gather_rows(tokens, plan)
        ys = self.experts(xs, plan.offsets)
        # Without autograd nothing else holds the expert input: dropping it here keeps it out of
        # combine_rows' peak (inference peak memory would otherwise be ~1.3x TopKMoE's).
        del xs
        y = ops.combine_rows(ys, weights, plan)
        active = p > 0
        self.aux_loss = self._auxiliary_loss(logits, active)
        if target is not None and self.training:
            self._steer_count(target, active)
        self._record_stats(logits, active, k, target)
        return y.reshape(shape)

    def _auxiliary_loss(self, logits: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """``lb_coef * E * sum_e f_e P_e + z_coef * mean(logsumexp(logits)^2)``: f the share of routed
        (token, expert) pairs per expert (no gradient), P the mean router probability per expert
        (the first term is lb_coef when balanced); the second is TopKMoE's router z-loss."""
        loss = logits.new_zeros(())
        if self.lb_coef:
            # f over every rank's tokens when the experts are sharded (each rank routes its own rows):
            # the ranks' averaged gradients are then those of the whole batch's loss
            routed = self._sum_over_shards(active.sum(0).to(logits.dtype))
            if logits.shape[0]:
                share = routed / routed.sum().clamp_min(1)
                probs = torch.softmax(logits, dim=-1).mean(0)
                loss = loss + self.lb_coef * self.num_experts * (share * probs).sum()
        if self.z_coef and logits.shape[0]:
            loss = loss + self.z_coef * torch.logsumexp(logits, dim=-1).square().mean()
        return loss

    def _sum_over_shards(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks of the expert group (a sharded layer: every rank routes its own
        tokens), without gradient; ``t`` itself otherwise. Every rank calls it, whatever its tokens."""
        if self.expert_shard is None:
            return t
        import torch.distributed as dist

        total = t.detach().clone()
        dist.all_reduce(total, group=self.expert_shard.group)
        return total

    @torch.no_grad()
    def _steer_count(self, target: torch.Tensor, active: torch.Tensor) -> None:
        """One step of the count controller: log(k / target) += count_gain * (target - measured count),
        kept in [log K_RATIO_MIN, 0]. In-place on a buffer and without a host sync, so it runs under
        torch.compile; under DDP the buffer is broadcast from rank 0 at each forward."""
        tokens = torch.full((), active.shape[0], dtype=torch.float32, device=active.device)
        counts = self._sum_over_shards(torch.stack([active.sum().to(torch.float32), tokens]))
        measured = counts[0] / counts[1].clamp_min(1)  # every rank's tokens when the experts are sharded
        step = torch.where(counts[1] > 0, self.count_gain * (target.detach() - measured), 0.0)
        self.log_k_ratio.add_(step).clamp_(math.log(K_RATIO_MIN), 0.0)

    # k, alpha and the steering state are a handful of scalars that decide routing: they stay float32
    # unless the layer goes to float64 (softmoe/_keep_float32.py).
    _FLOAT32_STATE = ("k_logit", "log_k_ratio", "log_alpha")

    def _apply(self, fn, recurse=True):
        apply_keeping_float32(self, self._FLOAT32_STATE, lambda: super(SoftMoELayer, self)._apply(fn, recurse))
        return self

    def get_extra_state(self) -> dict:
        """The routing configuration, saved in ``state_dict`` and checked on load: loading k_logit
        into a layer with another k range would silently change k. ``k_min`` / ``k_max`` are None in
        ``active`` mode and ``active`` is None otherwise."""
        state = {"k_min": self.k_min, "k_max": self.k_max, "active": self.active, "max_active": self.max_active,
                 "eps": self.eps, "num_experts": self.num_experts, "combine": self.combine}
        if self.expert_shard is not None:
            # (first expert, count): a shard must not load into another rank's layer or a full one
            state["expert_shard"] = (self.expert_shard.first, self.expert_shard.count)
        return state

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        diff = {key: (state.get(key), value) for key, value in mine.items() if state.get(key) != value}
        if diff:
            detail = ", ".join(f"{key}: saved {saved!r} vs this layer {here!r}" for key, (saved, here) in diff.items())
            raise ValueError(f"SoftMoELayer.load_state_dict: the saved routing configuration differs ({detail})")

    def __getstate__(self) -> dict:
        # aux_loss holds the last forward's graph, which is not part of the module: copy.deepcopy and
        # pickling (torch.save of the module) would fail on it, so a copy starts with a zero.
        state = self.__dict__.copy()
        state["aux_loss"] = torch.zeros((), device=self.aux_loss.device)
        return state

    @torch.inference_mode()
    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """Forward without autograd bookkeeping; the same routing as training."""
        return self.forward(x)

    @torch.no_grad()
    def _record_stats(self, logits: torch.Tensor, active: torch.Tensor, k: torch.Tensor, target: torch.Tensor | None) -> None:
        probs = torch.softmax(logits, dim=-1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        self.last_stats = {
            "soft_count": k.detach(),
            "active_per_token": active.sum(-1).float().mean() if active.shape[0] else logits.new_zeros(()),
            "tokens_per_expert": active.sum(0),
            "router_entropy": entropy.mean() if active.shape[0] else logits.new_zeros(()),
        }
        if target is not None:
            self.last_stats["target_active"] = target.detach()

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, max_active={self.max_active}, eps={self.eps}, "
            f"combine={self.combine!r}, "
            + (f"k_range=({self.k_min}, {self.k_max})" if self.active is None else f"active={self.active}")
        )
