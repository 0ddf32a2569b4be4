"""Hugging Face transformers integration: SoftMoE routing in existing causal LMs.

- :func:`convert` swaps the top-k routing of a transformers MoE model (Mixtral, Qwen2-MoE,
  Qwen3-MoE, OLMoE) for truncated LapSum routing with a learned per-layer expert count under one
  :class:`~softmoe.GlobalBudget`, keeping the model's pretrained experts, router and shared experts.
- :func:`upcycle` turns a dense model's MLPs (Llama, Qwen2, GPT-2) into SoftMoE layers whose
  experts start as copies of the MLP (sparse upcycling).
- :func:`from_pretrained` loads what ``model.save_pretrained(path)`` wrote for such a model.
- :func:`stats`, :func:`allocation`, :func:`budget`, :func:`layers` read the routing back.

Needs transformers 5.x (the fused 3-D expert weights and hook-recorded router logits), installed
with ``pip install 'softmoe[hf]'``; tested with transformers 5.23.0.

    >>> import softmoe.hf
    >>> model = softmoe.hf.convert(model, mean_k=2.0)   # e.g. a MixtralForCausalLM
    >>> model.save_pretrained("out")
    >>> model = softmoe.hf.from_pretrained("out")

Each converted block is a :class:`SoftMoEBlock` (a :class:`~softmoe.SoftMoELayer`) at the block's
place (``model.model.layers[i].mlp``); the budget is ``model.softmoe_budget`` (its ``theta`` is a
parameter of the model, so optimizers and ``state_dict`` see it); the routing configuration is
``model.config.softmoe`` and is saved with the model.

To support another architecture, add an adapter to :data:`MOE_ADAPTERS` (MoE models, keyed by
``config.model_type``) or :data:`DENSE_ADAPTERS` (dense models), e.g.
``softmoe.hf.DENSE_ADAPTERS["mistral"] = softmoe.hf.DenseAdapter("MistralMLP", "gated")``.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

try:
    import transformers
    from transformers import AutoConfig, PreTrainedModel
    from transformers.activations import ACT2FN
except ImportError as exc:  # pragma: no cover - exercised by a test that hides transformers
    raise ImportError(
        "softmoe.hf needs the Hugging Face transformers package, which is not installed: install "
        "the extra with `pip install 'softmoe[hf]'` (tested with transformers 5.23.0)"
    ) from exc

from . import _checks, ops
from .budget import GlobalBudget
from .experts import GroupedExperts
from .layer import SoftMoELayer

TESTED_TRANSFORMERS = "5.23.0"
_MAJOR = int(transformers.__version__.split(".")[0])
if _MAJOR < 5:  # pragma: no cover
    raise ImportError(
        f"softmoe.hf needs transformers >= 5 (the fused-experts MoE layout), found {transformers.__version__}: "
        f"install the extra with `pip install 'softmoe[hf]'` (tested with transformers {TESTED_TRANSFORMERS})"
    )

__all__ = [
    "DENSE_ADAPTERS",
    "DenseAdapter",
    "HFExperts",
    "MOE_ADAPTERS",
    "MoEAdapter",
    "SoftMoEBlock",
    "SoftMoEBudget",
    "allocation",
    "budget",
    "convert",
    "format_stats",
    "from_pretrained",
    "layers",
    "stats",
    "upcycle",
]

FORMAT = 1  # version of the config.softmoe record
_ROUTING_KEYS = ("alpha", "eps", "max_active", "combine", "k_min", "learn_k", "learn_alpha")
_COMBINES = ("normalized", "sum")


# ---- modules ------------------------------------------------------------------------------------


class _RawLogitRouter(nn.Module):
    """Router of a converted block: ``forward(x[N, H]) -> raw logits [N, E]`` (``x @ weight.T``).

    For a converted MoE model it is built as a subclass of the model's own router class (e.g.
    ``SoftMoEMixtralTopKRouter(MixtralTopKRouter)``), so transformers' ``output_router_logits``
    hooks, which find routers by class, record its output: the raw logits ``[batch * seq, E]``,
    in the model's dtype, one tensor per converted layer.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        nn.Module.__init__(self)  # not the model router's __init__, which wants a config
        self.num_experts, self.hidden_dim = weight.shape
        self.in_features, self.out_features = self.hidden_dim, self.num_experts
        self.weight = nn.Parameter(weight)
        self.bias = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # ops.matmul: the same bits for any thread count (see softmoe.layer.Router)
        flat = hidden_states.reshape(-1, self.hidden_dim)
        return ops.matmul(flat, self.weight.t()).reshape(*hidden_states.shape[:-1], self.num_experts)

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, returns=raw logits"


_ROUTER_CLASSES: dict[type, type] = {}


