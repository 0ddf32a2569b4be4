"""The bad-input table: every public entry point x every class of bad argument.

``CASES`` below is the single source of ``docs/bad_inputs.md``; regenerate the markdown with
``python tests/test_bad_inputs.py --write`` after changing it (``test_markdown_is_up_to_date`` fails
until then). Every case states what the call does: the exception type and the start of its message
(``Raises``) or the documented result (``Returns``, with a check over the returned value ``out``).
A case with ``bug`` set is a reported problem: the table pins today's behaviour and says what is
wrong with it, so a fix makes the case fail until the table is updated.

The cases run in a subprocess (all of them in one, restarted after a crash), so a segfault or an
abort in the compiled code fails the case that caused it instead of killing pytest.
"""
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from typing import Union

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "bad_inputs.md")

KINDS = ("type", "dtype", "device", "shape", "range", "NaN/inf", "empty")


@dataclasses.dataclass(frozen=True)
class Raises:
    exc: str  # the exception class name
    prefix: str  # str(exception) starts with this
    contains: str = ""  # and contains this (the rule, where the message quotes a variable part such as a path first)


@dataclasses.dataclass(frozen=True)
class Returns:
    what: str  # the documented result, in words
    check: str  # a Python expression over `out` (the call's value) and `warned` (warning messages)


@dataclasses.dataclass(frozen=True)
class NotApplicable:
    why: str


@dataclasses.dataclass(frozen=True)
class Case:
    api: str
    kind: str
    arg: str  # what is bad, in words
    call: str  # a Python expression evaluated after SETUP
    expect: Union[Raises, Returns, NotApplicable]
    bug: str = ""  # non-empty: a reported problem (see the module docstring)

    @property
    def id(self) -> str:
        return f"{self.api} | {self.kind} | {self.arg}"


# Names available to the calls (a fresh random state per case: torch.manual_seed(0) before each).
SETUP = textwrap.dedent(
    """
    import math, warnings
    import torch
    import softmoe
    from softmoe import soft_topk, SoftMoELayer, GlobalBudget, dispatch_plan, gather_rows, combine_rows, grouped_mm, expert_ffn
    from softmoe.ops import matmul
    from softmoe.baselines import TopKMoE, SlotSoftMoE
    nan, inf = math.nan, math.inf

    def scores(*shape):  # [3, 8] router scores by default
        return torch.randn(*(shape or (3, 8)))

    def rows(*r):
        return torch.tensor(r)

    def weights():  # [4, 8] routing weights with at most 3 nonzeros per token
        return soft_topk(torch.randn(4, 8), 1.5, eps=0.05, max_active=3)

    def plan(p=None, m=3):  # the plan of weights(): T = 4, E = 8, M = 3, P = 12 slots
        return dispatch_plan(weights() if p is None else p, m)

    def layer(**kw):  # d_model 8, d_hidden 16, 4 experts, k = 2 (max_active 4)
        return SoftMoELayer(8, 16, 4, **kw)

    def offs(*o):
        return torch.tensor(o)

    def autocast(dtype, fn):  # fn() under CPU autocast at `dtype`: torch.autocast accepts bfloat16 and
        # float16 only (it warns and disables itself otherwise), torch.set_autocast_dtype any dtype
        if dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dtype):
                return fn()
        torch.set_autocast_dtype("cpu", dtype)
        torch.set_autocast_enabled("cpu", True)
        try:
            return fn()
        finally:
            torch.set_autocast_enabled("cpu", False)
            torch.set_autocast_dtype("cpu", torch.bfloat16)

    def forward(module, x):  # the output, with the module attached for checks (aux_loss)
        out = module(x)
        out.module = module
        return out

    def hf():  # softmoe.hf, imported on first use: only its rows pay for importing transformers
        import softmoe.hf
        return softmoe.hf

    def tiny(arch="mixtral", **config):  # a 1-layer causal LM: Mixtral (4 experts, top-2), Qwen2-MoE or Llama (dense)
        import transformers
        common = dict(vocab_size=64, hidden_size=16, num_attention_heads=2, num_key_value_heads=1,
                      num_hidden_layers=1, max_position_embeddings=32)
        common.update(config)
        if arch == "mixtral":
            cfg = transformers.MixtralConfig(**common, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)
        elif arch == "qwen2_moe":
            cfg = transformers.Qwen2MoeConfig(**common, intermediate_size=24, moe_intermediate_size=16,
                                              shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
        else:
            cfg = transformers.LlamaConfig(**common, intermediate_size=32)
        return transformers.AutoModelForCausalLM.from_config(cfg)

    def saved(model):  # a fresh directory holding model.save_pretrained (None: an empty directory)
        import atexit, shutil, tempfile
        path = tempfile.mkdtemp(prefix="softmoe-bad-inputs-")
        atexit.register(shutil.rmtree, path, True)
        if model is not None:
            model.save_pretrained(path)
        return path
    """
)

ST, L, LF, GB, DP, GR, CR, GM, EF, MM, TK, TKF, SL, SLF, HC, HU, HP, HR, HT = (
    "softmoe.soft_topk",
    "SoftMoELayer(...)",
    "SoftMoELayer.forward",
    "GlobalBudget(...)",
    "softmoe.dispatch_plan",
    "softmoe.gather_rows",
    "softmoe.combine_rows",
    "softmoe.grouped_mm",
    "softmoe.expert_ffn",
    "softmoe.ops.matmul",
    "baselines.TopKMoE(...)",
    "baselines.TopKMoE.forward",
    "baselines.SlotSoftMoE(...)",
    "baselines.SlotSoftMoE.forward",
    "softmoe.hf.convert",
    "softmoe.hf.upcycle",
    "softmoe.hf.from_pretrained",
    "softmoe.hf.layers / budget / allocation / stats / format_stats",
    "softmoe.hf.routing_parameters / train_routing_only",
)
APIS = (ST, L, LF, GB, DP, GR, CR, GM, EF, MM, TK, TKF, SL, SLF, HC, HU, HP, HR, HT)
HF_APIS = (HC, HU, HP, HR, HT)  # need transformers: skipped without it

R, V, NA = Raises, Returns, NotApplicable
FLOATS = "float32, float64, bfloat16 or float16"
FLOATS_OR_NONE = "float32, float64, bfloat16, float16 or None"
NAN_ROW = "that row of `p` is NaN, every other row is unaffected (no device sync)"

