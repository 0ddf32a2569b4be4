"""SoftMoELayer: a drop-in FFN whose experts are chosen per token by truncated LapSum soft top-k."""
import math
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from . import _checks, ops
from .experts import Activation, GroupedExperts
from .ops import soft_topk

if TYPE_CHECKING:  # pragma: no cover
    from .parallel import ExpertGroup, ExpertShard

Combine = Literal["normalized", "sum", "gate"]

# Router logits start with this standard deviation, in units of alpha, for unit-variance inputs.
# Measured (E = 8 / 64, k = 2, eps = 1e-2): at 1 the truncated routing is dense (all 8 / 52 of 64
# experts active); at 4 it is 5.2 / 11.5 active before the max_active cap, and the router still
# spreads weight (mean largest weight 0.93 / 0.83 of 1) so every chosen expert gets gradient.
ROUTER_INIT_STD = 4.0


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
        k: initial soft number of experts per token, in ``(k_min, k_max)``.
        alpha: LapSum temperature (> 0).
        eps: truncation level in ``(0, 0.5)``; smaller keeps more experts active.
        max_active: cap on active experts per token; default ``min(E, ceil(k) + 2)``.
        activation: ``"swiglu"`` or ``"gelu"`` experts.
        combine: ``"normalized"``, ``"sum"`` or ``"gate"`` (see :meth:`combine_weights`).
        learn_k: make k a trained parameter (else a fixed buffer).
        learn_alpha: make alpha a trained parameter (kept positive: stored as log alpha). The
            operator depends on logits / alpha only, so with a trained router this is rarely needed.
        k_min, k_max: the range k is kept in by construction; defaults 1 (at least one expert's
            worth of weight; ``min(1, k / 2)`` for a smaller k) and ``max_active - 1`` (room below
            the cap; halfway between k and max_active if that is larger).
        expert_group: expert parallelism (``softmoe/parallel.py``, docs/distributed.md): a
            ``torch.distributed`` ProcessGroup, a 1-D DeviceMesh or ``(DeviceMesh, dim_name)`` of W
            ranks; this rank keeps experts ``[rank * E / W, (rank + 1) * E / W)`` (E divisible by W)
            and the forward exchanges the routed rows with the other ranks (every rank of the group
            must build and run the same layers in the same order). None: all experts are local.

    Shapes: ``forward(x[..., d_model]) -> [..., d_model]``.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        k: float = 2.0,
        alpha: float = 1.0,
        eps: float = 1e-2,
        max_active: int | None = None,
        activation: Activation = "swiglu",
        combine: Combine = "normalized",
        learn_k: bool = True,
        learn_alpha: bool = False,
        k_min: float | None = None,
        k_max: float | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        expert_group: "ExpertGroup | None" = None,
    ) -> None:
        super().__init__()
        fn = "SoftMoELayer"
        for name, value in (("d_model", d_model), ("d_hidden", d_hidden), ("num_experts", num_experts)):
            _checks.check_int(fn, name, value)
        if combine not in ("normalized", "sum", "gate"):
            raise ValueError(f"{fn}: combine must be 'normalized', 'sum' or 'gate', got {combine!r}")
        _checks.check_activation(fn, activation)
        _checks.check_module_dtype(fn, dtype)
        _checks.check_bool(fn, "learn_k", learn_k)
        _checks.check_bool(fn, "learn_alpha", learn_alpha)
        k = _checks.check_number(fn, "k", k)
        alpha = _checks.check_number(fn, "alpha", alpha)
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"{fn}: alpha must be a finite number > 0, got {alpha}")
        eps = _checks.check_eps(fn, eps)
        if eps == 0:
            raise ValueError(f"{fn}: eps must be > 0 so that routing has exact zeros (got 0)")
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
        self.k_min = k_min
        self.k_max = k_max
        factory = {"device": device, "dtype": dtype}
        self.router = Router(d_model, num_experts, **factory)
        nn.init.normal_(self.router.weight, std=ROUTER_INIT_STD * alpha / math.sqrt(d_model))
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
        # k = k_min + (k_max - k_min) * sigmoid(k_logit) stays strictly inside (k_min, k_max).
        frac = (k - k_min) / (k_max - k_min)
        k_logit = torch.tensor(math.log(frac / (1 - frac)), dtype=torch.float32, device=device)
        if learn_k:
            self.k_logit = nn.Parameter(k_logit)
        else:
            self.register_buffer("k_logit", k_logit)
        self.last_stats: dict[str, torch.Tensor] = {}
        self._budget = None  # set by GlobalBudget
        self._budget_index = 0

    @property
    def k(self) -> torch.Tensor:
        """The current soft number of experts per token (a 0-d float32 tensor); the layer's share
        of its GlobalBudget when it has one."""
        if self._budget is not None:
            return self._budget.allocation()[self._budget_index]
        return self.k_min + (self.k_max - self.k_min) * torch.sigmoid(self.k_logit)

    @property
    def alpha(self) -> torch.Tensor:
        """The LapSum temperature (a 0-d float32 tensor)."""
        return torch.exp(self.log_alpha)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits ``[T, E]`` (float32) and routing weights ``p`` ``[T, E]`` for ``x`` ``[T, d_model]``."""
        logits = self.router(x).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        p = soft_topk(logits, self.k, self.alpha, eps=self.eps, max_active=self.max_active)
        return logits, p

    def combine_weights(self, logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Combine weights ``[T, E]`` of the experts from router ``logits`` and routing weights ``p``
        (both ``[T, E]``; only entries where ``p > 0`` are used).

        ``"gate"`` multiplies p by the router's gate scores ``softmax(logits)`` and renormalises:
        gradients reach the router through both factors and k / alpha through p, and where p is the
        hard top-k indicator it is exactly the softmax renormalised over the top-k.
        """
        if self.combine == "normalized":
            return p / self.k
        if self.combine == "sum":
            return p
        gated = p * torch.softmax(logits, dim=-1)
        return gated / gated.sum(-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.check_layer_input("SoftMoELayer", x, self.d_model, self.router.weight)
        shape = x.shape
        tokens = x.reshape(-1, self.d_model)
        logits, p = self.route(tokens)
        weights = self.combine_weights(logits, p)
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
        self._record_stats(logits, p)
        return y.reshape(shape)

    # k and alpha are a handful of scalars that steer routing: casting the layer to a 16-bit dtype
    # would round them (k = 2.3 becomes 2.297 in bfloat16) and train them at that resolution, so they
    # stay float32 unless the layer goes to float64.
    _FLOAT32_STATE = ("k_logit", "log_alpha")

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name).detach().clone() for name in self._FLOAT32_STATE}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype in (torch.bfloat16, torch.float16) and old.dtype == torch.float32:
                new.data = old.data.to(device=new.device)
        return self

    def get_extra_state(self) -> dict:
        """The routing configuration, saved in ``state_dict`` and checked on load: loading k_logit
        into a layer with another k range would silently change k."""
        state = {"k_min": self.k_min, "k_max": self.k_max, "max_active": self.max_active, "eps": self.eps,
                 "num_experts": self.num_experts, "combine": self.combine}
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

    @torch.inference_mode()
    def inference(self, x: torch.Tensor) -> torch.Tensor:
        """Forward without autograd bookkeeping; the same routing as training."""
        return self.forward(x)

    @torch.no_grad()
    def _record_stats(self, logits: torch.Tensor, p: torch.Tensor) -> None:
        active = p > 0
        probs = torch.softmax(logits, dim=-1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)
        self.last_stats = {
            "soft_count": self.k.detach(),
            "active_per_token": active.sum(-1).float().mean() if p.shape[0] else p.new_zeros(()),
            "tokens_per_expert": active.sum(0),
            "router_entropy": entropy.mean() if p.shape[0] else p.new_zeros(()),
        }

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, max_active={self.max_active}, eps={self.eps}, "
            f"combine={self.combine!r}, k_range=({self.k_min}, {self.k_max})"
        )