def _router_class(base: type) -> type:
    """A :class:`_RawLogitRouter` that is also an instance of ``base`` (cached, module-level so it pickles)."""
    if base is nn.Module or issubclass(base, _RawLogitRouter):
        return _RawLogitRouter
    cls = _ROUTER_CLASSES.get(base)
    if cls is None:
        name = f"SoftMoE{base.__name__}"
        cls = type(name, (_RawLogitRouter, base), {"__module__": __name__, "__qualname__": name})
        _ROUTER_CLASSES[base] = cls
        globals().setdefault(name, cls)
    return cls


class HFExperts(GroupedExperts):
    """:class:`~softmoe.GroupedExperts` with any transformers activation (``ACT2FN`` name) and optional biases.

    Gated (``gated=True``): ``y = (act(x W_gate + b_gate) * (x W_up + b_up)) W_down + b_down`` with
    ``w_in`` ``[E, d_model, 2 * d_hidden]`` (gate columns first); otherwise
    ``y = act(x W_in + b_in) W_down + b_down`` (e.g. GPT-2's ``gelu_new`` MLP). Biases are
    ``b_in`` ``[E, width]`` and ``b_out`` ``[E, d_model]`` (``None`` without bias).
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        act: str,
        gated: bool,
        bias: bool,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_experts, d_model, d_hidden, "swiglu" if gated else "gelu", device=device, dtype=dtype)
        if act not in ACT2FN:
            raise ValueError(f"HFExperts: act must be a transformers activation name (ACT2FN), got {act!r}")
        self.gated = gated
        self.act = act
        self.act_fn = ACT2FN[act]
        factory = {"device": device, "dtype": dtype}
        if bias:
            self.b_in = nn.Parameter(torch.zeros(num_experts, self.w_in.shape[-1], **factory))
            self.b_out = nn.Parameter(torch.zeros(num_experts, d_model, **factory))
        else:
            self.register_parameter("b_in", None)
            self.register_parameter("b_out", None)

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, up = h.split(self.d_hidden, dim=-1)
            return self.act_fn(gate) * up
        return self.act_fn(h)

    def forward(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.b_in is None:
            return super().forward(xs, offsets)
        # Expert of each row (E for padding rows, whose bias row is zero): no host sync.
        rows = torch.bucketize(torch.arange(xs.shape[0], device=xs.device), offsets[1:], right=True)
        b_in = F.pad(self.b_in, (0, 0, 0, 1))[rows]
        b_out = F.pad(self.b_out, (0, 0, 0, 1))[rows]
        h = ops.grouped_mm(xs, self.w_in, offsets) + b_in
        return ops.grouped_mm(self._activate(h), self.w_out, offsets) + b_out

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("td,edh->eth", x, self.w_in)
        if self.b_in is not None:
            h = h + self.b_in[:, None]
        y = torch.einsum("eth,ehd->etd", self._activate(h), self.w_out)
        return y + self.b_out[:, None] if self.b_out is not None else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act!r}, gated={self.gated}, bias={self.b_in is not None}"


class SoftMoEBlock(SoftMoELayer):
    """A transformers MoE block (or dense MLP) with SoftMoE routing; ``forward(h[B, S, H]) -> [B, S, H]``.

    A :class:`~softmoe.SoftMoELayer` plus what the replaced block did around its experts: the
    shared expert and its sigmoid gate (Qwen2-MoE: ``y = moe(x) + sigmoid(gate(x)) * shared(x)``),
    multiplicative router jitter in training (Mixtral's ``router_jitter_noise``) and output dropout
    (GPT-2's ``resid_pdrop``). ``experts`` and ``router_weight`` replace the layer's freshly
    initialised ones; ``router_class`` is the model's router class (see :class:`_RawLogitRouter`).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        *,
        experts: GroupedExperts | None = None,
        router_weight: torch.Tensor | None = None,
        router_class: type = nn.Module,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
        jitter_noise: float = 0.0,
        dropout: float = 0.0,
        **layer_kwargs,
    ) -> None:
        super().__init__(d_model, d_hidden, num_experts, **layer_kwargs)
        if experts is not None:
            self.experts = experts
        if router_weight is not None or router_class is not nn.Module:
            weight = router_weight if router_weight is not None else self.router.weight.detach()
            self.router = _router_class(router_class)(weight)
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.jitter_noise = float(jitter_noise)
        self.dropout = nn.Dropout(dropout) if dropout else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        y = super().forward(x)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        if self.dropout is not None:
            y = self.dropout(y)
        return y

    # safetensors (save_pretrained) stores tensors only, so the routing configuration that
    # SoftMoELayer checks on load travels as an int64 tensor (float64 bit patterns for the floats:
    # a dtype cast on load cannot change it).
    def get_extra_state(self) -> torch.Tensor:
        s = super().get_extra_state()
        floats = torch.tensor([s["k_min"], s["k_max"], s["eps"]], dtype=torch.float64, device="cpu")
        ints = torch.tensor([s["max_active"], s["num_experts"], _COMBINES.index(s["combine"])], dtype=torch.int64, device="cpu")
        return torch.cat([ints, floats.view(torch.int64)])

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor):
            state = state.detach().to("cpu", torch.int64)
            ints = state[:3].tolist()
            k_min, k_max, eps = state[3:6].view(torch.float64).tolist()
            state = {"k_min": k_min, "k_max": k_max, "eps": eps, "max_active": ints[0], "num_experts": ints[1],
                     "combine": _COMBINES[ints[2]]}
        mine = SoftMoELayer.get_extra_state(self)
        diff = {key: (state.get(key), value) for key, value in mine.items() if state.get(key) != value}
        if diff:
            detail = ", ".join(f"{key}: saved {saved!r} vs this layer {here!r}" for key, (saved, here) in diff.items())
            raise ValueError(f"SoftMoEBlock.load_state_dict: the saved routing configuration differs ({detail})")