CASES = [
    # ---- softmoe.soft_topk --------------------------------------------------------------------
    Case(ST, "type", "scores is a list", "soft_topk([[0.1, 0.2]], 1.0)",
         R("TypeError", "soft_topk: scores must be a torch.Tensor, got list")),
    Case(ST, "type", "strict is a str", "soft_topk(scores(), 2.0, strict='no')",
         R("TypeError", "soft_topk: strict must be a bool, got str")),
    Case(ST, "type", "k is a str", "soft_topk(scores(), '2')",
         R("TypeError", "soft_topk: k must be a float or a Tensor, got str")),
    Case(ST, "type", "k is a bool", "soft_topk(scores(), True)",
         R("TypeError", "soft_topk: k must be a float or a Tensor, got bool")),
    Case(ST, "type", "alpha is None", "soft_topk(scores(), 2.0, None)",
         R("TypeError", "soft_topk: alpha must be a float or a Tensor, got NoneType")),
    Case(ST, "type", "eps is a Tensor", "soft_topk(scores(), 2.0, eps=torch.tensor(0.1))",
         R("TypeError", "soft_topk: eps must be a float, got Tensor")),
    Case(ST, "type", "dim is a float", "soft_topk(scores(), 2.0, dim=1.0)",
         R("TypeError", "soft_topk: dim must be an int, got float")),
    Case(ST, "type", "max_active is a float", "soft_topk(scores(), 1.5, max_active=2.0)",
         R("TypeError", "soft_topk: max_active must be an int or None, got float")),
    Case(ST, "dtype", "int64 scores", "soft_topk(scores().long(), 2.0)",
         R("TypeError", f"soft_topk: scores must be {FLOATS}, got torch.int64")),
    Case(ST, "dtype", "complex64 scores", "soft_topk(scores().to(torch.complex64), 2.0)",
         R("TypeError", f"soft_topk: scores must be {FLOATS}, got torch.complex64")),
    Case(ST, "dtype", "integer k tensor", "soft_topk(scores(), torch.tensor(2))",
         R("TypeError", "soft_topk: k must be a floating-point tensor, got torch.int64")),
    Case(ST, "dtype", "integer alpha tensor", "soft_topk(scores(), 2.0, torch.tensor(1))",
         R("TypeError", "soft_topk: alpha must be a floating-point tensor, got torch.int64")),
    Case(ST, "dtype", "k tensor float64, scores bfloat16",
         "soft_topk(scores().bfloat16(), torch.tensor(2.0, dtype=torch.float64))",
         V("accepted: k and alpha are converted to the math type; `p` is bfloat16",
           "out.dtype == torch.bfloat16 and bool((out.float().sum(-1) - 2).abs().max() < 0.05)")),
    Case(ST, "device", "k on meta, scores on cpu", "soft_topk(scores(), torch.tensor(2.0, device='meta'))",
         R("ValueError", "soft_topk: k must be on the device of scores (cpu), got meta")),
    Case(ST, "device", "alpha on meta, scores on cpu", "soft_topk(scores(), 2.0, torch.tensor(1.0, device='meta'))",
         R("ValueError", "soft_topk: alpha must be on the device of scores (cpu), got meta")),
    Case(ST, "device", "scores on meta, k a cpu tensor", "soft_topk(scores().to('meta'), torch.tensor(2.0))",
         R("ValueError", "soft_topk: k must be on the device of scores (meta), got cpu")),
    Case(ST, "device", "scores on meta, k a float", "soft_topk(scores().to('meta'), 2.0)",
         V("a meta tensor of the shape of scores (shape propagation only)",
           "out.device.type == 'meta' and tuple(out.shape) == (3, 8)")),
    Case(ST, "shape", "0-d scores", "soft_topk(torch.tensor(1.0), 0.5)",
         R("ValueError", "soft_topk: scores must have at least one dimension (the experts), got a 0-d tensor")),
    Case(ST, "shape", "k tensor of the wrong shape", "soft_topk(scores(), torch.full((2,), 2.0))",
         R("ValueError", "soft_topk: k must be a scalar or have the shape of scores without dim ((3,)), got shape (2,)")),
    Case(ST, "shape", "alpha tensor of the shape of scores", "soft_topk(scores(), 2.0, torch.ones(3, 8))",
         R("ValueError", "soft_topk: alpha must be a scalar or have the shape of scores without dim ((3,)), got "
                         "shape (3, 8)")),
    Case(ST, "shape", "dim out of range", "soft_topk(scores(), 2.0, dim=2)",
         R("ValueError", "soft_topk: dim must be in [-2, 1] for a 2-d tensor, got 2")),
    Case(ST, "range", "k = 0 (a float)", "soft_topk(scores(), 0.0)",
         R("ValueError", "soft_topk: k must satisfy 0 < k < max_active (= 8, the number of candidates), got 0.0")),
    Case(ST, "range", "k = E", "soft_topk(scores(), 8.0)",
         R("ValueError", "soft_topk: k must satisfy 0 < k < max_active (= 8, the number of candidates), got 8.0")),
    Case(ST, "range", "k < 0", "soft_topk(scores(), -1.0)",
         R("ValueError", "soft_topk: k must satisfy 0 < k < max_active")),
    Case(ST, "range", "k = max_active", "soft_topk(scores(), 2.0, max_active=2)",
         R("ValueError", "soft_topk: k must satisfy 0 < k < max_active (= 2, the number of candidates), got 2.0")),
    Case(ST, "range", "alpha = 0", "soft_topk(scores(), 2.0, 0.0)",
         R("ValueError", "soft_topk: alpha must be a finite number > 0, got 0.0")),
    Case(ST, "range", "alpha < 0", "soft_topk(scores(), 2.0, -1.0)",
         R("ValueError", "soft_topk: alpha must be a finite number > 0, got -1.0")),
    Case(ST, "range", "eps = 0.5", "soft_topk(scores(), 2.0, eps=0.5)",
         R("ValueError", "soft_topk: eps must satisfy 0 <= eps < 0.5, got 0.5")),
    Case(ST, "range", "eps < 0", "soft_topk(scores(), 2.0, eps=-0.1)",
         R("ValueError", "soft_topk: eps must satisfy 0 <= eps < 0.5, got -0.1")),
    Case(ST, "range", "max_active = 0", "soft_topk(scores(), 1.5, max_active=0)",
         R("ValueError", "soft_topk: max_active must satisfy ceil(k) = 2 <= max_active <= 8 (the number of experts), "
                         "got 0")),
    Case(ST, "range", "max_active > E", "soft_topk(scores(), 1.5, max_active=9)",
         R("ValueError", "soft_topk: max_active must satisfy ceil(k) = 2 <= max_active <= 8")),
    Case(ST, "range", "max_active < ceil(k)", "soft_topk(scores(), 2.5, max_active=2)",
         R("ValueError", "soft_topk: max_active must satisfy ceil(k) = 3 <= max_active")),
    Case(ST, "range", "a k tensor with one row's k > m", "soft_topk(scores(), torch.tensor([1.0, 9.0, 2.0]))",
         V(NAN_ROW, "bool(out[1].isnan().all()) and not bool(out[[0, 2]].isnan().any())")),
    Case(ST, "range", "the same with strict=True", "soft_topk(scores(), torch.tensor([1.0, 9.0, 2.0]), strict=True)",
         R("ValueError", "soft_topk: row (1,) of scores produced NaN because k = 9.0 is outside [0, number of "
                         "candidates] (strict=True)")),
    Case(ST, "range", "a k tensor exactly 0 / exactly m (the limits)", "soft_topk(scores(), torch.tensor([0.0, 8.0, 2.0]))",
         V("allowed: `p = 0` for k = 0, `p = 1` on the candidates for k = m (zero gradients)",
           "bool((out[0] == 0).all()) and bool((out[1] == 1).all())")),
    Case(ST, "range", "an alpha tensor with one row's alpha = 0, strict=True",
         "soft_topk(scores(), 2.0, torch.tensor([1.0, 0.0, 1.0]), strict=True)",
         R("ValueError", "soft_topk: row (1,) of scores produced NaN because alpha = 0.0 is not a finite number > 0 "
                         "(strict=True)")),
    Case(ST, "range", "an alpha tensor with one row's alpha = 1e-39 (float32: 1 / alpha overflows), strict=True",
         "soft_topk(scores(), 2.0, torch.tensor([1.0, 1e-39, 1.0]), strict=True)",
         R("ValueError", "soft_topk: row (1,) of scores produced NaN because alpha = 1.0000002153053333e-39 is so small "
                         "that 1 / alpha overflows torch.float32 (strict=True)")),
    Case(ST, "range", "float64: an alpha so large that the threshold overflows (k = 1.2e-38, alpha = 4e306)",
         "soft_topk(scores().double(), 1.2e-38, 4e306)",
         V("every such row of `p` is NaN, as for an infinite alpha (the threshold `s - alpha * tau` "
           "passes the float64 range; alpha of about 1e305 and up)", "bool(out.isnan().all())")),
    Case(ST, "range", "float64: that alpha of 4e306 with strict=True", "soft_topk(scores().double(), 1.2e-38, 4e306, strict=True)",
         R("ValueError", "soft_topk: row (0,) of scores produced NaN because alpha = 4e+306 is so large that the "
                         "threshold overflows float64 (strict=True)")),
    Case(ST, "range", "fewer finite scores than a float k", "soft_topk(rows([-inf, -inf, 1.0], [0.0, 1.0, 2.0]), 1.5)",
         V(NAN_ROW + " (k is outside [0, m] for m = 1 candidate)",
           "bool(out[0].isnan().all()) and not bool(out[1].isnan().any())")),
    Case(ST, "NaN/inf", "k = nan", "soft_topk(scores(), nan)",
         R("ValueError", "soft_topk: k must be a finite number with 0 < k < max_active, got nan")),
    Case(ST, "NaN/inf", "k = inf", "soft_topk(scores(), inf)",
         R("ValueError", "soft_topk: k must be a finite number with 0 < k < max_active, got inf")),
    Case(ST, "NaN/inf", "alpha = nan", "soft_topk(scores(), 2.0, nan)",
         R("ValueError", "soft_topk: alpha must be a finite number > 0, got nan")),
    Case(ST, "NaN/inf", "alpha = inf", "soft_topk(scores(), 2.0, inf)",
         R("ValueError", "soft_topk: alpha must be a finite number > 0, got inf")),
    Case(ST, "NaN/inf", "eps = nan", "soft_topk(scores(), 2.0, eps=nan)",
         R("ValueError", "soft_topk: eps must satisfy 0 <= eps < 0.5, got nan")),
    Case(ST, "NaN/inf", "a NaN score", "soft_topk(rows([nan, 1.0, 2.0], [0.0, 1.0, 2.0]), 1.0)",
         V(NAN_ROW, "bool(out[0].isnan().all()) and abs(float(out[1].sum()) - 1) < 1e-5")),
    Case(ST, "NaN/inf", "a NaN score, strict=True", "soft_topk(rows([nan, 1.0, 2.0], [0.0, 1.0, 2.0]), 1.0, strict=True)",
         R("ValueError", "soft_topk: row (0,) of scores produced NaN because its scores contain NaN (strict=True)")),
    Case(ST, "NaN/inf", "a +inf score", "soft_topk(rows([inf, 1.0, 2.0], [0.0, 1.0, 2.0]), 1.0)",
         V(NAN_ROW, "bool(out[0].isnan().all()) and abs(float(out[1].sum()) - 1) < 1e-5")),
    Case(ST, "NaN/inf", "a +inf score, strict=True", "soft_topk(rows([inf, 1.0, 2.0], [0.0, 1.0, 2.0]), 1.0, strict=True)",
         R("ValueError", "soft_topk: row (0,) of scores produced NaN because its scores contain +inf (strict=True)")),
    Case(ST, "NaN/inf", "a -inf score", "soft_topk(rows([-inf, 1.0, 2.0]), 1.0)",
         V("allowed: that entry is never selected (`p` exactly 0), the row sums to k",
           "float(out[0, 0]) == 0 and abs(float(out.sum()) - 1) < 1e-5")),
    Case(ST, "NaN/inf", "a row of -inf only", "soft_topk(rows([-inf, -inf, -inf], [0.0, 1.0, 2.0]), 1.0)",
         V(NAN_ROW + " (no candidates)", "bool(out[0].isnan().all()) and not bool(out[1].isnan().any())")),
    Case(ST, "NaN/inf", "finite scores whose differences overflow (+-3e38), integer k",
         "soft_topk(rows([3e38, -3e38, -3e38]), 1.0)",
         V("allowed: `p` = [1, 0, 0] (was [1, NaN, NaN] before the fix of the overflowing gap)",
           "out.tolist() == [[1.0, 0.0, 0.0]]")),
    Case(ST, "NaN/inf", "alpha = 1e38 (the threshold leaves the float range), backward",
         "(lambda s: ((soft_topk(s, 0.5, 1e38) * torch.arange(4.0)).sum().backward(), s.grad)[1])"
         "(torch.randn(4, requires_grad=True))",
         V("finite gradients (were NaN before the backward divided in double)", "bool(out.isfinite().all())")),
    Case(ST, "NaN/inf", "a NaN k tensor", "soft_topk(scores(), torch.tensor(nan))",
         V("every row of `p` is NaN (k is broadcast)", "bool(out.isnan().all())")),
    Case(ST, "empty", "no rows: scores [0, 8]", "soft_topk(torch.empty(0, 8), 2.0)",
         V("an empty `p` [0, 8]", "tuple(out.shape) == (0, 8)")),
    Case(ST, "empty", "no experts: scores [3, 0]", "soft_topk(torch.empty(3, 0), 0.5)",
         R("ValueError", "soft_topk: scores must have at least one expert along dim 1, got 0")),
    # ---- SoftMoELayer(...) ---------------------------------------------------------------------
    Case(L, "type", "d_model is a str", "SoftMoELayer('8', 16, 4)", R("TypeError", "SoftMoELayer: d_model must be an int, got str")),
    Case(L, "type", "num_experts is a float", "SoftMoELayer(8, 16, 4.0)",
         R("TypeError", "SoftMoELayer: num_experts must be an int, got float")),
    Case(L, "type", "d_hidden is a bool", "SoftMoELayer(8, True, 4)", R("TypeError", "SoftMoELayer: d_hidden must be an int, got bool")),
    Case(L, "type", "k is a str", "layer(k='2')", R("TypeError", "SoftMoELayer: k must be a float, got str")),
    Case(L, "type", "k is a Tensor", "layer(k=torch.tensor(2.0))",
         R("TypeError", "SoftMoELayer: k must be a float, got Tensor")),
    Case(L, "type", "alpha is None", "layer(alpha=None)", R("TypeError", "SoftMoELayer: alpha must be a float, got NoneType")),
    Case(L, "type", "eps is a str", "layer(eps='0.1')", R("TypeError", "SoftMoELayer: eps must be a float, got str")),
    Case(L, "type", "max_active is a float", "layer(max_active=2.0)",
         R("TypeError", "SoftMoELayer: max_active must be an int or None, got float")),
    Case(L, "type", "k_min is a str", "layer(k_min='0.5')", R("TypeError", "SoftMoELayer: k_min must be a float, got str")),
    Case(L, "type", "k_max is a str", "layer(k_max='3')", R("TypeError", "SoftMoELayer: k_max must be a float, got str")),
    Case(L, "type", "learn_k is a str", "layer(learn_k='no')", R("TypeError", "SoftMoELayer: learn_k must be a bool, got str")),
    Case(L, "type", "unknown combine", "layer(combine='mean')",
         R("ValueError", "SoftMoELayer: combine must be 'normalized', 'sum', 'gate' or 'scaled', got 'mean'")),
    Case(L, "type", "unknown activation", "layer(activation='relu')",
         R("ValueError", "SoftMoELayer: activation must be 'swiglu' or 'gelu', got 'relu'")),
    Case(L, "type", "activation is None", "layer(activation=None)",
         R("TypeError", "SoftMoELayer: activation must be 'swiglu' or 'gelu' (a str), got NoneType")),
    Case(L, "dtype", "dtype=torch.int64", "layer(dtype=torch.int64)",
         R("TypeError", f"SoftMoELayer: dtype must be {FLOATS_OR_NONE}, got torch.int64")),
    Case(L, "dtype", "dtype=torch.complex64", "layer(dtype=torch.complex64)",
         R("TypeError", f"SoftMoELayer: dtype must be {FLOATS_OR_NONE}, got torch.complex64")),
    Case(L, "dtype", "dtype is a str", "layer(dtype='float32')",
         R("TypeError", "SoftMoELayer: dtype must be a torch.dtype or None, got str")),
    Case(L, "dtype", "dtype=torch.float64", "layer(dtype=torch.float64)",
         V("a float64 layer", "out.router.weight.dtype == torch.float64")),
    Case(L, "device", "device='meta'", "layer(device='meta')",
         V("a layer on meta (shapes only)", "out.router.weight.device.type == 'meta'")),
    Case(L, "device", "an unknown device string", "layer(device='nonsense')",
         R("RuntimeError", "Expected one of cpu, cuda")),
    Case(L, "shape", "-", "None", NA("no tensor arguments (sizes are ints: see range)")),
    Case(L, "range", "d_model = 0", "SoftMoELayer(0, 16, 4)",
         R("ValueError", "SoftMoELayer: d_model must be an int >= 1, got 0")),
    Case(L, "range", "num_experts = 0", "SoftMoELayer(8, 16, 0)",
         R("ValueError", "SoftMoELayer: num_experts must be an int >= 1, got 0")),
    Case(L, "range", "k = num_experts", "layer(k=4.0)",
         R("ValueError", "SoftMoELayer: k must satisfy 0 < k < num_experts (= 4), got 4.0")),
    Case(L, "range", "k = 0", "layer(k=0.0)", R("ValueError", "SoftMoELayer: k must satisfy 0 < k < num_experts (= 4), got 0.0")),
    Case(L, "range", "alpha = 0", "layer(alpha=0.0)", R("ValueError", "SoftMoELayer: alpha must be a finite number > 0, got 0.0")),
    Case(L, "range", "eps = 0", "layer(eps=0.0)",
         R("ValueError", "SoftMoELayer: eps must be > 0 so that routing has exact zeros (got 0)")),
    Case(L, "range", "eps = 0.5", "layer(eps=0.5)", R("ValueError", "SoftMoELayer: eps must satisfy 0 <= eps < 0.5, got 0.5")),
    Case(L, "range", "max_active < ceil(k)", "layer(max_active=1)",
         R("ValueError", "SoftMoELayer: max_active must satisfy ceil(k) = 2 <= max_active <= 4 (the number of experts), "
                         "got 1")),
    Case(L, "range", "max_active > num_experts", "layer(max_active=5)",
         R("ValueError", "SoftMoELayer: max_active must satisfy ceil(k) = 2 <= max_active <= 4")),
    Case(L, "range", "k_min >= k", "layer(k_min=2.5)",
         R("ValueError", "SoftMoELayer: need 0 < k_min < k < k_max < max_active, got k_min=2.5, k=2.0")),
    Case(L, "range", "k_max >= max_active", "layer(k_max=4.0)",
         R("ValueError", "SoftMoELayer: need 0 < k_min < k < k_max < max_active, got k_min=1.0, k=2.0, k_max=4.0")),
    Case(L, "NaN/inf", "k = nan", "layer(k=nan)", R("ValueError", "SoftMoELayer: k must satisfy 0 < k < num_experts (= 4), got nan")),
    Case(L, "range", "both k and active", "layer(k=1.5, active=1.5)",
         R("ValueError", "SoftMoELayer: give k (with k_min / k_max) or active, not both: with active the layer steers its own k")),
    Case(L, "range", "active >= max_active", "layer(active=3.0, max_active=3)",
         R("ValueError", "SoftMoELayer: active must satisfy 1 <= active < max_active (= 3), or active = max_active = 1, got 3.0")),
    Case(L, "range", "active < 1", "layer(active=0.5)",
         R("ValueError", "SoftMoELayer: active must satisfy 1 <= active < max_active (= 3), or active = max_active = 1, got 0.5")),
    Case(L, "NaN/inf", "active = nan", "layer(active=nan)",
         R("ValueError", "SoftMoELayer: active must satisfy 1 <= active < max_active")),
    Case(L, "type", "active is a str", "layer(active='1.5')", R("TypeError", "SoftMoELayer: active must be a float, got str")),
    Case(L, "range", "lb_coef < 0", "layer(lb_coef=-1.0)", R("ValueError", "SoftMoELayer: lb_coef must be a finite number >= 0, got -1.0")),
    Case(L, "NaN/inf", "count_gain = inf", "layer(active=1.5, count_gain=inf)",
         R("ValueError", "SoftMoELayer: count_gain must be a finite number >= 0, got inf")),
    Case(L, "NaN/inf", "alpha = inf", "layer(alpha=inf)", R("ValueError", "SoftMoELayer: alpha must be a finite number > 0, got inf")),
    Case(L, "NaN/inf", "eps = nan", "layer(eps=nan)", R("ValueError", "SoftMoELayer: eps must satisfy 0 <= eps < 0.5, got nan")),
    Case(L, "NaN/inf", "k_min = nan", "layer(k_min=nan)",
         R("ValueError", "SoftMoELayer: need 0 < k_min < k < k_max < max_active, got k_min=nan")),
    Case(L, "empty", "a single expert, k < 1", "SoftMoELayer(8, 16, 1, k=0.5)",
         V("allowed (max_active = 1)", "out.max_active == 1")),
    Case(L, "empty", "a single expert, default k = 2", "SoftMoELayer(8, 16, 1)",
         R("ValueError", "SoftMoELayer: k must satisfy 0 < k < num_experts (= 1), got 2.0")),
    # ---- SoftMoELayer.forward -----------------------------------------------------------------
    Case(LF, "type", "x is a list", "layer()([[0.0] * 8])", R("TypeError", "SoftMoELayer: x must be a torch.Tensor, got list")),
    Case(LF, "dtype", "int64 x", "layer()(torch.zeros(3, 8, dtype=torch.int64))",
         R("TypeError", "SoftMoELayer: x must be a floating-point tensor, got torch.int64")),
    Case(LF, "dtype", "float64 x, float32 layer", "layer()(torch.zeros(3, 8, dtype=torch.float64))",
         R("TypeError", "SoftMoELayer: x must have the layer's dtype torch.float32, got torch.float64")),
    Case(LF, "dtype", "bfloat16 x, float32 layer", "layer()(torch.zeros(3, 8, dtype=torch.bfloat16))",
         R("TypeError", "SoftMoELayer: x must have the layer's dtype torch.float32, got torch.bfloat16")),
    Case(LF, "dtype", "bfloat16 x, float32 layer, under torch.autocast('cpu', torch.bfloat16)",
         "autocast(torch.bfloat16, lambda: layer()(torch.zeros(3, 8, dtype=torch.bfloat16)))",
         V("accepted (as by an nn.Linear under autocast): a bfloat16 output", "out.dtype == torch.bfloat16")),
    Case(LF, "dtype", "float64 x, float32 layer, under torch.autocast (autocast leaves float64 alone)",
         "autocast(torch.bfloat16, lambda: layer()(torch.zeros(3, 8, dtype=torch.float64)))",
         R("TypeError", "SoftMoELayer: x must have the layer's dtype torch.float32, got torch.float64")),
    Case(LF, "dtype", "autocast dtype float8_e4m3fn (torch.set_autocast_dtype)",
         "autocast(torch.float8_e4m3fn, lambda: layer()(torch.zeros(3, 8)))",
         R("TypeError", "softmoe: matmul: the cpu autocast dtype must be torch.bfloat16 or torch.float16")),
    Case(LF, "device", "x on meta, layer on cpu", "layer()(torch.zeros(3, 8, device='meta'))",
         R("ValueError", "SoftMoELayer: x must be on the layer's device cpu, got meta")),
    Case(LF, "device", "layer and x on meta", "layer(device='meta')(torch.zeros(3, 8, device='meta'))",
         V("a meta output of the shape of x (shape propagation only: the plan keeps its fixed shapes)",
           "out.device.type == 'meta' and tuple(out.shape) == (3, 8)")),
    Case(LF, "shape", "wrong last dimension", "layer()(torch.zeros(3, 7))",
         R("ValueError", "SoftMoELayer: x must have last dimension d_model = 8, got shape (3, 7)")),
    Case(LF, "shape", "0-d x", "layer()(torch.tensor(1.0))",
         R("ValueError", "SoftMoELayer: x must have last dimension d_model = 8, got shape ()")),
    Case(LF, "shape", "1-d x [d_model]", "layer()(torch.zeros(8))",
         V("allowed: one token, output [d_model]", "tuple(out.shape) == (8,)")),
    Case(LF, "range", "-", "None", NA("x has no range (see NaN/inf)")),
    Case(LF, "NaN/inf", "a NaN token", "layer()(rows([nan] * 8, [0.5] * 8))",
         V("that token's output is NaN; the other tokens are unaffected",
           "bool(out[0].isnan().all()) and bool(out[1].isfinite().all())")),
    Case(LF, "NaN/inf", "an inf token", "layer()(rows([inf] * 8, [0.5] * 8))",
         V("that token's output is NaN; the other tokens are unaffected",
           "bool(out[0].isnan().all()) and bool(out[1].isfinite().all())")),
    Case(LF, "empty", "no tokens [0, d_model]", "layer()(torch.zeros(0, 8))", V("an empty output [0, d_model]", "tuple(out.shape) == (0, 8)")),
    Case(LF, "empty", "an empty sequence [2, 0, d_model]", "layer()(torch.zeros(2, 0, 8))",
         V("an empty output [2, 0, d_model]", "tuple(out.shape) == (2, 0, 8)")),
    # ---- GlobalBudget(...) ------------------------------------------------------------------------
    Case(GB, "type", "layers is one layer, not a list", "GlobalBudget(layer(), 2.0)",
         R("TypeError", "GlobalBudget: layers must be a list of SoftMoELayer, got a single SoftMoELayer (pass [layer])")),
    Case(GB, "type", "layers is None", "GlobalBudget(None, 2.0)",
         R("TypeError", "GlobalBudget: layers must be a list of SoftMoELayer, got NoneType")),
    Case(GB, "type", "layers is a str", "GlobalBudget('ab', 2.0)",
         R("TypeError", "GlobalBudget: layers must be a list of SoftMoELayer, got str")),
    Case(GB, "type", "layers is a ModuleList", "GlobalBudget(torch.nn.ModuleList([layer(), layer()]), 2.0)",
         V("accepted (any iterable of SoftMoELayer)", "out.num_layers == 2")),
    Case(GB, "type", "a layer is not a SoftMoELayer", "GlobalBudget([torch.nn.Linear(2, 2)], 2.0)",
         R("TypeError", "GlobalBudget: layers[0] must be a SoftMoELayer, got Linear")),
    Case(GB, "type", "mean_k is a str", "GlobalBudget([layer()], '2')", R("TypeError", "GlobalBudget: mean_k must be a float, got str")),
    Case(GB, "type", "k_min is None", "GlobalBudget([layer()], 2.0, k_min=None)",
         R("TypeError", "GlobalBudget: k_min must be a float, got NoneType")),
    Case(GB, "type", "mean_k is a bool", "GlobalBudget([layer()], True)", R("TypeError", "GlobalBudget: mean_k must be a float, got bool")),
    Case(GB, "dtype", "-", "None", NA("no tensor arguments")),
    Case(GB, "device", "-", "None", NA("no tensor arguments (theta is created on the CPU; move the model with .to())")),
    Case(GB, "shape", "-", "None", NA("no tensor arguments")),
    Case(GB, "range", "mean_k >= k_max", "GlobalBudget([layer()], 3.5)",
         R("ValueError", "GlobalBudget: mean_k must satisfy k_min (= 1.0) < mean_k < k_max (= 3.0, the smallest layer "
                         "cap max_active - 1), got 3.5")),
    Case(GB, "range", "mean_k <= k_min", "GlobalBudget([layer()], 1.0)",
         R("ValueError", "GlobalBudget: mean_k must satisfy k_min (= 1.0) < mean_k < k_max (= 3.0")),
    Case(GB, "range", "k_min <= 0", "GlobalBudget([layer()], 2.0, k_min=0.0)",
         R("ValueError", "GlobalBudget: k_min must satisfy 0 < k_min < k_max (= 3.0), got 0.0")),
    Case(GB, "range", "a layer already attached to a budget", "(lambda l: (GlobalBudget([l], 2.0), GlobalBudget([l], 2.0)))(layer())",
         R("ValueError", "GlobalBudget: layers[0] is already attached to a GlobalBudget")),
    Case(GB, "NaN/inf", "mean_k = nan", "GlobalBudget([layer()], nan)",
         R("ValueError", "GlobalBudget: mean_k must satisfy k_min (= 1.0) < mean_k < k_max (= 3.0")),
    Case(GB, "NaN/inf", "mean_k = inf", "GlobalBudget([layer()], inf)",
         R("ValueError", "GlobalBudget: mean_k must satisfy k_min (= 1.0) < mean_k < k_max (= 3.0")),
    Case(GB, "NaN/inf", "k_min = nan", "GlobalBudget([layer()], 2.0, k_min=nan)",
         R("ValueError", "GlobalBudget: k_min must satisfy 0 < k_min < k_max (= 3.0), got nan")),
    Case(GB, "empty", "no layers", "GlobalBudget([], 2.0)", R("ValueError", "GlobalBudget: layers must hold at least one SoftMoELayer")),
    Case(GB, "range", "both mean_k and mean_active", "GlobalBudget([layer(active=1.5)], 1.5, mean_active=1.5)",
         R("ValueError", "GlobalBudget: give exactly one of mean_k (soft count) and mean_active (realised active experts per token)")),
    Case(GB, "range", "mean_active with soft-count layers", "GlobalBudget([layer()], mean_active=1.5)",
         R("ValueError", "GlobalBudget: layers[0] was built with a soft count k; a budget in mean_active needs layers built with active=...")),
    Case(GB, "range", "a layer built with another k", "GlobalBudget([layer(k=2.5)], 1.5)",
         R("ValueError", "GlobalBudget: layers[0] was built with k=2.5, but every layer starts at mean_k=1.5 and the budget then sets it")),
    Case(GB, "range", "mean_active >= max_active - 0.25", "GlobalBudget([layer(active=3.9)], mean_active=3.9)",
         R("ValueError", "GlobalBudget: mean_active must satisfy active_min (= 1.0) < mean_active < max_active - 0.25 (= 3.75")),
    Case(GB, "NaN/inf", "mean_active = nan", "GlobalBudget([layer(active=1.5)], mean_active=nan)",
         R("ValueError", "GlobalBudget: mean_active must satisfy active_min (= 1.0) < mean_active")),
    # ---- softmoe.dispatch_plan -----------------------------------------------------------------
    Case(DP, "type", "p is a list", "dispatch_plan([[0.5, 0.0]], 1)", R("TypeError", "dispatch_plan: p must be a torch.Tensor, got list")),
    Case(DP, "type", "max_active is a float", "dispatch_plan(weights(), 2.0)",
         R("TypeError", "dispatch_plan: max_active must be an int, got float")),
    Case(DP, "type", "max_active is a bool", "dispatch_plan(weights(), True)",
         R("TypeError", "dispatch_plan: max_active must be an int, got bool")),
    Case(DP, "dtype", "int64 p", "dispatch_plan(weights().long(), 2)", R("TypeError", f"dispatch_plan: p must be {FLOATS}, got torch.int64")),
    Case(DP, "dtype", "bool p", "dispatch_plan(weights().bool(), 2)", R("TypeError", f"dispatch_plan: p must be {FLOATS}, got torch.bool")),
    Case(DP, "device", "p on meta", "dispatch_plan(weights().to('meta'), 3)",
         V("a plan of meta tensors with the shapes fixed by (T, E, M)",
           "out.offsets.device.type == 'meta' and tuple(out.token_pairs.shape) == (4, 3)")),
    Case(DP, "shape", "0-d p", "dispatch_plan(torch.tensor(1.0), 1)",
         R("ValueError", "dispatch_plan: p must have at least one dimension (the experts), got a 0-d tensor")),
    Case(DP, "shape", "3-d p [2, 2, 8]", "dispatch_plan(weights().reshape(2, 2, 8), 3)",
         V("allowed: the leading dimensions are flattened into T = 4 tokens", "tuple(out.token_pairs.shape) == (4, 3)")),
    Case(DP, "range", "max_active = 0", "dispatch_plan(weights(), 0)",
         R("ValueError", "dispatch_plan: max_active must satisfy 1 <= max_active <= 8 (the number of experts), got 0")),
    Case(DP, "range", "max_active > E", "dispatch_plan(weights(), 9)",
         R("ValueError", "dispatch_plan: max_active must satisfy 1 <= max_active <= 8 (the number of experts), got 9")),
    Case(DP, "range", "more than max_active nonzeros in a row", "dispatch_plan(torch.ones(1, 4), 2)",
         V("the first max_active in expert order are routed, the rest silently not", "out.pair_expert.tolist() == [0, 1]")),
    Case(DP, "NaN/inf", "NaN, +inf and -0.0 weights", "dispatch_plan(rows([nan, -0.0, inf, 0.0]), 3)",
         V("NaN and inf are active (routed), -0.0 is not", "out.pair_expert.tolist() == [0, 2, -1]")),
    Case(DP, "empty", "no tokens: p [0, 8]", "dispatch_plan(torch.zeros(0, 8), 3)",
         V("an empty plan: offsets all 0, token_pairs [0, 3]",
           "out.offsets.tolist() == [0] * 9 and tuple(out.token_pairs.shape) == (0, 3)")),
    Case(DP, "empty", "no experts: p [4, 0]", "dispatch_plan(torch.zeros(4, 0), 1)",
         R("ValueError", "dispatch_plan: p must have at least one expert along its last dimension, got shape (4, 0)")),
    # ---- softmoe.gather_rows ---------------------------------------------------------------------
    Case(GR, "type", "plan is a tuple", "gather_rows(torch.zeros(4, 5), tuple(plan()))",
         R("TypeError", "gather_rows: plan must be the DispatchPlan returned by dispatch_plan, got tuple")),
    Case(GR, "type", "x is a list", "gather_rows([[0.0]], plan())", R("TypeError", "gather_rows: x must be a torch.Tensor, got list")),
    Case(GR, "dtype", "int64 x", "gather_rows(torch.zeros(4, 5, dtype=torch.int64), plan())",
         R("TypeError", f"gather_rows: x must be {FLOATS}, got torch.int64")),
    Case(GR, "dtype", "a forged plan with int32 indices",
         "(lambda pl: gather_rows(torch.zeros(4, 5), pl._replace(pair_token=pl.pair_token.int())))(plan())",
         R("TypeError", "softmoe: gather_rows: pair_token must be an int64 tensor from dispatch_plan, got Int")),
    Case(GR, "dtype", "float64 x, plan from float32 p", "gather_rows(torch.zeros(4, 5, dtype=torch.float64), plan())",
         V("allowed (the plan holds indices only)", "out.dtype == torch.float64 and tuple(out.shape) == (12, 5)")),
    Case(GR, "device", "x on cpu, plan on meta", "gather_rows(torch.arange(20.0).reshape(4, 5), plan(weights().to('meta')))",
         R("RuntimeError", "softmoe: gather_rows: all tensor arguments must be on one device")),
    Case(GR, "device", "x on meta, plan on cpu", "gather_rows(torch.zeros(4, 5, device='meta'), plan())",
         R("RuntimeError", "softmoe: gather_rows: all tensor arguments must be on one device")),
    Case(GR, "shape", "x with the wrong number of tokens", "gather_rows(torch.zeros(3, 5), plan())",
         R("ValueError", "gather_rows: x must hold the plan's 4 tokens ([..., d] flattening to [4, d]), got shape (3, 5)")),
    Case(GR, "shape", "0-d x", "gather_rows(torch.tensor(1.0), plan())",
         R("ValueError", "gather_rows: x must have at least one dimension (the features), got a 0-d tensor")),
    Case(GR, "shape", "x [2, 2, d] for T = 4", "gather_rows(torch.zeros(2, 2, 5), plan())",
         V("allowed: flattened to [4, d]", "tuple(out.shape) == (12, 5)")),
    Case(GR, "shape", "a forged plan with a short pair_token",
         "(lambda pl: gather_rows(torch.zeros(4, 5), pl._replace(pair_token=pl.pair_token[:-1])))(plan())",
         V("accepted as a trimmed plan (DispatchPlan.trim): one row per entry of pair_token, [11, d]",
           "tuple(out.shape) == (11, 5)")),
    Case(GR, "shape", "a forged plan with a long pair_token",
         "(lambda pl: gather_rows(torch.zeros(4, 5), pl._replace(pair_token=torch.cat([pl.pair_token, pl.pair_token[:1]]))))"
         "(plan())",
         R("RuntimeError", "softmoe: gather_rows: pair_token must have at most tokens * max_active = 12 entries")),
    Case(GR, "range", "a forged plan with indices out of range",
         "(lambda pl: gather_rows(torch.zeros(4, 5), pl._replace(pair_token=pl.pair_token + 100)))(plan())",
         R("RuntimeError", "softmoe: gather_rows: pair_token hold an index out of range; pass the tensors of one "
                           "dispatch_plan")),
    Case(GR, "NaN/inf", "NaN features", "gather_rows(torch.full((4, 5), nan), plan())",
         V("copied bit for bit (routed slots NaN, padding slots 0)",
           "bool((out.isnan().all(1) | (out == 0).all(1)).all()) and bool(out.isnan().any())")),
    Case(GR, "empty", "no tokens", "gather_rows(torch.zeros(0, 5), dispatch_plan(torch.zeros(0, 8), 3))",
         V("an empty [0, d]", "tuple(out.shape) == (0, 5)")),
    Case(GR, "empty", "no features: x [4, 0]", "gather_rows(torch.zeros(4, 0), plan())",
         V("an empty [12, 0]", "tuple(out.shape) == (12, 0)")),
    # ---- softmoe.combine_rows ----------------------------------------------------------------------
    Case(CR, "type", "plan is a tuple", "combine_rows(torch.zeros(12, 5), weights(), tuple(plan()))",
         R("TypeError", "combine_rows: plan must be the DispatchPlan returned by dispatch_plan, got tuple")),
    Case(CR, "type", "ys is a list", "combine_rows([[0.0]], weights(), plan())", R("TypeError", "combine_rows: ys must be a torch.Tensor, got list")),
    Case(CR, "type", "p is a list", "combine_rows(torch.zeros(12, 5), [[0.0]], plan())",
         R("TypeError", "combine_rows: p must be a torch.Tensor, got list")),
    Case(CR, "dtype", "int64 ys", "combine_rows(torch.zeros(12, 5, dtype=torch.int64), weights(), plan())",
         R("TypeError", f"combine_rows: ys must be {FLOATS}, got torch.int64")),
    Case(CR, "dtype", "int64 p", "combine_rows(torch.zeros(12, 5), weights().long(), plan())",
         R("TypeError", f"combine_rows: p must be {FLOATS}, got torch.int64")),
    Case(CR, "dtype", "float64 ys, float32 p", "combine_rows(torch.ones(12, 5, dtype=torch.float64), weights(), plan())",
         V("allowed: the math runs in float64, `y` has the dtype of ys", "out.dtype == torch.float64")),
    Case(CR, "device", "p on meta, ys and plan on cpu", "combine_rows(torch.ones(12, 5), weights().to('meta'), plan())",
         R("RuntimeError", "softmoe: combine_rows: all tensor arguments must be on one device")),
    Case(CR, "device", "ys on meta", "combine_rows(torch.ones(12, 5, device='meta'), weights(), plan())",
         R("RuntimeError", "softmoe: combine_rows: all tensor arguments must be on one device")),
    Case(CR, "shape", "1-d ys", "combine_rows(torch.zeros(12), weights(), plan())",
         R("ValueError", "combine_rows: ys must be 2-D [slots, d], got shape (12,)")),
    Case(CR, "shape", "ys with the wrong number of slots", "combine_rows(torch.zeros(11, 5), weights(), plan())",
         R("RuntimeError", "softmoe: combine_rows: ys must have one row per slot of pair_token (12), got shape [11, 5]")),
    Case(CR, "shape", "p with the wrong number of tokens", "combine_rows(torch.zeros(12, 5), weights()[:3], plan())",
         R("ValueError", "combine_rows: p must hold the plan's 4 tokens ([..., E] flattening to [4, E]), got shape (3, 8)")),
    Case(CR, "shape", "p [2, 2, E] for T = 4", "combine_rows(torch.ones(12, 5), weights().reshape(2, 2, 8), plan())",
         V("allowed: y has p's leading shape [2, 2, d]", "tuple(out.shape) == (2, 2, 5)")),
    Case(CR, "shape", "p with fewer experts than max_active", "combine_rows(torch.zeros(12, 5), weights()[:, :2], plan())",
         R("ValueError", "combine_rows: p must have at least the plan's 8 experts along its last dimension, got shape "
                         "(4, 2)")),
    Case(CR, "shape", "p with fewer experts than the plan (but >= max_active)",
         "combine_rows(torch.zeros(12, 5), weights()[:, :6], plan())",
         R("ValueError", "combine_rows: p must have at least the plan's 8 experts along its last dimension, got shape "
                         "(4, 6)")),
    Case(CR, "shape", "p with more experts than the plan", "combine_rows(torch.ones(12, 5), torch.cat([weights()] * 2, 1), plan())",
         V("accepted: only the plan's pairs of p are read", "tuple(out.shape) == (4, 5)")),
    Case(CR, "shape", "0-d p", "combine_rows(torch.zeros(12, 5), torch.tensor(1.0), plan())",
         R("ValueError", "combine_rows: p must have at least one dimension (the experts), got a 0-d tensor")),
    Case(CR, "range", "a forged plan with token_pairs out of range",
         "(lambda pl: combine_rows(torch.zeros(12, 5), weights(), pl._replace(token_pairs=pl.token_pairs + 100)))(plan())",
         R("RuntimeError", "softmoe: combine_rows: token_pairs or pair_expert hold an index out of range; pass the "
                           "tensors of one dispatch_plan")),
    Case(CR, "range", "a forged plan with pair_expert out of range",
         "(lambda pl: combine_rows(torch.zeros(12, 5), weights(), pl._replace(pair_expert=pl.pair_expert + 100)))(plan())",
         R("RuntimeError", "softmoe: combine_rows: token_pairs or pair_expert hold an index out of range")),
    Case(CR, "NaN/inf", "NaN in the routed rows of ys", "combine_rows(torch.full((12, 5), nan), weights(), plan())",
         V("NaN in the tokens that read them", "bool(out.isnan().all())")),
    Case(CR, "NaN/inf", "NaN in the padding rows of ys",
         "(lambda pl: combine_rows(torch.ones(12, 5).index_fill(0, torch.arange(int(pl.offsets[-1]), 12), nan), "
         "weights(), pl))(plan())",
         V("ignored: padding rows are never read", "bool(out.isfinite().all())")),
    Case(CR, "NaN/inf", "NaN weights", "(lambda p: combine_rows(torch.ones(12, 5), torch.full_like(p, nan), plan(p)))(weights())",
         V("NaN in the tokens with a NaN weight", "bool(out.isnan().all())")),
    Case(CR, "empty", "no tokens", "combine_rows(torch.zeros(0, 5), torch.zeros(0, 8), dispatch_plan(torch.zeros(0, 8), 3))",
         V("an empty [0, d]", "tuple(out.shape) == (0, 5)")),
    Case(CR, "empty", "no experts: p [4, 0]", "combine_rows(torch.zeros(12, 5), torch.zeros(4, 0), plan())",
         R("ValueError", "combine_rows: p must have at least the plan's 8 experts along its last dimension, got shape "
                         "(4, 0)")),
    Case(CR, "empty", "no features: ys [12, 0]", "combine_rows(torch.zeros(12, 0), weights(), plan())",
         V("an empty [4, 0]", "tuple(out.shape) == (4, 0)")),
    # ---- softmoe.grouped_mm ----------------------------------------------------------------------
    Case(MM, "type", "a is a list", "matmul([[0.0]], torch.zeros(1, 2))",
         R("TypeError", "matmul: a must be a torch.Tensor, got list")),
    Case(MM, "type", "b is None", "matmul(torch.zeros(2, 3), None)",
         R("TypeError", "matmul: b must be a torch.Tensor, got NoneType")),
    Case(MM, "dtype", "a float32, b float64", "matmul(torch.zeros(2, 3), torch.zeros(3, 4, dtype=torch.float64))",
         R("TypeError", "softmoe: matmul: a and b must have one dtype, got Float and Double")),
    Case(MM, "dtype", "int64 a and b", "matmul(torch.ones(2, 3, dtype=torch.int64), torch.ones(3, 4, dtype=torch.int64))",
         R("TypeError", "softmoe: matmul: a and b must be floating point, got Long")),
    Case(MM, "dtype", "autocast dtype float64 (torch.set_autocast_dtype)",
         "autocast(torch.float64, lambda: matmul(torch.ones(2, 3), torch.ones(3, 4)))",
         R("TypeError", "softmoe: matmul: the cpu autocast dtype must be torch.bfloat16 or torch.float16 (the "
                        "16-bit dtypes the expert and router matmuls run in under torch.autocast), got torch.float64")),
    Case(MM, "device", "b on meta, a on cpu", "matmul(torch.ones(2, 3), torch.ones(3, 4, device='meta'))",
         R("RuntimeError", "softmoe: matmul: all tensor arguments must be on one device")),
    Case(MM, "shape", "1-d b", "matmul(torch.zeros(2, 3), torch.zeros(3))",
         R("RuntimeError", "softmoe: matmul: a and b must be 2-D, got shapes [2, 3] and [3]")),
    Case(MM, "shape", "inner sizes disagree", "matmul(torch.zeros(2, 3), torch.zeros(4, 5))",
         R("RuntimeError", "softmoe: matmul: a has 3 columns but b has 4 rows")),
    Case(MM, "range", "-", "None", NA("no value range (see NaN/inf)")),
    Case(MM, "NaN/inf", "a NaN row of a", "matmul(torch.ones(3, 4).index_fill(0, torch.tensor([1]), nan), torch.ones(4, 2))",
         V("NaN in that row of the product only", "bool(out[1].isnan().all()) and bool(out[0].isfinite().all()) and bool(out[2].isfinite().all())")),
    Case(MM, "empty", "no rows", "matmul(torch.zeros(0, 3), torch.zeros(3, 4))",
         V("an empty [0, 4]", "tuple(out.shape) == (0, 4)")),
    Case(MM, "empty", "inner size 0", "matmul(torch.ones(2, 0), torch.ones(0, 4))",
         V("zeros [2, 4]", "bool((out == 0).all()) and tuple(out.shape) == (2, 4)")),
    Case(GM, "type", "x is a list", "grouped_mm([[0.0]], torch.zeros(2, 3, 4), offs(0, 1, 1))",
         R("TypeError", "grouped_mm: x must be a torch.Tensor, got list")),
    Case(GM, "type", "w is None", "grouped_mm(torch.zeros(4, 3), None, offs(0, 1, 1))",
         R("TypeError", "grouped_mm: w must be a torch.Tensor, got NoneType")),
    Case(GM, "type", "offsets is a list", "grouped_mm(torch.zeros(4, 3), torch.zeros(2, 3, 4), [0, 1, 1])",
         R("TypeError", "grouped_mm: offsets must be a torch.Tensor, got list")),
    Case(GM, "type", "offsets is None", "grouped_mm(torch.zeros(4, 3), torch.zeros(2, 3, 4), None)",
         R("TypeError", "grouped_mm: offsets must be a torch.Tensor, got NoneType")),
    Case(GM, "dtype", "x float32, w float64", "grouped_mm(torch.zeros(4, 3), torch.zeros(2, 3, 4, dtype=torch.float64), offs(0, 1, 1))",
         R("TypeError", "softmoe: grouped_mm: x and w must have one dtype, got Float and Double")),
    Case(GM, "dtype", "int32 offsets", "grouped_mm(torch.zeros(4, 3), torch.zeros(2, 3, 4), offs(0, 1, 1).int())",
         R("RuntimeError", "softmoe: grouped_mm: offsets must be int64 of shape [3] (experts + 1), got Int of shape [3]")),
    Case(GM, "dtype", "int64 x and w", "grouped_mm(torch.ones(4, 3, dtype=torch.int64), torch.ones(2, 3, 4, dtype=torch.int64), offs(0, 1, 1))",
         V("accepted: an int64 matmul (not differentiable)", "out.dtype == torch.int64 and int(out[0, 0]) == 3")),
    Case(GM, "device", "w on meta, x and offsets on cpu", "grouped_mm(torch.ones(4, 3), torch.ones(2, 3, 4, device='meta'), offs(0, 1, 1))",
         R("RuntimeError", "softmoe: grouped_mm: all tensor arguments must be on one device")),
    Case(GM, "device", "offsets on meta", "grouped_mm(torch.ones(4, 3), torch.ones(2, 3, 4), offs(0, 1, 1).to('meta'))",
         R("RuntimeError", "softmoe: grouped_mm: all tensor arguments must be on one device")),
    Case(GM, "shape", "1-d x", "grouped_mm(torch.zeros(4), torch.zeros(2, 3, 4), offs(0, 1, 1))",
         R("RuntimeError", "softmoe: grouped_mm: x must be 2-D [rows, in], got shape [4]")),
    Case(GM, "shape", "2-d w", "grouped_mm(torch.zeros(4, 3), torch.zeros(3, 4), offs(0, 1, 1))",
         R("RuntimeError", "softmoe: grouped_mm: w must be 3-D [experts, in, out], got shape [3, 4]")),
    Case(GM, "shape", "x and w disagree on in", "grouped_mm(torch.zeros(4, 2), torch.zeros(2, 3, 4), offs(0, 1, 1))",
         R("RuntimeError", "softmoe: grouped_mm: x has 2 columns but w expects 3")),
    Case(GM, "shape", "offsets of the wrong length", "grouped_mm(torch.zeros(4, 3), torch.zeros(2, 3, 4), offs(0, 1))",
         R("RuntimeError", "softmoe: grouped_mm: offsets must be int64 of shape [3] (experts + 1), got Long of shape [2]")),
    Case(GM, "range", "offsets[0] != 0", "grouped_mm(torch.zeros(4, 3), torch.zeros(2, 3, 4), offs(1, 1, 1))",
         R("RuntimeError", "softmoe: grouped_mm: offsets[0] must be 0, got 1")),
    Case(GM, "range", "decreasing offsets", "grouped_mm(torch.zeros(4, 3), torch.zeros(2, 3, 4), offs(0, 3, 1))",
         R("RuntimeError", "softmoe: grouped_mm: offsets must be nondecreasing")),
    Case(GM, "range", "offsets[-1] > rows", "grouped_mm(torch.zeros(4, 3), torch.zeros(2, 3, 4), offs(0, 1, 5))",
         R("RuntimeError", "softmoe: grouped_mm: offsets[-1] = 5 exceeds the number of rows (4)")),
    Case(GM, "NaN/inf", "a NaN row of x", "grouped_mm(torch.ones(4, 3).index_fill(0, torch.tensor([0]), nan), torch.ones(2, 3, 4), offs(0, 1, 4))",
         V("NaN in that row's output only", "bool(out[0].isnan().all()) and bool(out[1:].isfinite().all())")),
    Case(GM, "empty", "no rows", "grouped_mm(torch.zeros(0, 3), torch.zeros(2, 3, 4), offs(0, 0, 0))",
         V("an empty [0, out]", "tuple(out.shape) == (0, 4)")),
    Case(GM, "empty", "no experts: w [0, in, out], offsets [0]", "grouped_mm(torch.ones(4, 3), torch.zeros(0, 3, 4), offs(0))",
         V("every row is padding: zeros [4, out]", "bool((out == 0).all()) and tuple(out.shape) == (4, 4)")),
    Case(GM, "empty", "in = 0", "grouped_mm(torch.zeros(4, 0), torch.zeros(2, 0, 4), offs(0, 1, 1))",
         V("zeros [4, out]", "bool((out == 0).all())")),
    # ---- softmoe.expert_ffn (x [4, 3], w_in [2, 3, 2 * 5], w_out [2, 5, 6]: SwiGLU, 2 experts) ----------
    Case(EF, "type", "x is a list", "expert_ffn([[0.0]], torch.zeros(2, 3, 10), torch.zeros(2, 5, 6), offs(0, 1, 1))",
         R("TypeError", "expert_ffn: x must be a torch.Tensor, got list")),
    Case(EF, "type", "w_out is None", "expert_ffn(torch.zeros(4, 3), torch.zeros(2, 3, 10), None, offs(0, 1, 1))",
         R("TypeError", "expert_ffn: w_out must be a torch.Tensor, got NoneType")),
    Case(EF, "type", "offsets is a list", "expert_ffn(torch.zeros(4, 3), torch.zeros(2, 3, 10), torch.zeros(2, 5, 6), [0, 1, 1])",
         R("TypeError", "expert_ffn: offsets must be a torch.Tensor, got list")),
    Case(EF, "type", "unknown activation", "expert_ffn(torch.zeros(4, 3), torch.zeros(2, 3, 10), torch.zeros(2, 5, 6), offs(0, 1, 1), 'relu')",
         R("ValueError", "expert_ffn: activation must be 'swiglu' or 'gelu', got 'relu'")),
    Case(EF, "dtype", "x float32, w_out float64", "expert_ffn(torch.zeros(4, 3), torch.zeros(2, 3, 10), torch.zeros(2, 5, 6, dtype=torch.float64), offs(0, 1, 1))",
         R("TypeError", "softmoe: expert_ffn: x, w_in and w_out must have one dtype, got Float, Float and Double")),
    Case(EF, "dtype", "int64 x and weights", "expert_ffn(torch.ones(4, 3, dtype=torch.int64), torch.ones(2, 3, 10, dtype=torch.int64), torch.ones(2, 5, 6, dtype=torch.int64), offs(0, 1, 1))",
         R("TypeError", "softmoe: expert_ffn: x, w_in and w_out must be floating point (the activation), got Long")),
    Case(EF, "dtype", "autocast dtype float32 (torch.set_autocast_dtype)",
         "autocast(torch.float32, lambda: expert_ffn(torch.zeros(4, 3), torch.zeros(2, 3, 10), torch.zeros(2, 5, 6), offs(0, 1, 1)))",
         R("TypeError", "softmoe: expert_ffn: the cpu autocast dtype must be torch.bfloat16 or torch.float16")),
    Case(EF, "dtype", "int32 offsets", "expert_ffn(torch.zeros(4, 3), torch.zeros(2, 3, 10), torch.zeros(2, 5, 6), offs(0, 1, 1).int())",
         R("RuntimeError", "softmoe: expert_ffn: offsets must be int64 of shape [3] (experts + 1), got Int of shape [3]")),
    Case(EF, "device", "w_in on meta, the rest on cpu", "expert_ffn(torch.ones(4, 3), torch.ones(2, 3, 10, device='meta'), torch.ones(2, 5, 6), offs(0, 1, 1))",
         R("RuntimeError", "softmoe: expert_ffn: all tensor arguments must be on one device")),
    Case(EF, "shape", "2-d w_in", "expert_ffn(torch.zeros(4, 3), torch.zeros(3, 10), torch.zeros(2, 5, 6), offs(0, 1, 1))",
         R("RuntimeError", "softmoe: expert_ffn: w_in and w_out must be 3-D [experts, in, out], got shapes [3, 10] and [2, 5, 6]")),
    Case(EF, "shape", "x and w_in disagree on d_model", "expert_ffn(torch.zeros(4, 2), torch.zeros(2, 3, 10), torch.zeros(2, 5, 6), offs(0, 1, 1))",
         R("RuntimeError", "softmoe: expert_ffn: x has 2 columns but w_in expects 3")),
    Case(EF, "shape", "w_in not 2 * d_hidden wide (SwiGLU)", "expert_ffn(torch.zeros(4, 3), torch.zeros(2, 3, 5), torch.zeros(2, 5, 6), offs(0, 1, 1))",
         R("RuntimeError", "softmoe: expert_ffn: w_in must have 2 * d_hidden = 10 output columns for w_out's d_hidden = 5, got 5")),
    Case(EF, "shape", "w_in and w_out disagree on experts", "expert_ffn(torch.zeros(4, 3), torch.zeros(2, 3, 10), torch.zeros(3, 5, 6), offs(0, 1, 1))",
         R("RuntimeError", "softmoe: expert_ffn: w_in has 2 experts but w_out has 3")),
    Case(EF, "range", "offsets[-1] > rows", "expert_ffn(torch.zeros(4, 3), torch.zeros(2, 3, 10), torch.zeros(2, 5, 6), offs(0, 1, 5))",
         R("RuntimeError", "softmoe: expert_ffn: offsets[-1] = 5 exceeds the number of rows (4)")),
    Case(EF, "range", "decreasing offsets", "expert_ffn(torch.zeros(4, 3), torch.zeros(2, 3, 10), torch.zeros(2, 5, 6), offs(0, 3, 1))",
         R("RuntimeError", "softmoe: expert_ffn: offsets must be nondecreasing")),
    Case(EF, "NaN/inf", "a NaN row of x", "expert_ffn(torch.ones(4, 3).index_fill(0, torch.tensor([0]), nan), torch.ones(2, 3, 10), torch.ones(2, 5, 6), offs(0, 1, 4))",
         V("NaN in that row's output only", "bool(out[0].isnan().all()) and bool(out[1:].isfinite().all())")),
    Case(EF, "empty", "no rows", "expert_ffn(torch.zeros(0, 3), torch.zeros(2, 3, 10), torch.zeros(2, 5, 6), offs(0, 0, 0))",
         V("an empty [0, d_out]", "tuple(out.shape) == (0, 6)")),
    Case(EF, "empty", "no experts", "expert_ffn(torch.ones(4, 3), torch.zeros(0, 3, 10), torch.zeros(0, 5, 6), offs(0))",
         V("every row is padding: zeros [4, d_out]", "bool((out == 0).all()) and tuple(out.shape) == (4, 6)")),
    Case(EF, "empty", "d_hidden = 0", "expert_ffn(torch.ones(4, 3), torch.zeros(2, 3, 0), torch.zeros(2, 0, 6), offs(0, 1, 4))",
         V("zeros [4, d_out]", "bool((out == 0).all()) and tuple(out.shape) == (4, 6)")),
    # ---- baselines.TopKMoE(...) --------------------------------------------------------------------
    Case(TK, "type", "d_model is a str", "TopKMoE('8', 16, 4)", R("TypeError", "TopKMoE: d_model must be an int, got str")),
    Case(TK, "type", "top_k is a float", "TopKMoE(8, 16, 4, top_k=2.0)", R("TypeError", "TopKMoE: top_k must be an int, got float")),
    Case(TK, "type", "lb_coef is a str", "TopKMoE(8, 16, 4, lb_coef='x')",
         R("TypeError", "TopKMoE: lb_coef must be a float, got str")),
    Case(TK, "type", "z_coef is None", "TopKMoE(8, 16, 4, z_coef=None)",
         R("TypeError", "TopKMoE: z_coef must be a float, got NoneType")),
    Case(TK, "type", "normalize is a str", "TopKMoE(8, 16, 4, normalize='yes')",
         R("TypeError", "TopKMoE: normalize must be a bool or None, got str")),
    Case(TK, "type", "unknown activation", "TopKMoE(8, 16, 4, activation='relu')",
         R("ValueError", "TopKMoE: activation must be 'swiglu' or 'gelu', got 'relu'")),
    Case(TK, "dtype", "dtype=torch.int64", "TopKMoE(8, 16, 4, dtype=torch.int64)",
         R("TypeError", f"TopKMoE: dtype must be {FLOATS_OR_NONE}, got torch.int64")),
    Case(TK, "device", "device='meta'", "TopKMoE(8, 16, 4, device='meta')",
         V("a module on meta (shapes only)", "out.router.weight.device.type == 'meta'")),
    Case(TK, "shape", "-", "None", NA("no tensor arguments (sizes are ints: see range)")),
    Case(TK, "range", "top_k > num_experts", "TopKMoE(8, 16, 4, top_k=5)",
         R("ValueError", "TopKMoE: top_k must be <= num_experts (= 4), got 5")),
    Case(TK, "range", "top_k = 0", "TopKMoE(8, 16, 4, top_k=0)", R("ValueError", "TopKMoE: top_k must be an int >= 1, got 0")),
    Case(TK, "range", "num_experts = 0", "TopKMoE(8, 16, 0)", R("ValueError", "TopKMoE: num_experts must be an int >= 1, got 0")),
    Case(TK, "range", "lb_coef < 0", "TopKMoE(8, 16, 4, lb_coef=-0.01)",
         R("ValueError", "TopKMoE: lb_coef must be a finite number >= 0, got -0.01")),
    Case(TK, "NaN/inf", "lb_coef = nan", "TopKMoE(8, 16, 4, lb_coef=nan)",
         R("ValueError", "TopKMoE: lb_coef must be a finite number >= 0, got nan")),
    Case(TK, "NaN/inf", "z_coef = inf", "TopKMoE(8, 16, 4, z_coef=inf)",
         R("ValueError", "TopKMoE: z_coef must be a finite number >= 0, got inf")),
    Case(TK, "empty", "-", "None", NA("no container arguments (num_experts = 0: see range)")),
    # ---- baselines.TopKMoE.forward -----------------------------------------------------------------
    Case(TKF, "type", "x is a list", "TopKMoE(8, 16, 4)([[0.0] * 8])", R("TypeError", "TopKMoE: x must be a torch.Tensor, got list")),
    Case(TKF, "dtype", "int64 x", "TopKMoE(8, 16, 4)(torch.zeros(3, 8, dtype=torch.int64))",
         R("TypeError", "TopKMoE: x must be a floating-point tensor, got torch.int64")),
    Case(TKF, "dtype", "float64 x, float32 module", "TopKMoE(8, 16, 4)(torch.zeros(3, 8, dtype=torch.float64))",
         R("TypeError", "TopKMoE: x must have the layer's dtype torch.float32, got torch.float64")),
    Case(TKF, "device", "x on meta, module on cpu", "TopKMoE(8, 16, 4)(torch.zeros(3, 8, device='meta'))",
         R("ValueError", "TopKMoE: x must be on the layer's device cpu, got meta")),
    Case(TKF, "device", "module and x on meta", "TopKMoE(8, 16, 4, device='meta')(torch.zeros(3, 8, device='meta'))",
         V("a meta output of the shape of x", "out.device.type == 'meta' and tuple(out.shape) == (3, 8)")),
    Case(TKF, "shape", "wrong last dimension", "TopKMoE(8, 16, 4)(torch.zeros(3, 7))",
         R("ValueError", "TopKMoE: x must have last dimension d_model = 8, got shape (3, 7)")),
    Case(TKF, "shape", "0-d x", "TopKMoE(8, 16, 4)(torch.tensor(1.0))",
         R("ValueError", "TopKMoE: x must have last dimension d_model = 8, got shape ()")),
    Case(TKF, "shape", "3-d x [2, 3, d_model]", "TopKMoE(8, 16, 4)(torch.zeros(2, 3, 8))",
         V("allowed: output [2, 3, d_model]", "tuple(out.shape) == (2, 3, 8)")),
    Case(TKF, "range", "-", "None", NA("x has no range (see NaN/inf)")),
    Case(TKF, "NaN/inf", "a NaN token", "TopKMoE(8, 16, 4)(rows([nan] * 8, [0.5] * 8))",
         V("that token's output is NaN; the other tokens are unaffected",
           "bool(out[0].isnan().all()) and bool(out[1].isfinite().all())")),
    Case(TKF, "empty", "no tokens", "forward(TopKMoE(8, 16, 4), torch.zeros(0, 8))",
         V("an empty output [0, d_model]; `aux_loss` is 0, still connected to the router (its backward gives zero "
           "gradients, so the graph is the same as for any batch)",
           "tuple(out.shape) == (0, 8) and float(out.module.aux_loss) == 0 and out.module.aux_loss.requires_grad")),
    # ---- baselines.SlotSoftMoE(...) ----------------------------------------------------------------
    Case(SL, "type", "d_model is a str", "SlotSoftMoE('8', 16, 4)", R("TypeError", "SlotSoftMoE: d_model must be an int, got str")),
    Case(SL, "type", "slots_per_expert is a float", "SlotSoftMoE(8, 16, 4, slots_per_expert=1.5)",
         R("TypeError", "SlotSoftMoE: slots_per_expert must be an int, got float")),
    Case(SL, "type", "unknown activation", "SlotSoftMoE(8, 16, 4, activation='relu')",
         R("ValueError", "SlotSoftMoE: activation must be 'swiglu' or 'gelu', got 'relu'")),
    Case(SL, "type", "causal is a str", "SlotSoftMoE(8, 16, 4, causal='no')",
         R("TypeError", "SlotSoftMoE: causal must be a bool, got str")),
    Case(SL, "type", "causal=True", "SlotSoftMoE(8, 16, 4, causal=True)",
         V("a module and a UserWarning: slot Soft MoE is not causal",
           "isinstance(out, SlotSoftMoE) and any('not causal' in w for w in warned)")),
    Case(SL, "dtype", "dtype=torch.int64", "SlotSoftMoE(8, 16, 4, dtype=torch.int64)",
         R("TypeError", f"SlotSoftMoE: dtype must be {FLOATS_OR_NONE}, got torch.int64")),
    Case(SL, "device", "device='meta'", "SlotSoftMoE(8, 16, 4, device='meta')",
         V("a module on meta (shapes only)", "out.slot_embed.device.type == 'meta'")),
    Case(SL, "shape", "-", "None", NA("no tensor arguments (sizes are ints: see range)")),
    Case(SL, "range", "slots_per_expert = 0", "SlotSoftMoE(8, 16, 4, slots_per_expert=0)",
         R("ValueError", "SlotSoftMoE: slots_per_expert must be an int >= 1, got 0")),
    Case(SL, "range", "num_experts = 0", "SlotSoftMoE(8, 16, 0)", R("ValueError", "SlotSoftMoE: num_experts must be an int >= 1, got 0")),
    Case(SL, "NaN/inf", "-", "None", NA("no float arguments")),
    Case(SL, "empty", "-", "None", NA("no container arguments (num_experts = 0: see range)")),
    # ---- baselines.SlotSoftMoE.forward -------------------------------------------------------------
    Case(SLF, "type", "x is a list", "SlotSoftMoE(8, 16, 4)([[[0.0] * 8]])",
         R("TypeError", "SlotSoftMoE: x must be a torch.Tensor, got list")),
    Case(SLF, "dtype", "int64 x", "SlotSoftMoE(8, 16, 4)(torch.zeros(2, 3, 8, dtype=torch.int64))",
         R("TypeError", "SlotSoftMoE: x must be a floating-point tensor, got torch.int64")),
    Case(SLF, "dtype", "float64 x, float32 module", "SlotSoftMoE(8, 16, 4)(torch.zeros(2, 3, 8, dtype=torch.float64))",
         R("TypeError", "SlotSoftMoE: x must have the layer's dtype torch.float32, got torch.float64")),
    Case(SLF, "device", "x on meta, module on cpu", "SlotSoftMoE(8, 16, 4)(torch.zeros(2, 3, 8, device='meta'))",
         R("ValueError", "SlotSoftMoE: x must be on the layer's device cpu, got meta")),
    Case(SLF, "device", "module and x on meta", "SlotSoftMoE(8, 16, 4, device='meta')(torch.zeros(2, 3, 8, device='meta'))",
         V("a meta output of the shape of x", "out.device.type == 'meta' and tuple(out.shape) == (2, 3, 8)")),
    Case(SLF, "shape", "0-d x", "SlotSoftMoE(8, 16, 4)(torch.tensor(1.0))",
         R("ValueError", "SlotSoftMoE: x must be [batch, seq, d_model = 8], got shape ()")),
    Case(SLF, "shape", "2-d x", "SlotSoftMoE(8, 16, 4)(torch.zeros(3, 8))",
         R("ValueError", "SlotSoftMoE: x must be [batch, seq, d_model = 8], got shape (3, 8)")),
    Case(SLF, "shape", "wrong last dimension", "SlotSoftMoE(8, 16, 4)(torch.zeros(2, 3, 7))",
         R("ValueError", "SlotSoftMoE: x must be [batch, seq, d_model = 8], got shape (2, 3, 7)")),
    Case(SLF, "range", "-", "None", NA("x has no range (see NaN/inf)")),
    Case(SLF, "NaN/inf", "one NaN token", "SlotSoftMoE(8, 16, 4)(torch.zeros(2, 3, 8).index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(nan)))",
         V("every token of that sequence is NaN (slots mix the whole sequence); other sequences are unaffected",
           "bool(out[0].isnan().all()) and bool(out[1].isfinite().all())")),
    Case(SLF, "empty", "an empty sequence [2, 0, d_model]", "SlotSoftMoE(8, 16, 4)(torch.zeros(2, 0, 8))",
         V("an empty output [2, 0, d_model]", "tuple(out.shape) == (2, 0, 8)")),
    Case(SLF, "empty", "an empty batch [0, 3, d_model]", "SlotSoftMoE(8, 16, 4)(torch.zeros(0, 3, 8))",
         V("an empty output [0, 3, d_model]", "tuple(out.shape) == (0, 3, 8)")),
    # ---- softmoe.hf.convert (a failed call leaves the model untouched: tests/test_hf.py) ------------
    Case(HC, "type", "model is a Linear", "hf().convert(torch.nn.Linear(2, 2))",
         R("TypeError", "softmoe.hf.convert: model must be a transformers PreTrainedModel, got Linear")),
    Case(HC, "type", "a dense model", "hf().convert(tiny('llama'))",
         R("NotImplementedError", "softmoe.hf.convert: LlamaForCausalLM (model_type 'llama') is not a supported MoE "
                                  "architecture")),
    Case(HC, "type", "mean_k is a str", "hf().convert(tiny(), '2')", R("TypeError", "softmoe.hf.convert: mean_k must be a float, got str")),
    Case(HC, "type", "an unknown routing argument", "hf().convert(tiny(), temperature=2.0)",
         R("TypeError", "softmoe.hf.convert: unexpected routing argument(s) temperature; allowed: alpha, eps, max_active, "
                        "combine, k_min, learn_k, learn_alpha")),
    Case(HC, "type", "alpha is a str", "hf().convert(tiny(), alpha='1')",
         R("TypeError", "softmoe.hf.convert: cannot build the SoftMoE layer for model.layers.0.mlp: SoftMoELayer: alpha "
                        "must be a float, got str")),
    Case(HC, "type", "learn_k is a str", "hf().convert(tiny(), learn_k='no')",
         R("TypeError", "softmoe.hf.convert: learn_k must be a bool, got str")),
    Case(HC, "type", "unknown combine", "hf().convert(tiny(), combine='mean')",
         R("ValueError", "softmoe.hf.convert: combine must be 'normalized', 'sum', 'gate' or 'scaled', got 'mean'")),
    Case(HC, "dtype", "a bfloat16 model", "hf().convert(tiny().to(torch.bfloat16))",
         V("bfloat16 blocks; the budget's theta stays float32",
           "out.model.layers[0].mlp.router.weight.dtype == torch.bfloat16 and out.softmoe_budget.theta.dtype == torch.float32")),
    Case(HC, "device", "a model on meta", "hf().convert(tiny().to('meta'))",
         V("converted on meta (shapes only)", "out.model.layers[0].mlp.experts.w_in.device.type == 'meta'")),
    Case(HC, "shape", "-", "None", NA("no tensor arguments (the blocks' shapes come from the model)")),
    Case(HC, "range", "mean_k = num_experts", "hf().convert(tiny(), 4.0)",
         R("ValueError", "softmoe.hf.convert: mean_k must satisfy 0 < mean_k < num_experts (= 4), got 4.0")),
    Case(HC, "range", "max_active > num_experts", "hf().convert(tiny(), max_active=9)",
         R("ValueError", "softmoe.hf.convert: cannot build the SoftMoE layer for model.layers.0.mlp: SoftMoELayer: "
                         "max_active must satisfy ceil(k) = 2 <= max_active <= 4 (the number of experts), got 9")),
    Case(HC, "range", "k_min >= mean_k", "hf().convert(tiny(), 1.5, k_min=2.0)",
         R("ValueError", "softmoe.hf.convert: mean_k must be > k_min (= 2.0, the floor of every layer's k), got 1.5")),
    Case(HC, "range", "k_min = 0", "hf().convert(tiny(), k_min=0.0)",
         R("ValueError", "softmoe.hf.convert: k_min must be a finite number > 0, got 0.0")),
    Case(HC, "range", "a model converted twice", "(lambda m: hf().convert(hf().convert(m)))(tiny())",
         R("ValueError", "softmoe.hf.convert: MixtralForCausalLM already has SoftMoE routing (it was converted or upcycled)")),
    Case(HC, "NaN/inf", "mean_k = nan", "hf().convert(tiny(), nan)", R("ValueError", "softmoe.hf.convert: mean_k must be finite, got nan")),
    Case(HC, "NaN/inf", "k_min = nan", "hf().convert(tiny(), k_min=nan)",
         R("ValueError", "softmoe.hf.convert: k_min must be a finite number > 0, got nan")),
    Case(HC, "NaN/inf", "alpha = inf", "hf().convert(tiny(), alpha=inf)",
         R("ValueError", "softmoe.hf.convert: cannot build the SoftMoE layer for model.layers.0.mlp: SoftMoELayer: alpha "
                         "must be a finite number > 0, got inf")),
    Case(HC, "empty", "no MoE block (every layer dense)", "hf().convert(tiny('qwen2_moe', mlp_only_layers=[0]))",
         R("ValueError", "softmoe.hf.convert: found no MoE block (fused experts) in Qwen2MoeForCausalLM")),
    Case(HC, "empty", "no layers", "hf().convert(tiny(num_hidden_layers=0))",
         R("ValueError", "softmoe.hf.convert: found no MoE block (fused experts) in MixtralForCausalLM")),
    # ---- softmoe.hf.upcycle ------------------------------------------------------------------------
    Case(HU, "type", "model is None", "hf().upcycle(None, 4)",
         R("TypeError", "softmoe.hf.upcycle: model must be a transformers PreTrainedModel, got NoneType")),
    Case(HU, "type", "a MoE model", "hf().upcycle(tiny(), 4)",
         R("NotImplementedError", "softmoe.hf.upcycle: MixtralForCausalLM (model_type 'mixtral') is not a supported dense "
                                  "architecture")),
    Case(HU, "type", "num_experts is a float", "hf().upcycle(tiny('llama'), 4.0)",
         R("TypeError", "softmoe.hf.upcycle: num_experts must be an int, got float")),
    Case(HU, "type", "noise is a str", "hf().upcycle(tiny('llama'), 4, noise='0.1')",
         R("TypeError", "softmoe.hf.upcycle: noise must be a float, got str")),
    Case(HU, "dtype", "a bfloat16 model", "hf().upcycle(tiny('llama').to(torch.bfloat16), 4)",
         V("bfloat16 blocks; the budget's theta stays float32",
           "out.model.layers[0].mlp.experts.w_in.dtype == torch.bfloat16 and out.softmoe_budget.theta.dtype == torch.float32")),
    Case(HU, "device", "a model on meta", "hf().upcycle(tiny('llama').to('meta'), 4)",
         V("upcycled on meta (shapes only)", "out.model.layers[0].mlp.experts.w_in.device.type == 'meta'")),
    Case(HU, "shape", "-", "None", NA("no tensor arguments (the blocks' shapes come from the model)")),
    Case(HU, "range", "num_experts = 1", "hf().upcycle(tiny('llama'), 1)",
         R("ValueError", "softmoe.hf.upcycle: num_experts must be an int >= 2, got 1")),
    Case(HU, "range", "noise < 0", "hf().upcycle(tiny('llama'), 4, noise=-0.1)",
         R("ValueError", "softmoe.hf.upcycle: noise must be a finite float >= 0, got -0.1")),
    Case(HU, "range", "mean_k = num_experts", "hf().upcycle(tiny('llama'), 4, mean_k=4.0)",
         R("ValueError", "softmoe.hf.upcycle: mean_k must satisfy 0 < mean_k < num_experts (= 4), got 4.0")),
    Case(HU, "NaN/inf", "noise = nan", "hf().upcycle(tiny('llama'), 4, noise=nan)",
         R("ValueError", "softmoe.hf.upcycle: noise must be a finite float >= 0, got nan")),
    Case(HU, "NaN/inf", "mean_k = inf", "hf().upcycle(tiny('llama'), 4, mean_k=inf)",
         R("ValueError", "softmoe.hf.upcycle: mean_k must be finite, got inf")),
    Case(HU, "empty", "no layers", "hf().upcycle(tiny('llama', num_hidden_layers=0), 4)",
         R("ValueError", "softmoe.hf.upcycle: found no LlamaMLP module in LlamaForCausalLM")),
    # ---- softmoe.hf.from_pretrained ----------------------------------------------------------------
    Case(HP, "type", "path is None", "hf().from_pretrained(None)",
         R("TypeError", "softmoe.hf.from_pretrained: path must be a str or os.PathLike (a directory or a hub repository "
                        "id), got NoneType")),
    Case(HP, "type", "path is a model", "hf().from_pretrained(tiny())",
         R("TypeError", "softmoe.hf.from_pretrained: path must be a str or os.PathLike", "got MixtralForCausalLM")),
    Case(HP, "dtype", "a converted checkpoint loaded with dtype=torch.bfloat16",
         "hf().from_pretrained(saved(hf().convert(tiny())), dtype=torch.bfloat16)",
         V("bfloat16 blocks; the budget's theta stays float32",
           "out.model.layers[0].mlp.router.weight.dtype == torch.bfloat16 and out.softmoe_budget.theta.dtype == torch.float32")),
    Case(HP, "device", "-", "None", NA("no tensor arguments (device_map= is passed on to transformers' loader)")),
    Case(HP, "shape", "-", "None", NA("no tensor arguments")),
    Case(HP, "range", "a checkpoint of a plain (not converted) model", "hf().from_pretrained(saved(tiny()))",
         R("ValueError", "softmoe.hf.from_pretrained: ", "has no SoftMoE routing configuration (config.softmoe)")),
    Case(HP, "NaN/inf", "-", "None", NA("no float arguments")),
    Case(HP, "empty", "an empty directory", "hf().from_pretrained(saved(None))",
         R("ValueError", "softmoe.hf.from_pretrained: ", "has no config.json; pass a directory written by save_pretrained")),
    # ---- softmoe.hf.layers / budget / allocation / stats / format_stats ------------------------------
    Case(HR, "type", "allocation(None)", "hf().allocation(None)",
         R("TypeError", "softmoe.hf.allocation: model must be a torch.nn.Module, got NoneType")),
    Case(HR, "type", "stats of a str", "hf().stats('model')", R("TypeError", "softmoe.hf.stats: model must be a torch.nn.Module, got str")),
    Case(HR, "type", "layers(None)", "hf().layers(None)", R("TypeError", "softmoe.hf.layers: model must be a torch.nn.Module, got NoneType")),
    Case(HR, "type", "budget(None)", "hf().budget(None)", R("TypeError", "softmoe.hf.budget: model must be a torch.nn.Module, got NoneType")),
    Case(HR, "type", "format_stats(None)", "hf().format_stats(None)",
         R("TypeError", "softmoe.hf.format_stats: model must be a torch.nn.Module, got NoneType")),
    Case(HR, "dtype", "-", "None", NA("no tensor arguments")),
    Case(HR, "device", "-", "None", NA("no tensor arguments")),
    Case(HR, "shape", "-", "None", NA("no tensor arguments")),
    Case(HR, "range", "stats before the first forward", "hf().stats(hf().convert(tiny()))",
         V("`k` per layer (the model's top-k less a relative 1e-6); `active`, `tokens_per_expert` and `router_entropy` are None",
           "abs(out[0]['k'] - 2.0) < 1e-5 and out[0]['active'] is None and out[0]['tokens_per_expert'] is None")),
    Case(HR, "range", "allocation without a budget (learn_k=False)", "hf().allocation(hf().convert(tiny(), learn_k=False))",
         V("the fixed k of every layer (budget() is None)", "abs(out[0].item() - 2.0) < 1e-5 and out.shape == (1,)")),
    Case(HR, "NaN/inf", "-", "None", NA("no float arguments")),
    Case(HR, "empty", "allocation of a model without SoftMoE layers", "hf().allocation(torch.nn.Linear(2, 2))",
         R("ValueError", "softmoe.hf.allocation: Linear has no SoftMoE layers")),
    Case(HR, "empty", "stats of a model without SoftMoE layers", "hf().stats(torch.nn.Linear(2, 2))", V("[]", "out == []")),
    # ---- softmoe.hf.routing_parameters / train_routing_only ---------------------------------------------
    Case(HT, "type", "routing_parameters(None)", "hf().routing_parameters(None)",
         R("TypeError", "softmoe.hf.routing_parameters: model must be a torch.nn.Module, got NoneType")),
    Case(HT, "type", "train_routing_only of a str", "hf().train_routing_only('model')",
         R("TypeError", "softmoe.hf.train_routing_only: model must be a torch.nn.Module, got str")),
    Case(HT, "dtype", "-", "None", NA("no tensor arguments")),
    Case(HT, "device", "-", "None", NA("no tensor arguments")),
    Case(HT, "shape", "-", "None", NA("no tensor arguments")),
    Case(HT, "range", "a model converted with learn_k=False", "hf().routing_parameters(hf().convert(tiny(), learn_k=False))",
         V("the router weight of every layer (k is fixed: no budget, no k_logit)", "len(out) == 1 and out[0].shape == (4, 16)")),
    Case(HT, "NaN/inf", "-", "None", NA("no float arguments")),
    Case(HT, "empty", "train_routing_only of a model without SoftMoE layers", "hf().train_routing_only(torch.nn.Linear(2, 2))",
         R("ValueError", "softmoe.hf.train_routing_only: Linear has no SoftMoE layers (convert or upcycle it first)")),
    Case(HT, "empty", "routing_parameters of a model without SoftMoE layers",
         "hf().routing_parameters(torch.nn.Linear(2, 2))", V("[]", "out == []")),
]

