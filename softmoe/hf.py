"""Hugging Face transformers integration: SoftMoE routing in existing causal LMs.

- :func:`convert` swaps the top-k routing of a transformers MoE model for truncated LapSum
  routing with a learned per-layer expert count under one :class:`~softmoe.GlobalBudget`,
  keeping the model's experts, router, gate and shared experts. By default the converted model
  is the same model (lossless at step 0): the soft top-k starts sharp enough to choose each
  token's top-k, and the ``"gate"`` combine weights the experts by the model's own gate.
  Supported families: :data:`MOE_ADAPTERS` (Mixtral, Qwen2/3-MoE, Qwen3-Next, OLMoE,
  DeepSeek-V2/V3, GLM-4-MoE, gpt-oss, Granite-MoE, PhiMoE, Llama 4, ...).
- :func:`upcycle` turns a dense model's MLPs (Llama, Qwen2, GPT-2) into SoftMoE layers whose
  experts start as copies of the MLP (sparse upcycling).
- :func:`from_pretrained` loads what ``model.save_pretrained(path)`` wrote for such a model.
- :func:`train_routing_only` / :func:`routing_parameters`: fine-tune the routing alone.
- :func:`stats`, :func:`allocation`, :func:`budget`, :func:`layers` read the routing back.

Needs transformers 5.x (the fused 3-D expert weights and hook-recorded router logits), installed
with ``pip install 'softmoe[hf]'``; tested with transformers 5.23.0.

    >>> import softmoe.hf
    >>> model = softmoe.hf.convert(model)               # e.g. a MixtralForCausalLM: same logits
    >>> model.save_pretrained("out")
    >>> model = softmoe.hf.from_pretrained("out")

Each converted block is a :class:`SoftMoEBlock` (a :class:`~softmoe.SoftMoELayer`) at the block's
place (``model.model.layers[i].mlp``); the budget is ``model.softmoe_budget`` (its ``theta`` is a
parameter of the model, so optimizers and ``state_dict`` see it); the routing configuration is
``model.config.softmoe`` and is saved with the model. How a model is read:
:mod:`softmoe.hf_adapters`; the routers' gates: :mod:`softmoe.hf_gates`.
"""
from __future__ import annotations

import copy
import math
import os

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
from .ops import soft_topk
from .hf_adapters import (
    DENSE_ADAPTERS, MOE_ADAPTERS, MOE_UNSUPPORTED, BlockParts, DenseAdapter, MoEAdapter, find_moe_blocks,
    fused_activation, read_block, top_k_of,
)
from .hf_gates import Gate
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
    "MOE_UNSUPPORTED",
    "MoEAdapter",
    "LOSSLESS_MARGIN",
    "SHARP_ALPHA",
    "SoftMoEBlock",
    "allocation",
    "budget",
    "convert",
    "format_stats",
    "from_pretrained",
    "layers",
    "routing_parameters",
    "stats",
    "train_routing_only",
    "upcycle",
]

FORMAT = 2  # version of the config.softmoe record (2: the "gate" combine and the routers' gates)
_ROUTING_KEYS = ("alpha", "eps", "max_active", "combine", "k_min", "learn_k", "learn_alpha")
_COMBINES = ("normalized", "sum", "gate", "scaled")

#: The temperature :func:`convert` starts from, in units of what the router ranks (logits, or
#: probabilities for routers with a selection bias): below the gaps float32 resolves between two
#: scores, so the soft top-k is the top-k indicator (measured on 1e5 tokens for each of 8, 16, 64
#: and 256 experts, logits of standard deviation 1, 4 and 40 and biased sigmoid probabilities:
#: the active set is the hard top-k, with weights within 2e-5 of 1, for all but 3 of the 2e6
#: tokens, those whose k-th and (k+1)-th scores are within 2e-7; soft_topk stays finite).
SHARP_ALPHA = 1e-8
#: An integral ``mean_k`` K is used as ``K * (1 - LOSSLESS_MARGIN)``: with an integer k the
#: exact soft top-k keeps a (K+1)-th expert at the truncation edge with a weight of float rounding
#: (an extra expert per token, whatever alpha); just below K the K-th expert gets ``1 - margin``
#: and the next is exactly 0, so the weights move by a relative 1e-6.
LOSSLESS_MARGIN = 1e-6