class SoftMoEBudget(GlobalBudget):
    """:class:`~softmoe.GlobalBudget` whose ``theta`` stays float32 when the model is cast to a 16-bit
    dtype (like the layers' ``k_logit`` / ``log_alpha``): ``model.to(torch.bfloat16)`` would
    otherwise round the allocation logits."""

    def __init__(self, layers, mean_k: float, k_min: float = 1.0) -> None:
        super().__init__(layers, mean_k, k_min)
        # float32 whatever the default dtype (transformers builds a bfloat16 model under a bfloat16 default)
        self.theta = nn.Parameter(torch.zeros(self.num_layers, dtype=torch.float32, device=self.theta.device))

    def _apply(self, fn, recurse=True):
        old = self.theta.detach().clone()
        super()._apply(fn, recurse)
        if self.theta.dtype in (torch.bfloat16, torch.float16) and old.dtype == torch.float32:
            self.theta.data = old.to(device=self.theta.device)
        return self


# ---- adapters ------------------------------------------------------------------------------------


@dataclass
class _Weights:
    """What a SoftMoEBlock is built from (one replaced block)."""

    w_in: torch.Tensor  # [E, H, W] (gated: gate columns, then up)
    w_out: torch.Tensor  # [E, I, H]
    b_in: torch.Tensor | None
    b_out: torch.Tensor | None
    act: str
    gated: bool
    router_weight: torch.Tensor | None = None  # [E, H]
    router_class: type = nn.Module
    shared_expert: nn.Module | None = None
    shared_expert_gate: nn.Module | None = None
    jitter_noise: float = 0.0
    dropout: float = 0.0

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    @property
    def d_hidden(self) -> int:
        return self.w_out.shape[1]


def _find(model: nn.Module, class_name: str) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if type(m).__name__ == class_name and name]