RUNNABLE = [c for c in CASES if not isinstance(c.expect, NotApplicable)]

# ---- the subprocess ----------------------------------------------------------------------------------

RUNNER = textwrap.dedent(
    """
    import json, sys, warnings
    job = json.load(sys.stdin)
    ns = {}
    exec(job["setup"], ns)
    torch = ns["torch"]
    for case in job["cases"]:
        print(json.dumps({"start": case["id"]}), flush=True)
        torch.manual_seed(0)
        result = {"id": case["id"]}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = eval(case["call"], ns)
                result["raised"] = None
            except BaseException as exc:  # noqa: BLE001 - every outcome is data here
                result["raised"] = type(exc).__name__
                result["message"] = str(exc)
        if result["raised"] is None and case["check"] is not None:
            try:
                result["check"] = bool(eval(case["check"], dict(ns, out=out, warned=[str(w.message) for w in caught])))
            except BaseException as exc:  # noqa: BLE001
                result["check"] = False
                result["check_error"] = f"{type(exc).__name__}: {exc}"
        print(json.dumps(result), flush=True)
    """
)


def run_cases(cases, timeout=300):
    """Runs the cases in one subprocess, restarting it after a crash; returns {id: result}."""
    results = {}
    todo = list(cases)
    while todo:
        job = {
            "setup": SETUP,
            "cases": [
                {"id": c.id, "call": c.call, "check": c.expect.check if isinstance(c.expect, Returns) else None}
                for c in todo
            ],
        }
        # offline: a bad path must fail on its own, not after the hub client's network retries
        env = dict(os.environ, PYTHONFAULTHANDLER="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        proc = subprocess.run(
            [sys.executable, "-c", RUNNER], input=json.dumps(job), capture_output=True, text=True, cwd=ROOT,
            timeout=timeout, env=env,
        )
        started = None
        for line in proc.stdout.splitlines():
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            if "start" in msg:
                started = msg["start"]
            else:
                results[msg["id"]] = msg
                started = None
        if started is None and proc.returncode == 0:
            break
        if started is None:  # died outside a case (setup): every remaining case fails with it
            for c in todo:
                results.setdefault(c.id, {"id": c.id, "crashed": proc.returncode, "stderr": proc.stderr[-2000:]})
            break
        results[started] = {"id": started, "crashed": proc.returncode, "stderr": proc.stderr[-2000:]}
        todo = [c for c in todo if c.id not in results]
    return results


