"""How :mod:`softmoe.hf` reads a transformers model: the generic recogniser of MoE blocks, the
per-family routing hooks (:data:`MOE_ADAPTERS`) and the dense MLP readers (:data:`DENSE_ADAPTERS`).

A transformers 5.x MoE block is recognised by its structure, whatever its class: a module with a
fused experts child (3-D ``gate_up_proj`` or ``up_proj`` and ``down_proj`` weights, the layout of
``@use_experts_implementation``) and a router child holding a ``[E, H]`` weight, plus optional
shared experts (``shared_expert`` / ``shared_experts`` / ``shared_mlp``, with a sigmoid
``shared_expert_gate``). What differs between families is how the router turns logits into a
choice of experts and their weights: a :class:`MoEAdapter` per ``config.model_type`` says that
(:class:`~softmoe.hf_gates.Gate`'s arguments, read from the router, the block or the config).
:func:`read_block` returns the parts a SoftMoE block is built from, or raises
``NotImplementedError`` naming the class and the piece it cannot reproduce.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

import torch
from torch import nn

from transformers.activations import ACT2FN

from .hf_gates import Gate, SparseMixerGate

try:
    from transformers.integrations.moe import _default_apply_gate
except ImportError:  # pragma: no cover - transformers < 5.0 is refused by softmoe.hf
    _default_apply_gate = None

__all__ = ["Attr", "BlockParts", "DENSE_ADAPTERS", "DenseAdapter", "MOE_ADAPTERS", "MOE_UNSUPPORTED", "MoEAdapter",
           "find_moe_blocks", "read_block"]

_ROUTER_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")


@dataclass(frozen=True)
class Attr:
    """A setting read from the model: the first of the router, the block and the (text) config that
    has attribute ``name`` (a dotted path is followed from the block only), else ``default``."""

    name: str
    default: Any = None


@dataclass
class BlockParts:
    """What a SoftMoE block is built from (one replaced MoE block or dense MLP)."""

    w_in: torch.Tensor  # [E, H, W]: gated: gate columns then up (or the layout ``gate_fn`` expects)
    w_out: torch.Tensor  # [E, I, H]
    b_in: torch.Tensor | None
    b_out: torch.Tensor | None
    act: str | Callable  # an ACT2FN name or the experts' act_fn
    gated: bool
    gate_fn: Callable | None = None  # the experts' own _apply_gate (custom gated activations)
    router_weight: torch.Tensor | None = None  # [E, H]
    router_bias: torch.Tensor | None = None  # [E]
    router_float32: bool = False
    gate: Gate | None = None
    shared_expert: nn.Module | None = None
    shared_expert_gate: nn.Module | None = None
    shared_combine: str = "sum"
    post_norm: nn.Module | None = None
    returns_pair: bool = False
    jitter_noise: float = 0.0
    dropout: float = 0.0
    # transformers' MoE blocks sum the experts into zeros_like(hidden_states), so under torch.autocast
    # they return the input's dtype; a dense MLP (nn.Linear) returns the autocast dtype.
    keeps_input_dtype: bool = False

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    @property
    def d_hidden(self) -> int:
        return self.w_out.shape[1]

    @property
    def eligible(self) -> int:
        """How many experts a token can choose from (fewer under group-limited routing)."""
        return self.gate.eligible if self.gate is not None else self.num_experts


GateHook = Callable[[dict, nn.Module, nn.Module, Any], dict]


@dataclass(frozen=True)
class MoEAdapter:
    """One MoE family's routing, for :func:`read_block` (everything structural is recognised).

    The fields are :class:`~softmoe.hf_gates.Gate` arguments, each a value or an :class:`Attr` read
    from the model (``normalize=Attr("norm_topk_prob")``), plus where the router keeps what:

    Args:
        score, normalize, scale, choose_by, groups, group_score, denominator_eps,
            denominator_min, softcap, on_input: as in :class:`~softmoe.hf_gates.Gate`
            (``groups`` reads the router's ``num_group`` / ``topk_group``); ``score="sparsemixer"``
            is PhiMoE's gate (:class:`~softmoe.hf_gates.SparseMixerGate`, ``jitter_eps`` from the
            router's ``router_jitter_noise``).
        bias: dotted path from the block to the selection bias (``"gate.e_score_correction_bias"``).
        router: the block's attribute holding the router (default: ``gate`` or ``router``).
        router_weight: dotted path inside the router to its ``[E, H]`` weight (its owner's ``bias``,
            if any, is the logits' bias, as gpt-oss has).
        router_float32: the router computes its logits in float32 whatever the model dtype.
        experts_transposed: weight layout of experts classes without the
            ``use_experts_implementation`` flags (Llama 4: ``[E, H, 2I]``).
        shared_combine: ``"sum"`` (routed + shared) or ``"average"`` (their mean, Cohere2-MoE);
            a value or :class:`Attr`.
        post_norm: the block's attribute of a norm applied to its output (A.X-K1).
        must_be_identity: block attributes that must be ``nn.Identity`` (NemotronH's latent projections).
        returns_pair: the block returns ``(output, routing tensor)``, the decoder layer keeps the
            first (gpt-oss, Llama 4); a converted block returns ``(output, router logits)``.
        jitter: config attribute of multiplicative input jitter in training (Mixtral).
        top_k: config attribute of the model's experts per token (the default ``mean_k``).
        hook: ``f(gate_kwargs, router, block, config) -> gate_kwargs`` for what the fields cannot say.
    """

    score: str | Attr = "softmax"
    normalize: bool | Attr = True
    scale: float | Attr = 1.0
    choose_by: str = "logits"
    bias: str | None = None
    groups: bool = False
    group_score: str = "top2"
    denominator_eps: float = 0.0
    denominator_min: float | Attr = 0.0
    softcap: float | Attr | None = None
    on_input: bool = False
    router: str | None = None
    router_weight: str = "weight"
    router_float32: bool = False
    experts_transposed: bool = False
    shared_combine: str | Attr = "sum"
    post_norm: str | None = None
    must_be_identity: tuple[str, ...] = ()
    returns_pair: bool = False
    jitter: str | None = None
    top_k: str = "num_experts_per_tok"
    hook: GateHook | None = field(default=None, compare=False)


@dataclass(frozen=True)
class DenseAdapter:
    """How :func:`softmoe.hf.upcycle` reads one dense architecture's MLPs.

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
        return [(name, m) for name, m in model.named_modules() if type(m).__name__ == self.mlp and name]

    def read(self, mlp: nn.Module, config) -> BlockParts:
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
            return BlockParts(w_in, down.weight.t()[None], b_in, b_out, act, True, dropout=dropout)
        if self.kind == "conv1d":
            fc, proj = mlp.c_fc, mlp.c_proj
            return BlockParts(fc.weight[None], proj.weight[None], fc.bias[None], proj.bias[None], act, False, dropout=dropout)
        raise ValueError(f"DenseAdapter: kind must be 'gated' or 'conv1d', got {self.kind!r}")


# ---- recognising a block ---------------------------------------------------------------------------


def _param(module: nn.Module, name: str) -> torch.Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, torch.Tensor) else None


def _fused_experts(module: nn.Module) -> bool:
    """Experts stored as 3-D tensors: ``gate_up_proj`` (or ``up_proj``) and ``down_proj``."""
    up = _param(module, "gate_up_proj")
    if up is None:
        up = _param(module, "up_proj")
    down = _param(module, "down_proj")
    return up is not None and down is not None and up.dim() == 3 and down.dim() == 3


def _experts_child(block: nn.Module) -> tuple[str, nn.Module] | None:
    for name, child in block.named_children():
        if _fused_experts(child):
            return name, child
    return None


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every module with a fused experts child, in model order."""
    return [(name, m) for name, m in model.named_modules() if name and _experts_child(m) is not None]


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _setting(value: Any, router: nn.Module, block: nn.Module, config: Any) -> Any:
    if not isinstance(value, Attr):
        return value
    if "." in value.name:
        found = _get(block, value.name)
        return value.default if found is None else found
    for source in (router, block, config):
        if hasattr(source, value.name):
            found = getattr(source, value.name)
            return value.default if found is None else found
    return value.default


def _unsupported(block: nn.Module, what: str) -> NotImplementedError:
    return NotImplementedError(f"softmoe.hf: {type(block).__name__}: {what}")


def _activation(experts: nn.Module, config: Any, act_attr: str = "hidden_act") -> str | Callable:
    act = getattr(experts, "act_fn", None)
    if act is not None:
        return act
    name = getattr(config, act_attr, None)
    if name is None:
        raise _unsupported(experts, f"no act_fn and no config.{act_attr}")
    return name


def _custom_gate_fn(experts: nn.Module) -> Callable | None:
    """The experts' own ``_apply_gate`` (gpt-oss's clamped SwiGLU, ...) bound to a weightless copy of
    the experts module (it reads settings like ``self.limit``), or None for the default SwiGLU."""
    custom = getattr(type(experts), "_apply_gate", None)
    if custom is None or custom is _default_apply_gate:
        return None
    holder = copy.copy(experts)  # shares the settings, not the weights
    holder._parameters = {}
    holder._buffers = {}
    return functools.partial(custom, holder)


def _read_experts(block: nn.Module, experts: nn.Module, config: Any, adapter: MoEAdapter) -> dict:
    if getattr(experts, "has_post_expert_norm", False):
        raise _unsupported(block, f"its experts {type(experts).__name__} apply a norm after each expert (has_post_expert_norm)")
    if getattr(experts, "_is_expert_parallel", False):
        raise _unsupported(block, "its experts are sharded for expert parallelism; convert the full model")
    gated = _param(experts, "gate_up_proj") is not None
    transposed = getattr(experts, "is_transposed", adapter.experts_transposed)

    def layout(w: torch.Tensor) -> torch.Tensor:  # -> [E, in, out]
        return w if transposed else w.transpose(1, 2)

    w_in = layout(experts.gate_up_proj if gated else experts.up_proj)
    w_out = layout(experts.down_proj)
    if w_in.shape[0] != w_out.shape[0]:
        raise _unsupported(block, f"its experts have {w_in.shape[0]} input but {w_out.shape[0]} output projections "
                                  f"(zero-computation or identity experts)")
    if w_in.shape[1] != w_out.shape[2] or w_in.shape[2] != (2 if gated else 1) * w_out.shape[1]:
        raise _unsupported(block, f"its experts' weights {list(w_in.shape)} and {list(w_out.shape)} are not an FFN layout softmoe reads")
    b_in = _param(experts, "gate_up_proj_bias" if gated else "up_proj_bias")
    b_out = _param(experts, "down_proj_bias")
    gate_fn = _custom_gate_fn(experts) if gated else None
    if gated and gate_fn is None and not getattr(experts, "is_concatenated", True):  # interleaved gate/up columns
        w_in = torch.cat([w_in[..., 0::2], w_in[..., 1::2]], dim=-1)
        b_in = torch.cat([b_in[..., 0::2], b_in[..., 1::2]], dim=-1) if b_in is not None else None
    return dict(w_in=w_in, w_out=w_out, b_in=b_in, b_out=b_out, act=_activation(experts, config), gated=gated,
                gate_fn=gate_fn)


def _router(block: nn.Module, adapter: MoEAdapter) -> tuple[nn.Module, nn.Module]:
    """(the router module, the module holding its weight)."""
    names = (adapter.router,) if adapter.router else _ROUTER_NAMES
    for name in names:
        router = getattr(block, name, None)
        if isinstance(router, nn.Module):
            owner_path, _, weight_name = adapter.router_weight.rpartition(".")
            owner = _get(router, owner_path) if owner_path else router
            if owner is not None and isinstance(_param(owner, weight_name), torch.Tensor):
                return router, owner
    raise _unsupported(block, f"no router with a weight ({' or '.join(names)}.{adapter.router_weight})")


def _gate(block: nn.Module, router: nn.Module, config: Any, adapter: MoEAdapter, num_experts: int) -> Gate:
    def read(value):
        return _setting(value, router, block, config)

    score = read(adapter.score)
    if score == "sparsemixer":
        return SparseMixerGate(num_experts, float(getattr(router, "router_jitter_noise", 0.0) or 0.0))
    kwargs = dict(score=score, normalize=bool(read(adapter.normalize)), scale=float(read(adapter.scale)),
                  choose_by=adapter.choose_by, group_score=adapter.group_score,
                  denominator_eps=adapter.denominator_eps, denominator_min=float(read(adapter.denominator_min) or 0.0),
                  on_input=adapter.on_input)
    softcap = read(adapter.softcap)
    kwargs["softcap"] = float(softcap) if softcap else None
    if adapter.bias is not None:
        bias = _get(block, adapter.bias)
        kwargs["bias"] = bias.detach().reshape(-1) if isinstance(bias, torch.Tensor) else None
    if adapter.groups:
        n_group, topk_group = getattr(router, "num_group", None), getattr(router, "topk_group", None)
        if n_group is None or topk_group is None:
            raise _unsupported(block, f"its router {type(router).__name__} has no num_group / topk_group for group-limited routing")
        kwargs["groups"] = (int(n_group), int(topk_group))
    if adapter.hook is not None:
        kwargs = adapter.hook(kwargs, router, block, config)
    try:
        return Gate(num_experts, **kwargs)
    except ValueError as e:
        raise _unsupported(block, f"its routing is outside what softmoe reproduces: {e}") from e


def read_block(block: nn.Module, config: Any, adapter: MoEAdapter) -> BlockParts:
    """The parts of one transformers MoE block (weights are views, copied by the caller)."""
    found = _experts_child(block)
    if found is None:
        raise _unsupported(block, "no fused experts child (3-D gate_up_proj / up_proj and down_proj)")
    _, experts = found
    for name in adapter.must_be_identity:
        child = getattr(block, name, None)
        if child is not None and not isinstance(child, nn.Identity):
            raise _unsupported(block, f"its {name} ({type(child).__name__}) transforms the experts' input or output")
    router, owner = _router(block, adapter)
    weight_name = adapter.router_weight.rpartition(".")[2]
    weight = _param(owner, weight_name)
    parts = _read_experts(block, experts, config, adapter)
    num_experts = parts["w_in"].shape[0]
    if weight.dim() != 2 or weight.shape != (num_experts, parts["w_in"].shape[1]):
        raise _unsupported(block, f"its router weight has shape {list(weight.shape)}, not [{num_experts}, "
                                  f"{parts['w_in'].shape[1]}] (experts x hidden)")
    bias = _param(owner, "bias") if weight_name == "weight" else None
    shared = next((getattr(block, n) for n in _SHARED_NAMES if isinstance(getattr(block, n, None), nn.Module)), None)
    shared_gate = getattr(block, "shared_expert_gate", None)
    if shared_gate is not None and not isinstance(shared_gate, nn.Module):
        shared_gate = None
    combine = _setting(adapter.shared_combine, router, block, config)
    if combine not in ("sum", "average"):
        raise _unsupported(block, f"its shared experts are combined by {combine!r}, not 'sum' or 'average'")
    post_norm = getattr(block, adapter.post_norm, None) if adapter.post_norm else None
    jitter = float(getattr(config, adapter.jitter, 0.0) or 0.0) if adapter.jitter else 0.0
    return BlockParts(
        **parts, router_weight=weight, router_bias=bias,
        router_float32=adapter.router_float32, gate=_gate(block, router, config, adapter, num_experts),
        shared_expert=shared, shared_expert_gate=shared_gate, shared_combine=combine, post_norm=post_norm,
        returns_pair=adapter.returns_pair, jitter_noise=jitter, keeps_input_dtype=True,
    )


# ---- the families ------------------------------------------------------------------------------------


def _cohere2(kwargs: dict, router: nn.Module, block: nn.Module, config: Any) -> dict:
    # A softmax over the top-k logits is the renormalised softmax; sigmoid scores are renormalised
    # only with norm_topk_prob.
    if kwargs["score"] == "softmax":
        return dict(kwargs, normalize=True)
    return dict(kwargs, normalize=bool(getattr(router, "norm_topk_prob", False)))


def _deepseek_v2(kwargs: dict, router: nn.Module, block: nn.Module, config: Any) -> dict:
    if getattr(router, "topk_method", "greedy") == "group_limited_greedy":
        return dict(kwargs, groups=(int(router.num_group), int(router.topk_group)), group_score="max")
    if getattr(router, "topk_method", "greedy") != "greedy":
        raise _unsupported(block, f"its router's topk_method {router.topk_method!r} is not 'greedy' or 'group_limited_greedy'")
    return kwargs


def _axk2(kwargs: dict, router: nn.Module, block: nn.Module, config: Any) -> dict:
    # Group-limited only when the checkpoint has groups; the experts outside them keep a selection
    # score of 0 (not -inf), as in the reference implementation.
    if getattr(router, "num_group", None) is None:
        return kwargs
    return dict(kwargs, groups=(int(router.num_group), int(router.topk_group)), group_fill=0.0)


#: Mixtral's gate: softmax over the experts, renormalised over the chosen ones.
_SOFTMAX = MoEAdapter()
#: Qwen-style: softmax, renormalised when the router's ``norm_topk_prob`` says so.
_SOFTMAX_NORM_ATTR = MoEAdapter(normalize=Attr("norm_topk_prob", False))
#: DeepSeek-V3-style: sigmoid scores, a selection bias on them, renormalised, a routed scaling factor.
_SIGMOID_BIASED = MoEAdapter(score="sigmoid", choose_by="scores", bias="gate.e_score_correction_bias",
                             normalize=Attr("norm_topk_prob", False), scale=Attr("routed_scaling_factor", 1.0),
                             denominator_eps=1e-20, router_float32=True)
#: ... with group-limited choice (the best ``topk_group`` of ``n_group`` groups, scored by their top 2).
_SIGMOID_BIASED_GROUPS = replace(_SIGMOID_BIASED, groups=True)

#: MoE families :func:`softmoe.hf.convert` reproduces, keyed by ``config.model_type``.
MOE_ADAPTERS: dict[str, MoEAdapter] = {
    "mixtral": MoEAdapter(jitter="router_jitter_noise"),
    "minimax": MoEAdapter(jitter="router_jitter_noise"),
    "qwen2_moe": _SOFTMAX_NORM_ATTR,
    "qwen3_moe": _SOFTMAX_NORM_ATTR,
    "qwen3_next": _SOFTMAX_NORM_ATTR,
    "qwen3_5_moe_text": _SOFTMAX,
    "qwen4_exp_text": _SOFTMAX_NORM_ATTR,
    "olmoe": _SOFTMAX_NORM_ATTR,
    "flex_olmo": _SOFTMAX_NORM_ATTR,
    "mellum": _SOFTMAX_NORM_ATTR,
    "jamba": MoEAdapter(normalize=False),
    "hunyuan_v1_moe": MoEAdapter(router_weight="wg.weight", router_float32=True),
    # Granite-MoE and gpt-oss take a softmax over the top-k logits: the renormalised softmax.
    "granitemoe": _SOFTMAX,
    "granitemoe_swa": _SOFTMAX,
    "granitemoeshared": _SOFTMAX,
    "granitemoehybrid": _SOFTMAX,
    "gpt_oss": MoEAdapter(returns_pair=True),
    "cohere2_moe": MoEAdapter(score=Attr("expert_selection_fn", "softmax"), hook=_cohere2,
                              shared_combine=Attr("shared_expert_combination_strategy", "sum")),
    "ernie4_5_moe": MoEAdapter(choose_by="scores", bias="gate.moe_statics.e_score_correction_bias",
                               denominator_min=Attr("norm_min", 0.0), router_float32=True),
    "deepseek_v2": MoEAdapter(normalize=False, scale=Attr("routed_scaling_factor", 1.0), hook=_deepseek_v2,
                              router_float32=True),
    "deepseek_v3": _SIGMOID_BIASED_GROUPS,
    "glm4_moe": _SIGMOID_BIASED_GROUPS,
    "dots1": _SIGMOID_BIASED_GROUPS,
    "exaone_moe": _SIGMOID_BIASED_GROUPS,
    "kimi_linear": _SIGMOID_BIASED_GROUPS,
    "bailing_hybrid": _SIGMOID_BIASED_GROUPS,
    "axk1": replace(_SIGMOID_BIASED_GROUPS, post_norm="post_mlp_layernorm"),
    "nemotron_h": replace(_SIGMOID_BIASED_GROUPS, must_be_identity=("fc1_latent_proj", "fc2_latent_proj")),
    "deepseek_v32": _SIGMOID_BIASED_GROUPS,
    "glm4_moe_lite": _SIGMOID_BIASED_GROUPS,
    "glm_moe_dsa": _SIGMOID_BIASED_GROUPS,
    "solar_open": _SIGMOID_BIASED_GROUPS,
    "mimo_v2_flash": _SIGMOID_BIASED_GROUPS,
    "hy_v4": _SIGMOID_BIASED_GROUPS,
    "dots3_note_text": _SIGMOID_BIASED_GROUPS,
    "beam": _SIGMOID_BIASED_GROUPS,  # its scaling factor is on the block, applied after the experts
    "flint": MoEAdapter(score="sigmoid", normalize=Attr("norm_topk_prob", False), router_float32=True),
    "axk2": replace(_SIGMOID_BIASED, hook=_axk2),
    "minimax_m3_vl_text": MoEAdapter(score="sigmoid", choose_by="scores", bias="gate.e_score_correction_bias",
                                     scale=Attr("routed_scaling_factor", 1.0)),
    "inkling2_text": MoEAdapter(score=Attr("scoring_func", "sigmoid"), choose_by="scores", bias="gate.e_score_correction_bias",
                                denominator_eps=1e-20, scale=Attr("routed_scaling_factor", 1.0), router_float32=True),
    "minimax_m2": MoEAdapter(score="sigmoid", choose_by="scores", bias="e_score_correction_bias", jitter="router_jitter_noise"),
    "hy_v3": MoEAdapter(score="sigmoid", choose_by="scores", bias="e_score_correction_bias", denominator_eps=1e-20,
                        scale=Attr("router_scaling_factor", 1.0), router_float32=True),
    "afmoe": MoEAdapter(score="sigmoid", choose_by="scores", bias="expert_bias", denominator_eps=1e-20,
                        scale=Attr("route_scale", 1.0), router_weight="gate.weight", router_float32=True),
    "lfm2_moe": MoEAdapter(score="sigmoid", choose_by="scores", bias="expert_bias", normalize=Attr("norm_topk_prob", False),
                           denominator_eps=1e-6, scale=Attr("routed_scaling_factor", 1.0)),
    "kolibri1": MoEAdapter(score="sigmoid", bias="gate.e_score_correction_bias", normalize=Attr("norm_topk_prob", False),
                           router_float32=True),
    "laguna": MoEAdapter(score="sigmoid", choose_by="scores", bias="gate.e_score_correction_bias",
                         softcap=Attr("router_logit_softcapping", None), scale=Attr("routed_scaling_factor", 1.0)),
    "phimoe": MoEAdapter(score="sparsemixer", normalize=False, jitter="input_jitter_noise"),
    "llama4_text": MoEAdapter(score="sigmoid", normalize=False, on_input=True, experts_transposed=True,
                              returns_pair=True),
}

#: MoE families :func:`softmoe.hf.convert` does not reproduce, and why.
MOE_UNSUPPORTED: dict[str, str] = {
    "longcat_flash": "zero-computation (identity) experts chosen by the router",
    "zaya": "an MLP router that carries its state from layer to layer, with a skip expert",
    "inkling_text": "shared experts weighted jointly with the chosen ones (a softmax over the log-sigmoid scores of "
                    "both, from one router)",
    "doge": "retrieval experts (one-neuron experts in embedding tables, chosen by product keys)",
    "jetmoe": "experts in input_linear / output_linear modules with a shared output bias, and mixture-of-attention "
              "heads routed like experts",
    "deepseek_v4": "hash routing of the first layers (experts chosen by token id) and a sqrt-softplus gate",
}

#: Dense architectures :func:`softmoe.hf.upcycle` supports, keyed by ``config.model_type``.
DENSE_ADAPTERS: dict[str, DenseAdapter] = {
    "llama": DenseAdapter("LlamaMLP", "gated"),
    "qwen2": DenseAdapter("Qwen2MLP", "gated"),
    "gpt2": DenseAdapter("GPT2MLP", "conv1d", act="activation_function", dropout="resid_pdrop"),
}


def fused_activation(act: str | Callable, gated: bool) -> str | None:
    """``"swiglu"`` / ``"gelu"`` when softmoe's fused expert op computes this activation exactly."""
    if isinstance(act, str):
        act = ACT2FN[act]
    name = type(act).__name__
    if gated and (act is torch.nn.functional.silu or name in ("SiLU", "SiLUActivation")):
        return "swiglu"
    if not gated and (name == "GELUActivation" and getattr(act, "act", None) is torch.nn.functional.gelu
                      or name == "GELU" and getattr(act, "approximate", "none") == "none"):
        return "gelu"
    return None


def top_k_of(config: Any, adapter: MoEAdapter) -> float:
    value = getattr(config, adapter.top_k, None)
    if isinstance(value, (list, tuple)) and value:
        value = sum(value) / len(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise NotImplementedError(f"softmoe.hf: config.{adapter.top_k} = {value!r} is not a number of experts per token")
    return float(value)