@dataclass(frozen=True)
class MoEAdapter:
    """How :func:`convert` reads one MoE architecture's sparse blocks (transformers 5.x layout).

    The block (class name ``block``) holds a router ``router`` with ``weight`` ``[E, H]`` and fused
    experts ``experts`` with ``gate_up_proj`` ``[E, 2I, H]`` (gate rows first; ``[E, H, 2I]`` if the
    experts say ``is_transposed``; interleaved if not ``is_concatenated``), ``down_proj``
    ``[E, H, I]`` and optional ``*_bias``; the activation is ``config.<act>``. Optional: a shared
    expert added to the routed output, with a sigmoid gate; a config attribute of router jitter.
    """

    block: str
    router: str = "gate"
    experts: str = "experts"
    top_k: str = "num_experts_per_tok"
    act: str = "hidden_act"
    shared_expert: str | None = None
    shared_expert_gate: str | None = None
    jitter: str | None = None

    def find(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return _find(model, self.block)

    def read(self, block: nn.Module, config) -> _Weights:
        cls = type(block).__name__
        experts = getattr(block, self.experts)
        gate = getattr(block, self.router)
        try:
            from transformers.integrations.moe import _default_apply_gate
        except ImportError:  # pragma: no cover
            _default_apply_gate = None
        custom = getattr(type(experts), "_apply_gate", _default_apply_gate)
        if _default_apply_gate is not None and custom is not _default_apply_gate:
            raise NotImplementedError(f"softmoe.hf: {cls}'s experts use a custom gate activation ({type(experts).__name__}._apply_gate)")
        if getattr(gate, "bias", None) is not None:
            raise NotImplementedError(f"softmoe.hf: {cls}'s router has a bias, which SoftMoE routers do not")
        has_gate = getattr(experts, "has_gate", True)
        transposed = getattr(experts, "is_transposed", False)

        def layout(w: torch.Tensor) -> torch.Tensor:  # -> [E, in, out]
            return w if transposed else w.transpose(1, 2)

        w_in = layout(experts.gate_up_proj if has_gate else experts.up_proj)
        w_out = layout(experts.down_proj)
        b_in = getattr(experts, "gate_up_proj_bias" if has_gate else "up_proj_bias", None)
        b_out = getattr(experts, "down_proj_bias", None)
        if has_gate and not getattr(experts, "is_concatenated", True):  # interleaved gate/up columns
            w_in = torch.cat([w_in[..., 0::2], w_in[..., 1::2]], dim=-1)
            b_in = torch.cat([b_in[..., 0::2], b_in[..., 1::2]], dim=-1) if b_in is not None else None
        return _Weights(
            w_in=w_in, w_out=w_out, b_in=b_in, b_out=b_out, act=getattr(config, self.act), gated=has_gate,
            router_weight=gate.weight, router_class=type(gate),
            shared_expert=getattr(block, self.shared_expert) if self.shared_expert else None,
            shared_expert_gate=getattr(block, self.shared_expert_gate) if self.shared_expert_gate else None,
            jitter_noise=float(getattr(config, self.jitter, 0.0) or 0.0) if self.jitter else 0.0,
        )


@dataclass(frozen=True)
class DenseAdapter:
    """How :func:`upcycle` reads one dense architecture's MLPs.

    ``kind="gated"``: ``down_proj(act(gate_proj(x)) * up_proj(x))`` with ``nn.Linear`` projections
    (Llama, Qwen2, Mistral, ...); ``kind="conv1d"``: GPT-2's ``c_proj(act(c_fc(x)))`` with
    ``Conv1D`` weights ``[in, out]``. Biases are kept. ``act`` and ``dropout`` name config attributes
    (the activation, and dropout applied to the MLP output in training).
    """

    mlp: str
    kind: Literal["gated", "conv1d"]
    act: str = "hidden_act"
    dropout: str | None = None

    def find(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return _find(model, self.mlp)

    def read(self, mlp: nn.Module, config) -> _Weights:
        act = getattr(config, self.act)
        dropout = float(getattr(config, self.dropout, 0.0) or 0.0) if self.dropout else 0.0
        if self.kind == "gated":
            gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
            for name, lin in (("gate_proj", gate), ("up_proj", up), ("down_proj", down)):
                if not isinstance(lin, nn.Linear):
                    raise NotImplementedError(f"softmoe.hf: {type(mlp).__name__}.{name} is a {type(lin).__name__}, not nn.Linear")
            w_in = torch.cat([gate.weight.t(), up.weight.t()], dim=-1)[None]
            b_in = torch.cat([gate.bias, up.bias])[None] if gate.bias is not None else None
            b_out = down.bias[None] if down.bias is not None else None
            return _Weights(w_in, down.weight.t()[None], b_in, b_out, act, True, dropout=dropout)
        if self.kind == "conv1d":
            fc, proj = mlp.c_fc, mlp.c_proj
            return _Weights(fc.weight[None], proj.weight[None], fc.bias[None], proj.bias[None], act, False, dropout=dropout)
        raise ValueError(f"DenseAdapter: kind must be 'gated' or 'conv1d', got {self.kind!r}")


#: MoE architectures :func:`convert` supports, keyed by ``config.model_type``.
MOE_ADAPTERS: dict[str, MoEAdapter] = {
    "mixtral": MoEAdapter("MixtralSparseMoeBlock", jitter="router_jitter_noise"),
    "qwen2_moe": MoEAdapter("Qwen2MoeSparseMoeBlock", shared_expert="shared_expert", shared_expert_gate="shared_expert_gate"),
    "qwen3_moe": MoEAdapter("Qwen3MoeSparseMoeBlock"),
    "olmoe": MoEAdapter("OlmoeSparseMoeBlock"),
}

#: Dense architectures :func:`upcycle` supports, keyed by ``config.model_type``.
DENSE_ADAPTERS: dict[str, DenseAdapter] = {
    "llama": DenseAdapter("LlamaMLP", "gated"),
    "qwen2": DenseAdapter("Qwen2MLP", "gated"),
    "gpt2": DenseAdapter("GPT2MLP", "conv1d", act="activation_function", dropout="resid_pdrop"),
}


# ---- building ------------------------------------------------------------------------------------


def _check_model(fn: str, model: object) -> None:
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{fn}: model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if any(isinstance(m, SoftMoEBlock) for m in model.modules()):
        raise ValueError(f"{fn}: {type(model).__name__} already has SoftMoE routing (it was converted or upcycled)")


def _check_module(fn: str, model: object) -> None:
    # The readers take any module (a converted model or a part of it); anything else would fail
    # with an AttributeError on .modules().
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")


def _adapter(fn: str, model: PreTrainedModel, method: str) -> MoEAdapter | DenseAdapter:
    """The registered adapter for ``model`` (``convert``: MoE, ``upcycle``: dense), or a clear error."""
    registry, what, hint = {
        "convert": (MOE_ADAPTERS, "MoE", "For a dense model use softmoe.hf.upcycle; to add an architecture, "
                    "register a softmoe.hf.MoEAdapter in softmoe.hf.MOE_ADAPTERS."),
        "upcycle": (DENSE_ADAPTERS, "dense", "For a MoE model use softmoe.hf.convert; to add an architecture, "
                    "register a softmoe.hf.DenseAdapter in softmoe.hf.DENSE_ADAPTERS."),
    }[method]
    model_type = getattr(model.config, "model_type", None)
    adapter = registry.get(model_type)
    if adapter is None:
        raise NotImplementedError(
            f"{fn}: {type(model).__name__} (model_type {model_type!r}) is not a supported {what} architecture; "
            f"supported model_types: {', '.join(sorted(registry))}. {hint}"
        )
    return adapter


def _routing(fn: str, mean_k: object, routing: dict) -> dict:
    unknown = sorted(set(routing) - set(_ROUTING_KEYS))
    if unknown:
        raise TypeError(f"{fn}: unexpected routing argument(s) {', '.join(unknown)}; allowed: {', '.join(_ROUTING_KEYS)}")
    if isinstance(mean_k, bool) or not isinstance(mean_k, (int, float)):
        raise TypeError(f"{fn}: mean_k must be a float, got {type(mean_k).__name__}")
    if not math.isfinite(mean_k):
        raise ValueError(f"{fn}: mean_k must be finite, got {mean_k}")
    mean_k = float(mean_k)
    k_min = routing.get("k_min")
    if k_min is None:
        k_min = min(1.0, mean_k / 2)
    else:
        # Checked here: a NaN k_min would otherwise fail the mean_k > k_min check and blame mean_k.
        k_min = _checks.check_number(fn, "k_min", k_min)
        if not (math.isfinite(k_min) and k_min > 0):
            raise ValueError(f"{fn}: k_min must be a finite number > 0, got {k_min}")
    combine = routing.get("combine", "normalized")
    if combine not in _COMBINES:
        raise ValueError(f"{fn}: combine must be 'normalized' or 'sum', got {combine!r}")
    flags = {}
    for name, default in (("learn_k", True), ("learn_alpha", False)):
        flags[name] = routing.get(name, default)
        if not isinstance(flags[name], bool):  # bool("no") would silently be True
            raise TypeError(f"{fn}: {name} must be a bool, got {type(flags[name]).__name__}")
    return {
        "mean_k": mean_k,
        "k_min": k_min,
        "alpha": routing.get("alpha", 1.0),
        "eps": routing.get("eps", 1e-2),
        "max_active": routing.get("max_active"),
        "combine": combine,
        **flags,
    }


def _block(fn: str, name: str, w: _Weights, spec: dict, noise: float = 0.0) -> SoftMoEBlock:
    """A SoftMoEBlock from ``w`` (its tensors are copied; ``w.w_in`` etc. with E = 1 are repeated to
    ``spec["num_experts"]`` experts, with relative Gaussian ``noise``)."""
    num_experts = spec.get("num_experts", w.num_experts)
    d_model, d_hidden = w.w_in.shape[1], w.d_hidden
    ref = w.w_in
    factory = {"device": ref.device, "dtype": ref.dtype}

    def expand(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.detach()
        if t.shape[0] != num_experts:
            t = t.expand(num_experts, *t.shape[1:])
        t = t.clone().contiguous()
        if noise > 0 and t.shape[0] > 1:
            scale = t.float().std() if t.numel() > 1 else t.new_ones(())
            t = t + (noise * scale * torch.randn(t.shape, device=t.device)).to(t.dtype)
        return t

    plain = w.b_in is None and w.b_out is None and (
        (w.gated and w.act in ("silu", "swish")) or (not w.gated and w.act == "gelu")
    )
    if plain:
        experts = GroupedExperts(num_experts, d_model, d_hidden, "swiglu" if w.gated else "gelu", **factory)
    else:
        experts = HFExperts(num_experts, d_model, d_hidden, w.act, w.gated, w.b_in is not None, **factory)
    with torch.no_grad():
        experts.w_in.copy_(expand(w.w_in))
        experts.w_out.copy_(expand(w.w_out))
        if w.b_in is not None:
            experts.b_in.copy_(expand(w.b_in))
        if w.b_out is not None:
            experts.b_out.copy_(expand(w.b_out))
    router_weight = w.router_weight.detach().clone() if w.router_weight is not None else None
    try:
        return SoftMoEBlock(
            d_model, d_hidden, num_experts, experts=experts, router_weight=router_weight,
            router_class=w.router_class, shared_expert=w.shared_expert, shared_expert_gate=w.shared_expert_gate,
            jitter_noise=w.jitter_noise, dropout=w.dropout,
            k=spec["mean_k"], alpha=spec["alpha"], eps=spec["eps"], max_active=spec["max_active"],
            combine=spec["combine"], learn_k=spec["learn_k"], learn_alpha=spec["learn_alpha"], k_min=spec["k_min"],
            **factory,
        )
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: cannot build the SoftMoE layer for {name}: {e}") from e


def _apply(fn: str, model: PreTrainedModel, method: str, spec: dict, noise: float = 0.0, own_config: bool = True) -> PreTrainedModel:
    """Builds every block first (so a bad argument leaves the model untouched), then swaps them in."""
    adapter = _adapter(fn, model, method)
    found = adapter.find(model)
    if not found:
        wanted = adapter.block if isinstance(adapter, MoEAdapter) else adapter.mlp
        raise ValueError(f"{fn}: found no {wanted} module in {type(model).__name__}")
    if spec.get("layers") is not None and spec["layers"] != [name for name, _ in found]:
        raise ValueError(f"{fn}: the saved SoftMoE layers {spec['layers']} are not this model's blocks {[n for n, _ in found]}")
    num_experts = adapter.read(found[0][1], model.config).num_experts if method == "convert" else spec["num_experts"]
    mean_k, k_min, max_active = spec["mean_k"], spec["k_min"], spec["max_active"]
    if not 0 < mean_k < num_experts:
        raise ValueError(f"{fn}: mean_k must satisfy 0 < mean_k < num_experts (= {num_experts}), got {mean_k}")
    if isinstance(k_min, (int, float)) and not 0 < k_min < mean_k:
        raise ValueError(f"{fn}: mean_k must be > k_min (= {k_min}, the floor of every layer's k), got {mean_k}")
    if isinstance(max_active, int) and not mean_k < max_active:
        raise ValueError(f"{fn}: mean_k must be < max_active (= {max_active}), got {mean_k}")
    blocks = [(name, _block(fn, name, adapter.read(module, model.config), spec, noise).train(module.training))
              for name, module in found]
    new_budget = None
    if spec["learn_k"]:
        try:
            new_budget = SoftMoEBudget([b for _, b in blocks], spec["mean_k"], k_min=spec["k_min"])
        except (TypeError, ValueError) as e:
            raise type(e)(f"{fn}: {e}") from e
    spec = dict(spec, max_active=blocks[0][1].max_active, layers=[name for name, _ in blocks])
    for name, block in blocks:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, block)
    if new_budget is not None:
        model.softmoe_budget = new_budget
    # Models built from one config object share it: give this one its own before recording the routing.
    shared = model.config
    if own_config:
        own = copy.deepcopy(shared)
        for m in model.modules():
            if isinstance(m, PreTrainedModel) and m.config is shared:
                m.config = own
    model.config.softmoe = dict(spec, format=FORMAT, method=method)
    _hook_routers(model, blocks)
    return model


def _hook_routers(model: PreTrainedModel, blocks: list[tuple[str, SoftMoEBlock]]) -> None:
    """transformers installs its output-recording hooks once per model; if they are already in
    (``output_router_logits`` was used before the conversion), hook the new routers too."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, install_output_capuring_hook
    except ImportError:  # pragma: no cover
        return
    owners = [(name, m) for name, m in model.named_modules() if isinstance(m, PreTrainedModel)]
    for name, block in blocks:
        candidates = [(n, m) for n, m in owners if n == "" or name.startswith(n + ".")]
        owner = max(candidates, key=lambda c: len(c[0]))[1]
        if not getattr(owner, "_output_capturing_hooks_installed", False):
            continue
        specs = _CAN_RECORD_REGISTRY.get(owner).get("router_logits")
        for spec in specs if isinstance(specs, list) else [specs]:
            target = getattr(spec, "target_class", None)
            if isinstance(target, type) and isinstance(block.router, target):
                install_output_capuring_hook(block.router, "router_logits", getattr(spec, "index", 0))
                break


# ---- public API ----------------------------------------------------------------------------------


def convert(model: PreTrainedModel, mean_k: float | None = None, **routing) -> PreTrainedModel:
    """Replaces the top-k routing of every MoE block of a transformers MoE model by SoftMoE routing.

    Each sparse block becomes a :class:`SoftMoEBlock` holding the block's own experts (the fused
    ``gate_up_proj`` / ``down_proj`` copied into the :class:`~softmoe.GroupedExperts` layout, same
    activation), its router weight (copied) and its shared expert and gate (the same modules,
    added as the original block does), so fine-tuning starts from the pretrained model. The
    layers' soft expert counts ``k_l`` are learned under one :class:`SoftMoEBudget`
    (``model.softmoe_budget``, with ``sum_l k_l = L * mean_k``). Dense layers (Qwen2-MoE's
    ``mlp_only_layers``) are left as they are. The model is modified in place and returned.

    Args:
        model: a transformers MoE model whose ``config.model_type`` is in :data:`MOE_ADAPTERS`
            (``mixtral``, ``qwen2_moe``, ``qwen3_moe``, ``olmoe``), e.g. ``MixtralForCausalLM``.
        mean_k: mean soft number of experts per token and layer, ``k_min < mean_k < num_experts``
            (and below each layer's ``max_active - 1``); default the model's ``num_experts_per_tok``.
        **routing: ``alpha`` (LapSum temperature, default 1.0, in units of the router logits),
            ``eps`` (truncation, default 1e-2), ``max_active`` (cap on active experts per token,
            default ``min(E, ceil(mean_k) + 2)``), ``combine`` (``"normalized"``, default, or
            ``"sum"``), ``k_min`` (floor of every ``k_l``, default ``min(1, mean_k / 2)``),
            ``learn_k`` (default True; False gives every layer a fixed ``k = mean_k`` and no
            budget), ``learn_alpha`` (default False).

    ``output_router_logits=True`` keeps working: each converted router is an instance of the
    model's router class, so transformers records its output, the raw router logits
    ``[batch * seq, E]`` per converted layer, and the model's own ``aux_loss`` (its top-k load
    balancing loss on those logits) is computed from them as before. SoftMoE's own per-layer
    statistics are in :func:`stats`.

    Raises:
        NotImplementedError: the architecture is not supported (the message names the model class).
        ValueError / TypeError: bad arguments (e.g. ``mean_k`` out of range), the model already converted.
    """
    fn = "softmoe.hf.convert"
    _check_model(fn, model)
    adapter = _adapter(fn, model, "convert")
    if mean_k is None:
        mean_k = getattr(model.config, adapter.top_k)
    return _apply(fn, model, "convert", _routing(fn, mean_k, routing))


def upcycle(model: PreTrainedModel, num_experts: int, mean_k: float = 2.0, noise: float = 0.0, **routing) -> PreTrainedModel:
    """Sparse upcycling: every MLP of a dense transformers causal LM becomes a :class:`SoftMoEBlock`
    of ``num_experts`` copies of that MLP (biases and activation kept), with a freshly
    initialised router and the soft counts learned under one :class:`SoftMoEBudget`.

    With ``noise=0`` and ``combine="normalized"`` (the default) the upcycled model computes the
    same function as the dense one at the start (the weights of a token sum to 1 and every expert
    is the MLP), so fine-tuning starts from the dense model. Supported: ``config.model_type`` in
    :data:`DENSE_ADAPTERS` (``llama``, ``qwen2``: gated ``gate_proj``/``up_proj``/``down_proj``
    MLPs; ``gpt2``: ``Conv1D`` ``c_fc``/``c_proj`` with ``gelu_new`` and output dropout).

    Args:
        model: a dense transformers model (e.g. ``LlamaForCausalLM``, ``GPT2LMHeadModel``).
        num_experts: E >= 2 experts per layer.
        mean_k: mean soft number of experts per token and layer, ``k_min < mean_k < num_experts``.
        noise: relative std of Gaussian noise added to each expert's copy (``noise * std(W)``),
            to break the symmetry between experts; 0 keeps exact copies.
        **routing: as in :func:`convert`.
    """
    fn = "softmoe.hf.upcycle"
    _check_model(fn, model)
    _checks.check_int(fn, "num_experts", num_experts, minimum=2)
    noise = _checks.check_number(fn, "noise", noise)
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"{fn}: noise must be a finite float >= 0, got {noise!r}")
    _adapter(fn, model, "upcycle")
    spec = dict(_routing(fn, mean_k, routing), num_experts=num_experts)
    return _apply(fn, model, "upcycle", spec, float(noise))


def _rebuild_class(base: type) -> type:
    """``base`` whose ``__init__`` also applies ``config.softmoe`` (same class name and module, so
    transformers' per-class registries and checkpoint conversion rules still apply)."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        spec = dict(config.softmoe)
        config.softmoe = None  # _apply writes it back
        _apply("softmoe.hf.from_pretrained", self, spec["method"], spec, own_config=False)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__, "__qualname__": base.__qualname__})