@pytest.fixture(scope="module")
def results():
    return run_cases(RUNNABLE)


@pytest.mark.parametrize("case", RUNNABLE, ids=[c.id for c in RUNNABLE])
def test_case(case, results):
    if case.api in HF_APIS and importlib.util.find_spec("transformers") is None:
        pytest.skip("softmoe.hf needs transformers")
    got = results.get(case.id)
    assert got is not None, "no result (the runner lost this case)"
    assert "crashed" not in got, f"the process crashed (exit {got['crashed']}) on {case.call}:\n{got['stderr']}"
    if isinstance(case.expect, Raises):
        assert got["raised"] == case.expect.exc, (
            f"{case.call}: expected {case.expect.exc}, got "
            + (f"{got['raised']}: {got.get('message', '')}" if got["raised"] else "no exception")
        )
        assert got["message"].startswith(case.expect.prefix), (
            f"{case.call}: message {got['message']!r} does not start with {case.expect.prefix!r}"
        )
        assert case.expect.contains in got["message"], (
            f"{case.call}: message {got['message']!r} does not contain {case.expect.contains!r}"
        )
    else:
        assert got["raised"] is None, f"{case.call}: raised {got['raised']}: {got.get('message', '')}"
        assert got["check"], f"{case.call}: check `{case.expect.check}` failed {got.get('check_error', '')}"