def _soft_count(mean_k: float) -> float:
    """The soft count the layers and the budget use for ``mean_k`` (see :data:`LOSSLESS_MARGIN`)."""
    return mean_k * (1.0 - LOSSLESS_MARGIN) if float(mean_k).is_integer() else mean_k


# ---- modules ------------------------------------------------------------------------------------


class _RawLogitRouter(nn.Module):
    """Router of a converted block: ``forward(x[N, H]) -> raw logits [N, E]`` (``x @ weight.T + bias``).

    transformers' ``output_router_logits`` records its output (the raw logits ``[batch * seq, E]``,
    one tensor per converted layer; :func:`convert` installs the recording hook). It is not an
    instance of the model's router class, whose weight initialisation reads that class's buffers
    (e.g. DeepSeek-V3's ``e_score_correction_bias``, here in the block's gate). ``float32``: the
    logits are computed in float32 whatever the weights' dtype, as DeepSeek-style routers do.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, float32: bool = False) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim = weight.shape
        self.in_features, self.out_features = self.hidden_dim, self.num_experts
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.float32 = float32

    def logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The logits without the forward hooks (``forward`` records them for transformers)."""
        # ops.matmul: the same bits for any thread count (see softmoe.layer.Router)
        flat = hidden_states.reshape(-1, self.hidden_dim)
        weight, bias = self.weight, self.bias
        if self.float32:
            flat, weight = flat.float(), weight.float()
            bias = bias.float() if bias is not None else None
        out = ops.matmul(flat, weight.t())
        if bias is not None:
            out = out + bias
        return out.reshape(*hidden_states.shape[:-1], self.num_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits(hidden_states)

    def extra_repr(self) -> str:
        return (f"hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, bias={self.bias is not None}, "
                f"float32={self.float32}, returns=raw logits")


class HFExperts(GroupedExperts):
    """:class:`~softmoe.GroupedExperts` with any transformers activation, optional biases, an
    experts module's own gated activation, and optionally gated inputs.

    Gated (``gated=True``): ``y = (act(x W_gate + b_gate) * (x W_up + b_up)) W_down + b_down`` with
    ``w_in`` ``[E, d_model, 2 * d_hidden]`` (gate columns first), or ``gate_fn(x W_in + b_in)``
    (e.g. gpt-oss's clamped SwiGLU on interleaved columns) when given; otherwise
    ``y = act(x W_in + b_in) W_down + b_down`` (e.g. GPT-2's ``gelu_new`` MLP). Biases are
    ``b_in`` ``[E, width]`` and ``b_out`` ``[E, d_model]`` (``None`` without bias). SiLU-gated and
    exact-GELU experts without biases run softmoe's fused ``expert_ffn`` op.

    ``input_gate`` (Llama 4): each routed row is multiplied by ``sigmoid(x . w_e)`` with ``w_e``
    its expert's row of the router weight before the expert runs (the router is attached by
    :class:`SoftMoEBlock`; gradients reach it through these scores).

    Weights are stored ``[E, in, out]`` (``is_transposed``, the flag PEFT's ``target_parameters``
    LoRA reads to size its adapters).
    """

    is_transposed = True

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        act: str | object,
        gated: bool,
        bias: bool,
        *,
        gate_fn=None,
        input_gate: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if isinstance(act, str) and act not in ACT2FN:
            raise ValueError(f"HFExperts: act must be a transformers activation name (ACT2FN) or a callable, got {act!r}")
        fused = fused_activation(act, gated) if not (bias or gate_fn is not None or input_gate) else None
        super().__init__(num_experts, d_model, d_hidden, fused or ("swiglu" if gated else "gelu"), device=device, dtype=dtype)
        self.gated = gated
        self.act = act if isinstance(act, str) else type(act).__name__ if isinstance(act, nn.Module) else getattr(act, "__name__", repr(act))
        self.act_fn = ACT2FN[act] if isinstance(act, str) else act
        self.gate_fn = gate_fn
        self.fused = fused is not None
        self.input_gate = bool(input_gate)
        self._router: nn.Module | None = None
        factory = {"device": device, "dtype": dtype}
        if bias:
            self.b_in = nn.Parameter(torch.zeros(num_experts, self.w_in.shape[-1], **factory))
            self.b_out = nn.Parameter(torch.zeros(num_experts, d_model, **factory))
        else:
            self.register_parameter("b_in", None)
            self.register_parameter("b_out", None)

    def attach_router(self, router: nn.Module) -> None:
        """The router whose weight rows gate the inputs (``input_gate``); referenced, not owned."""
        object.__setattr__(self, "_router", router)

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.gate_fn is not None:
            return self.gate_fn(h)
        if self.gated:
            gate, up = h.split(self.d_hidden, dim=-1)
            return self.act_fn(gate) * up
        return self.act_fn(h)

    @staticmethod
    def _row_experts(xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # Expert of each row (E for padding rows): no host sync.
        return torch.bucketize(torch.arange(xs.shape[0], device=xs.device), offsets[1:], right=True)

    def _gate_inputs(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        router = self._router
        if router is None:
            raise RuntimeError("HFExperts: input_gate needs a router (SoftMoEBlock attaches it)")
        rows = self._row_experts(xs, offsets)
        w = F.pad(router.weight, (0, 0, 0, 1))[rows]
        logit = (xs.float() * w.float()).sum(-1)
        if router.bias is not None:
            logit = logit + F.pad(router.bias, (0, 1))[rows].float()
        return xs * torch.sigmoid(logit).to(xs.dtype).unsqueeze(-1)

    def forward(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        if self.input_gate:
            xs = self._gate_inputs(xs, offsets)
        if self.fused:
            return super().forward(xs, offsets)
        h = ops.grouped_mm(xs, self.w_in, offsets)
        if self.b_in is not None:
            rows = self._row_experts(xs, offsets)  # the padding rows' bias row (E) is zero
            h = h + F.pad(self.b_in, (0, 0, 0, 1))[rows]
        y = ops.grouped_mm(self._activate(h), self.w_out, offsets)
        if self.b_out is not None:
            y = y + F.pad(self.b_out, (0, 0, 0, 1))[rows]
        return y

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row ``[T, d_model] -> [E, T, d_model]`` (without the input gate)."""
        h = torch.einsum("td,edh->eth", x, self.w_in)
        if self.b_in is not None:
            h = h + self.b_in[:, None]
        y = torch.einsum("eth,ehd->etd", self._activate(h), self.w_out)
        return y + self.b_out[:, None] if self.b_out is not None else y

    def extra_repr(self) -> str:
        extra = f", act={self.act!r}, gated={self.gated}, bias={self.b_in is not None}, fused={self.fused}"
        if self.gate_fn is not None:
            extra += ", gate_fn=the experts' _apply_gate"
        if self.input_gate:
            extra += ", input_gate=True"
        return super().extra_repr() + extra


class SoftMoEBlock(SoftMoELayer):
    """A transformers MoE block (or dense MLP) with SoftMoE routing; ``forward(h[B, S, H]) -> [B, S, H]``.

    A :class:`~softmoe.SoftMoELayer` plus what the replaced block did around its experts:

    - ``gate`` (:class:`~softmoe.hf_gates.Gate`): the pretrained router's choice and gate. The soft
      top-k ranks ``gate.selection(logits)`` (selection bias, group-limited choice) and, with
      ``combine="gate"``, the experts are weighted by ``gate.weights(logits, p)``; without a gate
      the layer's own routing applies.
    - shared experts with an optional sigmoid gate: ``y = moe(x) + sigmoid(g(x)) * shared(x)``
      (``shared_combine="average"``: their mean), an output norm (``post_norm``),
      multiplicative router jitter in training (Mixtral's ``router_jitter_noise``), output dropout
      (GPT-2's ``resid_pdrop``), and ``(output, router_logits)`` returned where the replaced block
      returned a pair (gpt-oss, Llama 4: their decoder layers keep the first),
      and, with ``keeps_input_dtype``, the output in the input's dtype under ``torch.autocast``
      (a transformers MoE block sums its experts into ``zeros_like(hidden_states)``; an upcycled
      dense MLP returns the autocast dtype, as its ``nn.Linear`` layers do).

    ``experts`` and ``router_weight`` / ``router_bias`` replace the layer's freshly initialised
    ones (the router is then a :class:`_RawLogitRouter`).
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        *,
        experts: GroupedExperts | None = None,
        router_weight: torch.Tensor | None = None,
        router_bias: torch.Tensor | None = None,
        router_float32: bool = False,
        gate: Gate | None = None,
        shared_expert: nn.Module | None = None,
        shared_expert_gate: nn.Module | None = None,
        shared_combine: str = "sum",
        post_norm: nn.Module | None = None,
        returns_pair: bool = False,
        jitter_noise: float = 0.0,
        dropout: float = 0.0,
        keeps_input_dtype: bool = False,
        **layer_kwargs,
    ) -> None:
        super().__init__(d_model, d_hidden, num_experts, **layer_kwargs)
        if shared_combine not in ("sum", "average"):
            raise ValueError(f"SoftMoEBlock: shared_combine must be 'sum' or 'average', got {shared_combine!r}")
        if experts is not None:
            self.experts = experts
        if router_weight is not None or router_bias is not None or router_float32:
            weight = router_weight if router_weight is not None else self.router.weight.detach()
            self.router = _RawLogitRouter(weight, router_bias, router_float32)
        if isinstance(self.experts, HFExperts) and self.experts.input_gate:
            self.experts.attach_router(self.router)
        self.gate = gate
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.shared_combine = shared_combine
        self.post_norm = post_norm
        self.returns_pair = bool(returns_pair)
        self.jitter_noise = float(jitter_noise)
        self.dropout = nn.Dropout(dropout) if dropout else None
        self.keeps_input_dtype = bool(keeps_input_dtype)

    def route(self, x: torch.Tensor, k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits ``[T, E]`` (float32, soft-capped if the router does) and routing weights
        ``p`` ``[T, E]``: the soft top-k of the gate's selection scores; ``k``: the soft count of
        this forward (default :attr:`k`)."""
        if self.gate is None:
            return super().route(x, k)
        logits = self.gate.logits(self.router(x).to(torch.float64 if x.dtype == torch.float64 else torch.float32))
        p = soft_topk(self.gate.selection(logits), self.k if k is None else k, self.alpha, eps=self.eps,
                      max_active=self.max_active)
        return logits, p

    def combine_weights(self, logits: torch.Tensor, p: torch.Tensor, k: torch.Tensor | None = None) -> torch.Tensor:
        if self.gate is None or self.combine != "gate":
            return super().combine_weights(logits, p, k)
        return self.gate.weights(logits, p)

    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states
        if self.training and self.jitter_noise > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        y = super().forward(x)
        if self.keeps_input_dtype:  # under torch.autocast: the input's dtype, as the replaced MoE block
            y = y.to(hidden_states.dtype)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared if self.shared_combine == "sum" else (y + shared) / 2
        if self.post_norm is not None:
            y = self.post_norm(y)
        if self.dropout is not None:
            y = self.dropout(y)
        if self.returns_pair:
            return y, self.router.logits(x.reshape(-1, self.d_model))
        return y

    # safetensors (save_pretrained) stores tensors only, so the routing configuration that
    # SoftMoELayer checks on load travels as an int64 tensor (float64 bit patterns for the floats:
    # a dtype cast on load cannot change it).
    def get_extra_state(self) -> torch.Tensor:
        s = super().get_extra_state()
        # None (k_min / k_max in active mode, active in soft-count mode) travels as NaN
        floats = torch.tensor([_or_nan(s["k_min"]), _or_nan(s["k_max"]), s["eps"], _or_nan(s["active"])],
                              dtype=torch.float64, device="cpu")
        ints = torch.tensor([s["max_active"], s["num_experts"], _COMBINES.index(s["combine"])], dtype=torch.int64, device="cpu")
        return torch.cat([ints, floats.view(torch.int64)])

    def set_extra_state(self, state) -> None:
        if isinstance(state, torch.Tensor):
            state = state.detach().to("cpu", torch.int64)
            ints = state[:3].tolist()
            k_min, k_max, eps, *active = [None if math.isnan(v) else v for v in state[3:].view(torch.float64).tolist()]
            state = {"k_min": k_min, "k_max": k_max, "eps": eps, "active": active[0] if active else None,
                     "max_active": ints[0], "num_experts": ints[1], "combine": _COMBINES[ints[2]]}
        mine = SoftMoELayer.get_extra_state(self)
        diff = {key: (state.get(key), value) for key, value in mine.items() if state.get(key) != value}
        if diff:
            detail = ", ".join(f"{key}: saved {saved!r} vs this layer {here!r}" for key, (saved, here) in diff.items())
            raise ValueError(f"SoftMoEBlock.load_state_dict: the saved routing configuration differs ({detail})")


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _make_budget(layers: list[SoftMoELayer], spec: dict) -> GlobalBudget:
    """The one place a converted model's expert budget is created from its routing ``spec``."""
    return GlobalBudget(layers, _soft_count(spec["mean_k"]), k_min=spec["k_min"])


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


def _text_config(model: PreTrainedModel):
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _moe_adapter(fn: str, model: PreTrainedModel) -> MoEAdapter:
    """The model's MoE routing hooks, or a NotImplementedError naming the class and the missing piece."""
    model_type = getattr(model.config, "model_type", None)
    what = f"{type(model).__name__} (model_type {model_type!r})"
    if model_type in MOE_UNSUPPORTED:
        raise NotImplementedError(f"{fn}: {what} is not supported: {MOE_UNSUPPORTED[model_type]}")
    adapter = MOE_ADAPTERS.get(model_type)
    if adapter is not None:
        return adapter
    blocks = find_moe_blocks(model)
    if not blocks:
        hint = (" For a dense model use softmoe.hf.upcycle." if model_type in DENSE_ADAPTERS else "")
        raise NotImplementedError(
            f"{fn}: {what} is not a supported MoE architecture: it has no MoE block with fused experts (an experts "
            f"module holding 3-D gate_up_proj / up_proj and down_proj weights).{hint}")
    block = blocks[0][1]
    router = next((type(getattr(block, n)).__name__ for n in ("gate", "router") if isinstance(getattr(block, n, None), nn.Module)),
                  "its router")
    raise NotImplementedError(
        f"{fn}: {what} is not a supported MoE architecture: its blocks ({type(block).__name__}) are recognised but how "
        f"{router} chooses and weights experts is not registered; register a softmoe.hf.MoEAdapter in "
        f"softmoe.hf.MOE_ADAPTERS[{model_type!r}] (supported: {', '.join(sorted(MOE_ADAPTERS))})")


def _dense_adapter(fn: str, model: PreTrainedModel) -> DenseAdapter:
    model_type = getattr(model.config, "model_type", None)
    adapter = DENSE_ADAPTERS.get(model_type)
    if adapter is None:
        raise NotImplementedError(
            f"{fn}: {type(model).__name__} (model_type {model_type!r}) is not a supported dense architecture; "
            f"supported model_types: {', '.join(sorted(DENSE_ADAPTERS))}. For a MoE model use softmoe.hf.convert; to "
            f"add an architecture, register a softmoe.hf.DenseAdapter in softmoe.hf.DENSE_ADAPTERS.")
    return adapter


def _read_all(fn: str, model: PreTrainedModel, method: str) -> list[tuple[str, BlockParts, nn.Module]]:
    """``(name, parts, original module)`` of every block to replace, in model order."""
    if method == "convert":
        adapter = _moe_adapter(fn, model)
        found = find_moe_blocks(model)
        if not found:
            raise ValueError(f"{fn}: found no MoE block (fused experts) in {type(model).__name__}")
        config = _text_config(model)
        try:
            return [(name, read_block(block, config, adapter), block) for name, block in found]
        except NotImplementedError as e:
            raise NotImplementedError(f"{fn}: {type(model).__name__} (model_type {model.config.model_type!r}) is not "
                                      f"supported: {str(e).removeprefix('softmoe.hf: ')}") from e
    adapter = _dense_adapter(fn, model)
    found = adapter.find(model)
    if not found:
        raise ValueError(f"{fn}: found no {adapter.mlp} module in {type(model).__name__}")
    return [(name, adapter.read(module, model.config), module) for name, module in found]


def _routing(fn: str, mean_k: object, routing: dict, defaults: dict) -> dict:
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
    combine = routing.get("combine", defaults["combine"])
    if combine not in _COMBINES:
        raise ValueError(f"{fn}: combine must be 'normalized', 'sum', 'gate' or 'scaled', got {combine!r}")
    flags = {}
    for name, default in (("learn_k", True), ("learn_alpha", False)):
        flags[name] = routing.get(name, default)
        if not isinstance(flags[name], bool):  # bool("no") would silently be True
            raise TypeError(f"{fn}: {name} must be a bool, got {type(flags[name]).__name__}")
    return {
        "mean_k": mean_k,
        "k_min": k_min,
        "alpha": routing.get("alpha", defaults["alpha"]),
        "eps": routing.get("eps", 1e-2),
        "max_active": routing.get("max_active"),
        "combine": combine,
        **flags,
    }


def _experts(parts: BlockParts, num_experts: int, noise: float, factory: dict) -> HFExperts:
    """:class:`HFExperts` holding copies of ``parts``' weights (E = 1 weights repeated to
    ``num_experts`` experts with relative Gaussian ``noise``)."""

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

    experts = HFExperts(num_experts, parts.w_in.shape[1], parts.d_hidden, parts.act, parts.gated, parts.b_in is not None,
                        gate_fn=parts.gate_fn, input_gate=parts.gate is not None and parts.gate.on_input, **factory)
    with torch.no_grad():
        experts.w_in.copy_(expand(parts.w_in))
        experts.w_out.copy_(expand(parts.w_out))
        if parts.b_in is not None:
            experts.b_in.copy_(expand(parts.b_in))
        if parts.b_out is not None:
            experts.b_out.copy_(expand(parts.b_out))
    return experts


def _block(fn: str, name: str, parts: BlockParts, spec: dict, noise: float = 0.0) -> SoftMoEBlock:
    """A SoftMoEBlock from ``parts`` (its tensors are copied)."""
    num_experts = spec.get("num_experts", parts.num_experts)
    factory = {"device": parts.w_in.device, "dtype": parts.w_in.dtype}
    max_active = spec["max_active"]
    if max_active is None:  # the layer's default, within the experts a token can choose from
        max_active = min(parts.eligible if spec.get("num_experts") is None else num_experts, math.ceil(spec["mean_k"]) + 2)
    elif parts.eligible < parts.num_experts and max_active > parts.eligible and spec.get("num_experts") is None:
        raise ValueError(f"{fn}: max_active must be <= {parts.eligible}, the experts a token of {name} can choose "
                         f"from (group-limited routing), got {max_active}")
    clone = (lambda t: t.detach().clone() if t is not None else None)
    gate = copy.deepcopy(parts.gate)
    try:
        return SoftMoEBlock(
            parts.w_in.shape[1], parts.d_hidden, num_experts, experts=_experts(parts, num_experts, noise, factory),
            router_weight=clone(parts.router_weight), router_bias=clone(parts.router_bias),
            router_float32=parts.router_float32, gate=gate,
            shared_expert=parts.shared_expert, shared_expert_gate=parts.shared_expert_gate,
            shared_combine=parts.shared_combine, post_norm=parts.post_norm,
            returns_pair=parts.returns_pair, jitter_noise=parts.jitter_noise, dropout=parts.dropout,
            keeps_input_dtype=parts.keeps_input_dtype,
            k=_soft_count(spec["mean_k"]), alpha=spec["alpha"], eps=spec["eps"], max_active=max_active,
            combine=spec["combine"], learn_k=spec["learn_k"], learn_alpha=spec["learn_alpha"], k_min=spec["k_min"],
            **factory,
        )
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: cannot build the SoftMoE layer for {name}: {e}") from e


def _apply(fn: str, model: PreTrainedModel, method: str, spec: dict, noise: float = 0.0, own_config: bool = True) -> PreTrainedModel:
    """Builds every block first (so a bad argument leaves the model untouched), then swaps them in."""
    found = _read_all(fn, model, method)
    if spec.get("layers") is not None and spec["layers"] != [name for name, _, _ in found]:
        raise ValueError(f"{fn}: the saved SoftMoE layers {spec['layers']} are not this model's blocks "
                         f"{[n for n, _, _ in found]}")
    num_experts = found[0][1].num_experts if method == "convert" else spec["num_experts"]
    mean_k, k_min, max_active = spec["mean_k"], spec["k_min"], spec["max_active"]
    if not 0 < mean_k < num_experts:
        raise ValueError(f"{fn}: mean_k must satisfy 0 < mean_k < num_experts (= {num_experts}), got {mean_k}")
    if isinstance(k_min, (int, float)) and not 0 < k_min < mean_k:
        raise ValueError(f"{fn}: mean_k must be > k_min (= {k_min}, the floor of every layer's k), got {mean_k}")
    if isinstance(max_active, int) and not mean_k < max_active:
        raise ValueError(f"{fn}: mean_k must be < max_active (= {max_active}), got {mean_k}")
    blocks = [(name, _block(fn, name, parts, spec, noise).train(module.training)) for name, parts, module in found]
    new_budget = None
    if spec["learn_k"]:
        try:
            new_budget = _make_budget([b for _, b in blocks], spec)
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
    """Makes transformers record every converted router's logits under ``output_router_logits``.

    Its recording hooks are installed once per model, on the modules of the classes the model's
    ``_can_record_outputs`` names: install them now (a no-op if a forward already did), then hook
    each converted router of a model that records router logits."""
    try:
        from transformers.utils.output_capturing import (
            _CAN_RECORD_REGISTRY, install_output_capuring_hook, maybe_install_capturing_hooks,
        )
    except ImportError:  # pragma: no cover
        return
    owners = [(name, m) for name, m in model.named_modules() if isinstance(m, PreTrainedModel)]
    for name, block in blocks:
        candidates = [(n, m) for n, m in owners if n == "" or name.startswith(n + ".")]
        owner = max(candidates, key=lambda c: len(c[0]))[1]
        if not _CAN_RECORD_REGISTRY.get(owner).get("router_logits"):
            continue
        maybe_install_capturing_hooks(owner)
        if not any(getattr(h, "__name__", "") == "output_capturing_hook" for h in block.router._forward_hooks.values()):
            install_output_capuring_hook(block.router, "router_logits", 0)  # the output is the logits tensor


# ---- public API ----------------------------------------------------------------------------------


def convert(model: PreTrainedModel, mean_k: float | None = None, **routing) -> PreTrainedModel:
    """Replaces the top-k routing of every MoE block of a transformers MoE model by SoftMoE routing.

    Each sparse block becomes a :class:`SoftMoEBlock` holding the block's own experts (the fused
    ``gate_up_proj`` / ``down_proj`` copied into the :class:`~softmoe.GroupedExperts` layout, same
    activation), its router weight (and bias) copied, its gate (:class:`~softmoe.hf_gates.Gate`:
    softmax or sigmoid scores, selection bias, group-limited choice, renormalisation, routed
    scaling factor) and its shared experts (the same modules, combined as the block does). The
    layers' soft expert counts ``k_l`` are learned under one budget (``model.softmoe_budget``,
    ``sum_l k_l = L * mean_k``). Dense layers (e.g. Qwen2-MoE's ``mlp_only_layers``) are left as
    they are. The model is modified in place and returned.

    **Lossless by default**: with ``mean_k`` the model's top-k (used as top-k times
    ``1 - LOSSLESS_MARGIN``), ``alpha =`` :data:`SHARP_ALPHA` and ``combine="gate"``, every
    token's active experts are its top-k and their weights are the model's gate, so the
    converted model computes the same logits (tested on every supported family in float32 with
    router logits spread like trained ones: within 1e-3 relative, KL below 1e-5 nats per token,
    the same greedy generation). Training then moves the allocation (and, with ``learn_alpha``,
    the temperature).

    Args:
        model: a transformers MoE model whose ``config.model_type`` is in :data:`MOE_ADAPTERS`.
        mean_k: mean soft number of experts per token and layer, ``k_min < mean_k < num_experts``
            (and below each layer's ``max_active - 1``); default the model's top-k
            (``num_experts_per_tok``). An integral ``mean_k`` K is used as
            ``K * (1 - LOSSLESS_MARGIN)`` (see :data:`LOSSLESS_MARGIN`).
        **routing: ``alpha`` (LapSum temperature in units of what the router ranks, default
            :data:`SHARP_ALPHA`), ``eps`` (truncation, default 1e-2), ``max_active`` (cap on
            active experts per token, default ``min(E, ceil(mean_k) + 2)``, within the groups a
            token can choose from), ``combine`` (``"gate"``, default: the model's gate modulated
            by the soft top-k; ``"normalized"``: ``p / k``; ``"sum"``: ``p``), ``k_min`` (floor of
            every ``k_l``, default ``min(1, mean_k / 2)``), ``learn_k`` (default True; False
            gives every layer a fixed ``k = mean_k`` and no budget), ``learn_alpha`` (default False).

    ``output_router_logits=True`` keeps working: transformers records each converted router's
    output, the raw router logits ``[batch * seq, E]`` per converted layer, and the model's own
    ``aux_loss`` is computed from them as before. SoftMoE's own per-layer statistics are in :func:`stats`.

    Raises:
        NotImplementedError: the architecture is not supported (the message names the class and
            what softmoe cannot reproduce).
        ValueError / TypeError: bad arguments (e.g. ``mean_k`` out of range), the model already converted.
    """
    fn = "softmoe.hf.convert"
    _check_model(fn, model)
    adapter = _moe_adapter(fn, model)
    if mean_k is None:
        mean_k = top_k_of(_text_config(model), adapter)
    return _apply(fn, model, "convert", _routing(fn, mean_k, routing, {"alpha": SHARP_ALPHA, "combine": "gate"}))


def upcycle(model: PreTrainedModel, num_experts: int, mean_k: float = 2.0, noise: float = 0.0, **routing) -> PreTrainedModel:
    """Sparse upcycling: every MLP of a dense transformers causal LM becomes a :class:`SoftMoEBlock`
    of ``num_experts`` copies of that MLP (biases and activation kept), with a freshly
    initialised router and the soft counts learned under one :class:`~softmoe.GlobalBudget`.

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
        **routing: as in :func:`convert`, with defaults ``alpha=1.0`` and ``combine="normalized"``.
    """
    fn = "softmoe.hf.upcycle"
    _check_model(fn, model)
    _checks.check_int(fn, "num_experts", num_experts, minimum=2)
    noise = _checks.check_number(fn, "noise", noise)
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"{fn}: noise must be a finite float >= 0, got {noise!r}")
    _dense_adapter(fn, model)
    spec = dict(_routing(fn, mean_k, routing, {"alpha": 1.0, "combine": "normalized"}), num_experts=num_experts)
    return _apply(fn, model, "upcycle", spec, float(noise))


def routing_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that steer routing in a converted or upcycled model: every SoftMoE block's
    router weight (and bias), its own ``k_logit`` when it is learned without a budget, its
    ``log_alpha`` when learned (``learn_alpha=True``), and the budget's ``theta``. Shared experts'
    gates are not included (they weight an always-active expert, not a choice)."""
    _check_module("softmoe.hf.routing_parameters", model)
    params: list[nn.Parameter] = []
    for layer in layers(model):
        params.append(layer.router.weight)
        if layer.router.bias is not None:
            params.append(layer.router.bias)
        for name in ("k_logit", "log_alpha"):
            value = getattr(layer, name)
            if isinstance(value, nn.Parameter):  # under a budget k_logit is a frozen buffer
                params.append(value)
    b = budget(model)
    if b is not None:
        params.extend(b.parameters())
    return params


def train_routing_only(model: nn.Module) -> list[nn.Parameter]:
    """Freezes every parameter of ``model`` except :func:`routing_parameters` (experts, attention,
    embeddings, shared experts and norms stop training) and returns those, for the optimizer.
    Fine-tuning then costs the forward and the backward through the network, but no optimizer
    state and no weight gradients for the experts."""
    fn = "softmoe.hf.train_routing_only"
    _check_module(fn, model)
    keep = routing_parameters(model)
    if not keep:
        raise ValueError(f"{fn}: {type(model).__name__} has no SoftMoE layers (convert or upcycle it first)")
    ids = {id(p) for p in keep}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return keep


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
    return model


def layers(model: nn.Module) -> list[SoftMoEBlock]:
    """The SoftMoE blocks of a converted or upcycled model, in model order."""
    _check_module("softmoe.hf.layers", model)
    return [m for m in model.modules() if isinstance(m, SoftMoEBlock)]


def budget(model: nn.Module) -> GlobalBudget | None:
    """The model's :class:`~softmoe.GlobalBudget` (``model.softmoe_budget``), or None (``learn_k=False``)."""
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