def from_pretrained(path: str, **kwargs) -> PreTrainedModel:
    """Loads a model converted by :func:`convert` or :func:`upcycle` and saved with ``save_pretrained``.

    The saved ``config.json`` carries the routing configuration (``"softmoe": {...}``): the model
    class named in ``config.architectures`` is built, its blocks are replaced as they were, and the
    saved weights (experts, routers, ``k``/budget, shared experts) are loaded with transformers'
    own loader, so ``kwargs`` (``dtype``, ``device_map``, ...) work as in
    ``AutoModelForCausalLM.from_pretrained``. Logits equal those of the saved model.
    (``AutoModelForCausalLM.from_pretrained`` alone would build the original architecture and drop
    the SoftMoE weights.)
    """
    fn = "softmoe.hf.from_pretrained"
    # Anything else would be turned into a hub repository name and fail after network retries.
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: path must be a str or os.PathLike (a directory or a hub repository id), got "
                        f"{type(path).__name__}")
    config = kwargs.pop("config", None)
    if config is None and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{fn}: {path} has no config.json; pass a directory written by save_pretrained")
    config = config or AutoConfig.from_pretrained(path)
    spec = getattr(config, "softmoe", None)
    if not isinstance(spec, dict) or spec.get("method") not in ("convert", "upcycle"):
        raise ValueError(f"{fn}: {path} has no SoftMoE routing configuration (config.softmoe); was it saved from a "
                         f"model converted with softmoe.hf.convert / upcycle?")
    if spec.get("format", FORMAT) > FORMAT:
        raise ValueError(f"{fn}: {path} was saved by a newer softmoe (config.softmoe format {spec['format']} > {FORMAT})")
    names = getattr(config, "architectures", None) or []
    base = getattr(transformers, names[0], None) if names else None
    if base is None or not (isinstance(base, type) and issubclass(base, PreTrainedModel)):
        raise ValueError(f"{fn}: config.architectures = {names!r} does not name a transformers model class")
    model = _rebuild_class(base).from_pretrained(path, config=config, **kwargs)
    model.__class__ = base
    for layer in layers(model):  # a frozen k_logit stays frozen, whatever the loader did
        if layer._budget is not None:
            layer.k_logit.requires_grad_(False)
    return model