def test_table_is_complete():
    """Every entry point has a row (a case or an explicit n/a) for every class of bad argument."""
    missing = [(api, kind) for api in APIS for kind in KINDS if not any(c.api == api and c.kind == kind for c in CASES)]
    assert not missing, f"no row for {missing}"
    assert all(c.kind in KINDS and c.api in APIS for c in CASES)
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"


def test_runner_reports_a_crash_as_a_failure():
    """A segfault in the middle of a batch is pinned on its case; the cases after it still run."""
    crash = Case(ST, "type", "__crash__", "__import__('ctypes').string_at(0)", R("X", ""))
    after = Case(ST, "type", "__after__", "1 + 1", V("", "out == 2"))
    got = run_cases([crash, after], timeout=120)
    assert "crashed" in got[crash.id]
    assert got[after.id].get("check") is True


# ---- the markdown ------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown() -> str:
    bugs = sum(1 for c in CASES if c.bug)
    lines = [
        "# Bad inputs: what every public entry point does with them",
        "",
        "<!-- Generated from CASES in tests/test_bad_inputs.py by `python tests/test_bad_inputs.py --write`;",
        "     do not edit by hand. tests/test_bad_inputs.py runs every row and checks this file is current. -->",
        "",
        "Every public entry point, for every class of bad argument (wrong **type**, **dtype**, **device**, "
        "**shape**, **range**, **NaN/inf**, **empty**): the exception it raises and the start of its message, "
        "or the documented result. `tests/test_bad_inputs.py` runs every row in a subprocess (so a crash "
        "would fail the row instead of the test run) and asserts the exception type and message prefix, "
        "or checks the result. Devices: only `meta` against `cpu` can be tested without a GPU.",
        "",
        "Conventions: the Python wrappers raise `TypeError` (wrong type or dtype) or `ValueError` (shape, "
        "range, device) with a message that starts with the function and the argument, e.g. "
        "`soft_topk: k must ...`; checks inside the compiled ops raise `RuntimeError` (or `TypeError` for "
        "dtypes) starting with `softmoe: <op>: ...`. Bad values inside tensors (NaN/inf scores, a per-row "
        "k or alpha out of range) do not raise: `soft_topk` returns NaN for exactly those rows and leaves "
        "the others alone (`strict=True` raises instead, at the cost of a device sync).",
        "",
        f"Rows marked **bug** ({bugs}) are reported problems: the row pins today's behaviour, the note says "
        "what is wrong.",
        "",
    ]
    for api in APIS:
        lines += [f"## `{api}`", "", "| Class | Bad argument | Call | Raises / result |", "|---|---|---|---|"]
        for c in (c for c in CASES if c.api == api):
            if isinstance(c.expect, NotApplicable):
                lines.append(f"| {c.kind} | n/a | | {_cell(c.expect.why)} |")
                continue
            if isinstance(c.expect, Raises):
                res = f"`{c.expect.exc}`: `{_cell(c.expect.prefix)}`"
                if c.expect.contains:
                    res += f" ... `{_cell(c.expect.contains)}`"
            else:
                res = _cell(c.expect.what)
            if c.bug:
                res += f" — **bug**: {_cell(c.bug)}"
            lines.append(f"| {c.kind} | {_cell(c.arg)} | `{_cell(c.call)}` | {res} |")
        lines.append("")
    return "\n".join(lines)


README = os.path.join(ROOT, "README.md")
SUMMARY_BEGIN = "<!-- bad-inputs summary: generated by `python tests/test_bad_inputs.py --write` -->"
SUMMARY_END = "<!-- end of the bad-inputs summary -->"


def render_summary() -> str:
    """The README's matrix: per entry point and class of bad argument, what its rows do (how many rows
    raise which exception, how many return a documented result)."""
    lines = [SUMMARY_BEGIN, "", "| entry point | " + " | ".join(KINDS) + " |", "|---" * (len(KINDS) + 1) + "|"]
    for api in APIS:
        cells = []
        for kind in KINDS:
            rows = [c for c in CASES if c.api == api and c.kind == kind]
            if all(isinstance(c.expect, NotApplicable) for c in rows):
                cells.append("n/a")
                continue
            counts: dict = {}
            for c in rows:
                if not isinstance(c.expect, NotApplicable):
                    what = c.expect.exc if isinstance(c.expect, Raises) else "result"
                    counts[what] = counts.get(what, 0) + 1
            cells.append(", ".join(f"{what} ×{n}" for what, n in sorted(counts.items(), key=lambda kv: kv[0] == "result")))
        lines.append(f"| `{api}` | " + " | ".join(cells) + " |")
    lines += ["", SUMMARY_END]
    return "\n".join(lines)