def layers(model: nn.Module) -> list[SoftMoEBlock]:
    """The SoftMoE blocks of a converted or upcycled model, in model order."""
    _check_module("softmoe.hf.layers", model)
    return [m for m in model.modules() if isinstance(m, SoftMoEBlock)]


def budget(model: nn.Module) -> GlobalBudget | None:
    """The model's :class:`SoftMoEBudget` (``model.softmoe_budget``), or None (``learn_k=False``)."""
    _check_module("softmoe.hf.budget", model)
    return getattr(model, "softmoe_budget", None)


def allocation(model: nn.Module) -> torch.Tensor:
    """The per-layer soft expert counts ``k_l`` ``[L]`` (sum ``L * mean_k`` under the budget)."""
    _check_module("softmoe.hf.allocation", model)
    found = layers(model)
    if not found:
        raise ValueError(f"softmoe.hf.allocation: {type(model).__name__} has no SoftMoE layers")
    b = budget(model)
    return b.allocation().detach() if b is not None else torch.stack([layer.k.detach() for layer in found])


def stats(model: nn.Module) -> list[dict]:
    """Per SoftMoE layer, in model order: ``name``, ``k`` (soft count k_l), and from the last
    forward ``active`` (realised mean number of active experts per token), ``tokens_per_expert``
    and ``router_entropy`` (None before the first forward). Reads tensors back (host sync)."""
    _check_module("softmoe.hf.stats", model)
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for layer in layers(model):
        s = layer.last_stats
        out.append({
            "name": names.get(id(layer), ""),
            "k": float(layer.k.detach()),
            "active": float(s["active_per_token"]) if s else None,
            "tokens_per_expert": s["tokens_per_expert"].tolist() if s else None,
            "router_entropy": float(s["router_entropy"]) if s else None,
        })
    return out


def format_stats(model: nn.Module) -> str:
    """A small table of :func:`stats` (one line per layer) and the budget total."""
    _check_module("softmoe.hf.format_stats", model)
    rows = stats(model)
    lines = [f"{'layer':<28} {'k_l':>6} {'active':>7}  tokens per expert"]
    for r in rows:
        active = f"{r['active']:.2f}" if r["active"] is not None else "-"
        tpe = " ".join(str(t) for t in r["tokens_per_expert"]) if r["tokens_per_expert"] is not None else "-"
        lines.append(f"{r['name']:<28} {r['k']:>6.3f} {active:>7}  {tpe}")
    b = budget(model)
    if b is not None:
        lines.append(f"sum k_l = {sum(r['k'] for r in rows):.4f} (budget {b.num_layers} x {b.mean_k} = {b.num_layers * b.mean_k:.4f})")
    return "\n".join(lines)