def _readme_with_summary(readme: str) -> str:
    begin, end = readme.index(SUMMARY_BEGIN), readme.index(SUMMARY_END) + len(SUMMARY_END)
    return readme[:begin] + render_summary() + readme[end:]


def test_readme_summary_is_up_to_date():
    with open(README, encoding="utf-8") as f:
        current = f.read()
    assert SUMMARY_BEGIN in current and SUMMARY_END in current, "README.md lost the bad-inputs summary markers"
    assert current == _readme_with_summary(current), "README.md's bad-inputs summary is stale: run `python tests/test_bad_inputs.py --write`"


def test_markdown_is_up_to_date():
    with open(DOC, encoding="utf-8") as f:
        current = f.read()
    assert current == render_markdown(), "docs/bad_inputs.md is stale: run `python tests/test_bad_inputs.py --write`"


if __name__ == "__main__":
    if "--write" in sys.argv:
        os.makedirs(os.path.dirname(DOC), exist_ok=True)
        with open(DOC, "w", encoding="utf-8") as f:
            f.write(render_markdown())
        with open(README, encoding="utf-8") as f:
            readme = f.read()
        with open(README, "w", encoding="utf-8") as f:
            f.write(_readme_with_summary(readme))
        print(f"wrote {DOC} and the summary in {README}")
    else:
        print(render_markdown())
