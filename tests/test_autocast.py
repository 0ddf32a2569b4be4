"""The ops and layers under torch.autocast (softmoe/_autocast.py): what each op computes in, the
layers' output dtype against an nn.Linear FFN's, values and gradients against float32, opcheck and
torch.compile under autocast, the expert matmuls' dtype seen by the profiler, and fp16 training
with torch.amp.GradScaler (an overflowing step is skipped; k and the budget stay untouched).

Tolerances against float32 are relative to the norm of the float32 result: ``BF16_REL`` = 2 %
(bfloat16 keeps 8 significant bits, a unit roundoff of 2^-9 = 0.2 %; the inputs, the hidden
activation and the output are each rounded once, and routing weights move with the rounded router
logits), ``F16_REL`` = 0.5 % (float16: 11 bits, 2^-12 = 0.02 %). The CPU runs bfloat16 and float16;
the CUDA rows of the same tests run on a GPU only.
"""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import softmoe
from softmoe import _autocast, ops
from softmoe.baselines import SlotSoftMoE, TopKMoE

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
BF16_REL, F16_REL = 2e-2, 5e-3
REL = {BF16: BF16_REL, F16: F16_REL}

# (device, autocast dtype): the CPU rows here, the CUDA rows on a GPU.
AMP = [
    pytest.param("cpu", BF16, id="cpu-bf16"),
    pytest.param("cpu", F16, id="cpu-f16"),
    pytest.param("cuda", BF16, id="cuda-bf16", marks=pytest.mark.cuda),
    pytest.param("cuda", F16, id="cuda-f16", marks=pytest.mark.cuda),
]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach().double() - ref.detach().double()).norm() / ref.detach().double().norm().clamp_min(1e-30))


def ffn_inputs(device, dtype=F32, rows=40, d=16, hidden=12, experts=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g)
    w_in = torch.randn(experts, d, 2 * hidden, generator=g) / d**0.5
    w_out = torch.randn(experts, hidden, d, generator=g) / hidden**0.5
    offsets = torch.tensor([0, 7, 7, 25, 36])  # an empty expert and 4 padding rows
    return [t.to(device, dtype) for t in (x, w_in, w_out)] + [offsets.to(device)]


# ---- the rule of each op ----------------------------------------------------------------------


@pytest.mark.parametrize("device,amp", AMP)
def test_matmuls_run_in_the_autocast_dtype_and_match_the_op_on_cast_inputs(device, amp):
    """matmul, grouped_mm and expert_ffn: float32 in, the autocast dtype out, and exactly the op on
    inputs cast to that dtype (the rule is "cast, then run"); close to float32."""
    x, w_in, w_out, offsets = ffn_inputs(device)
    cases = {
        "matmul": (ops.matmul, (x, w_in[0])),
        "grouped_mm": (ops.grouped_mm, (x, w_in, offsets)),
        "expert_ffn": (ops.expert_ffn, (x, w_in, w_out, offsets)),
    }
    for name, (fn, args) in cases.items():
        ref = fn(*args)
        with torch.autocast(device, dtype=amp):
            out = fn(*args)
        assert out.dtype == amp, name
        cast = [a.to(amp) if a.is_floating_point() else a for a in args]
        torch.testing.assert_close(out, fn(*cast), rtol=0, atol=0, msg=name)
        assert rel_err(out, ref) < REL[amp], name


@pytest.mark.parametrize("device,amp", AMP)
def test_soft_topk_runs_float32_and_gather_combine_follow_their_input(device, amp):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(6, 8, generator=g).to(device)
    with torch.autocast(device, dtype=amp):
        p = softmoe.soft_topk(scores.to(amp), 2.0, eps=0.05, max_active=3)  # 16-bit scores: float32 weights
        p32 = softmoe.soft_topk(scores, 2.0, eps=0.05, max_active=3)
        plan = softmoe.dispatch_plan(p32, 3)
        rows = torch.randn(6, 5, generator=g).to(device)
        gathered = {dt: softmoe.gather_rows(rows.to(dt), plan) for dt in (F32, amp)}
        ys = torch.randn(plan.pair_token.shape[0], 5, generator=g).to(device)
        combined = {dt: softmoe.combine_rows(ys.to(dt), p32, plan) for dt in (F32, amp)}
    assert p.dtype == F32 and p32.dtype == F32
    torch.testing.assert_close(p, softmoe.soft_topk(scores.to(amp).float(), 2.0, eps=0.05, max_active=3), rtol=0, atol=0)
    for a, b in zip(plan, softmoe.dispatch_plan(p32, 3)):
        assert torch.equal(a, b)
    for dt in (F32, amp):
        assert gathered[dt].dtype == dt and combined[dt].dtype == dt
        torch.testing.assert_close(gathered[dt], softmoe.gather_rows(rows.to(dt), plan), rtol=0, atol=0)
        torch.testing.assert_close(combined[dt], softmoe.combine_rows(ys.to(dt), p32, plan), rtol=0, atol=0)


def test_float64_is_left_alone():
    """Autocast never casts float64 (as for torch's own ops)."""
    x, w_in, w_out, offsets = ffn_inputs("cpu", F64)
    with torch.autocast("cpu", dtype=BF16):
        assert ops.expert_ffn(x, w_in, w_out, offsets).dtype == F64
        assert ops.matmul(x, w_in[0]).dtype == F64
        assert softmoe.soft_topk(x, 2.0).dtype == F64


def test_rules_cover_every_forward_op():
    """Every op has its rule in one of the lists, or follows its input by design (the docstring of
    softmoe/_autocast.py): a new op must be placed."""
    follow = {"dispatch_plan", "gather_rows", "combine_rows"}
    backward = {name for name in dir(torch.ops.softmoe) if name.endswith(("_backward", "_weight_grad"))}
    forward = {name for name in dir(torch.ops.softmoe) if isinstance(getattr(torch.ops.softmoe, name), torch._ops.OpOverloadPacket)} - backward
    assert forward == set(_autocast.LOWER_PRECISION) | set(_autocast.FLOAT32) | follow
    for name in _autocast.LOWER_PRECISION + _autocast.FLOAT32:
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"softmoe::{name}", key), (name, key)


def test_unsupported_autocast_dtype_raises_naming_the_op():
    x, w_in, w_out, offsets = ffn_inputs("cpu")
    torch.set_autocast_dtype("cpu", torch.float8_e4m3fn)  # torch.autocast itself refuses this dtype
    torch.set_autocast_enabled("cpu", True)
    try:
        with pytest.raises(TypeError, match=r"softmoe: expert_ffn: the cpu autocast dtype must be torch.bfloat16 or "
                                            r"torch.float16 .*got torch.float8_e4m3fn"):
            ops.expert_ffn(x, w_in, w_out, offsets)
    finally:
        torch.set_autocast_enabled("cpu", False)
        torch.set_autocast_dtype("cpu", BF16)


# ---- the layers: output dtype, values, gradients ---------------------------------------------


def linear_ffn(d):
    return nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))


def layers(d=32, hidden=48, experts=8):
    return {
        "SoftMoELayer": softmoe.SoftMoELayer(d, hidden, experts, k=2.0, alpha=0.5),
        "SoftMoELayer-gate": softmoe.SoftMoELayer(d, hidden, experts, k=1.5, combine="gate", activation="gelu"),
        "TopKMoE": TopKMoE(d, hidden, experts, top_k=2),
        "SlotSoftMoE": SlotSoftMoE(d, hidden, experts, slots_per_expert=2),
    }


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device,amp", AMP)
@pytest.mark.parametrize("name", list(layers()))
def test_layer_returns_what_an_nn_linear_ffn_returns_and_matches_float32(name, device, amp):
    torch.manual_seed(3)
    module = layers()[name].to(device)
    x = torch.randn(2, 24, 32, device=device)
    g = torch.randn(2, 24, 32, device=device)
    with torch.autocast(device, dtype=amp):
        expected_dtype = linear_ffn(32).to(device)(x).dtype
    assert expected_dtype == amp

    y32 = module(x)
    (y32 * g).sum().backward()
    ref = grads(module)
    module.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=amp):
        y = module(x)
    (y.float() * g).sum().backward()
    assert y.dtype == expected_dtype
    assert rel_err(y, y32) < REL[amp]
    got = grads(module)
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key].dtype == ref[key].dtype == F32, key  # float32 parameters get float32 gradients
        if ref[key].dim() > 0:
            assert rel_err(got[key], ref[key]) < 2 * REL[amp], key
    scalars = [key for key in ref if ref[key].dim() == 0]
    if scalars:
        # A routing scalar's (k's) gradient is a sum of per-token terms of both signs, so its relative
        # error is unbounded where they cancel; the bound is on the terms: the per-token gradients
        # (routing is per token, so the layer on one token gives that token's term).
        terms = {amp_on: [] for amp_on in (False, True)}
        for t in range(x.shape[1]):
            for amp_on in (False, True):
                module.zero_grad(set_to_none=True)
                with torch.autocast(device, dtype=amp, enabled=amp_on):
                    y_t = module(x[:, t : t + 1])
                (y_t.float() * g[:, t : t + 1]).sum().backward()
                terms[amp_on].append(torch.stack([module.get_parameter(k).grad for k in scalars]))
        t32, tamp = torch.stack(terms[False]), torch.stack(terms[True])
        scale = t32.abs().sum(0)
        assert ((tamp - t32).abs().sum(0) < 2 * REL[amp] * scale).all(), (scalars, t32.sum(0), tamp.sum(0), scale)
        torch.testing.assert_close(t32.sum(0), torch.stack([ref[k] for k in scalars]), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device,amp", AMP)
def test_layer_takes_16bit_input_with_float32_weights_under_autocast(device, amp):
    """Inside an autocast model the input may already be 16-bit (e.g. an attention output):
    accepted, as an nn.Linear accepts it; outside autocast the dtypes must still match."""
    layer = softmoe.SoftMoELayer(16, 24, 4).to(device)
    x = torch.randn(10, 16, device=device)
    with torch.autocast(device, dtype=amp):
        y16 = layer(x.to(amp))
        y32 = layer(x)
    assert y16.dtype == y32.dtype == amp
    assert rel_err(y16, y32) < REL[amp]
    with pytest.raises(TypeError, match="x must have the layer's dtype torch.float32"):
        layer(x.to(amp))


def test_layer_input_of_the_layer_dtype_asks_nothing_of_autocast(monkeypatch):
    """The autocast state is read only when the input's dtype differs from the layer's: torch.compile
    before torch 2.13 cannot trace torch.amp.is_autocast_available, so a forward of matching dtypes
    (every layer step outside autocast) must compile with fullgraph=True on those versions too."""
    layer = softmoe.SoftMoELayer(16, 24, 4)
    x = torch.randn(10, 16)

    def asked(*args, **kwargs):
        raise AssertionError("the autocast state was read for an input of the layer's dtype")

    monkeypatch.setattr(torch.amp, "is_autocast_available", asked)
    monkeypatch.setattr(torch, "is_autocast_enabled", asked)
    assert layer(x).shape == (10, 16)
    with pytest.raises(AssertionError, match="autocast state was read"):
        layer(x.to(BF16))


@pytest.mark.parametrize("method,arch", [("convert", a) for a in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")]
                         + [("upcycle", "llama")])
def test_converted_hf_block_returns_what_the_replaced_block_returns(method, arch):
    """transformers' MoE blocks return their input's dtype under autocast (they sum the experts into
    zeros_like(hidden_states)), a dense MLP the autocast dtype: the SoftMoE blocks do the same."""
    pytest.importorskip("transformers")
    import softmoe.hf as H
    from test_hf import build, tokens

    original, converted = build(method, arch)
    names = [name for name, m in converted.named_modules() if isinstance(m, H.SoftMoEBlock)]
    assert names

    def outputs(model):
        seen = []
        handles = [model.get_submodule(name).register_forward_hook(lambda _m, _i, out: seen.append(out))
                   for name in names]
        with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
            logits = model(tokens()).logits
        for h in handles:
            h.remove()
        return logits, [[t.dtype for t in out] if isinstance(out, tuple) else [out.dtype] for out in seen]

    logits_o, dtypes_o = outputs(original)
    logits_c, dtypes_c = outputs(converted)
    assert dtypes_c == dtypes_o and dtypes_c
    assert dtypes_c[0][0] == (F32 if method == "convert" else BF16)
    assert logits_c.dtype == logits_o.dtype


# ---- opcheck, torch.compile, the profiler --------------------------------------------------------


def opcheck_samples():
    x, w_in, w_out, offsets = ffn_inputs("cpu", rows=12, d=6, hidden=5)
    offsets = torch.tensor([0, 3, 3, 9, 10])
    scores = torch.randn(5, 8)
    p = softmoe.soft_topk(scores, 2.0, eps=0.05, max_active=3)
    plan = softmoe.dispatch_plan(p, 3)
    rows = torch.randn(5, 6)
    ys = torch.randn(plan.pair_token.shape[0], 6)
    leaf = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    k, alpha = torch.tensor(2.0), torch.tensor(0.7)
    return [
        ("matmul", torch.ops.softmoe.matmul.default, (leaf(x), leaf(w_in[0]))),
        ("grouped_mm", torch.ops.softmoe.grouped_mm.default, (leaf(x), leaf(w_in), offsets)),
        ("expert_ffn", torch.ops.softmoe.expert_ffn.default, (leaf(x), leaf(w_in), leaf(w_out), offsets, "swiglu", True)),
        ("soft_topk", torch.ops.softmoe.soft_topk.default, (leaf(scores.bfloat16()), leaf(k), leaf(alpha), 0.05, 3)),
        ("gather_rows", torch.ops.softmoe.gather_rows.default, (leaf(rows), plan.pair_token, plan.token_pairs)),
        ("combine_rows", torch.ops.softmoe.combine_rows.default,
         (leaf(ys.bfloat16()), leaf(p), plan.pair_token, plan.pair_expert, plan.token_pairs)),
    ]


@pytest.mark.parametrize("name,op,args", opcheck_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck_under_autocast(name, op, args):
    with torch.autocast("cpu", dtype=BF16):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", ["SoftMoELayer", "TopKMoE"])
def test_compile_under_autocast(name):
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(4)
    module = layers(d=16, hidden=24, experts=4)[name]
    x = torch.randn(2, 10, 16)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    try:
        with torch.autocast("cpu", dtype=BF16):
            eager = module(x)
            (eager.float().sum()).backward()
            ref = grads(module)
            module.zero_grad(set_to_none=True)
            out = compiled(x)
            out.float().sum().backward()
    finally:
        torch._dynamo.reset()
    assert out.dtype == eager.dtype == BF16
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    got = grads(module)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)


def test_profiler_sees_the_expert_and_router_matmuls_in_bfloat16():
    """Every matrix product of a SoftMoELayer step under bf16 autocast, forward and backward, on the
    main thread or a worker, runs on bfloat16 operands; the expert op itself receives bfloat16."""
    from torch.profiler import ProfilerActivity, profile

    layer = softmoe.SoftMoELayer(32, 48, 8)
    x = torch.randn(64, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        layer(x).float().sum().backward()
    events = list(prof.events())
    mms = [e for e in events if e.name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm")]
    assert len(mms) >= 2 * 8  # at least the forward's two products per expert
    assert {dt for e in mms for dt in e.input_dtypes if dt} == {"c10::BFloat16"}
    for op in ("softmoe::expert_ffn", "softmoe::matmul", "softmoe::expert_ffn_backward"):
        assert any(e.input_dtypes and e.input_dtypes[0] == "c10::BFloat16" for e in events if e.name == op), op


# ---- fp16 with torch.amp.GradScaler ---------------------------------------------------------------


def budget_model(device):
    torch.manual_seed(5)
    blocks = nn.ModuleList([softmoe.SoftMoELayer(16, 24, 4, k=2.0) for _ in range(2)]).to(device)
    budget = softmoe.GlobalBudget(list(blocks), mean_k=2.0)
    return blocks, budget


def routing_state(blocks, budget):
    return [t.detach().clone() for t in [budget.theta, budget.allocation()] + [b.k_logit for b in blocks]]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_grad_scaler_skips_an_overflowing_fp16_step_and_keeps_k_and_the_budget(device):
    blocks, budget = budget_model(device)
    params = [p for p in blocks.parameters() if p.requires_grad]
    # the budget with its own optimizer, as examples/train_lm.py gives it its own learning rate
    opt, opt_budget = torch.optim.SGD(params, lr=0.1), torch.optim.SGD(budget.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**40)  # overflows fp16 gradients (max 65504)
    x = torch.randn(3, 10, 16, device=device)

    def step(inp):
        opt.zero_grad(set_to_none=True)
        opt_budget.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=F16):
            h = inp
            for block in blocks:
                h = h + block(h)
            loss = h.float().square().mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.step(opt_budget)
        scaler.update()
        return loss

    weights = [p.detach().clone() for p in params]
    before = routing_state(blocks, budget)
    step(x)
    assert scaler.get_scale() < 2.0**40  # an inf was found: the scale backs off
    for a, b in zip(routing_state(blocks, budget), before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # k and the budget untouched
    for a, b in zip(params, weights):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=0)

    # an input that overflows fp16 in the forward (inf activations, NaN loss): skipped as well
    scale = scaler.get_scale()
    step(x * 1e6)
    assert scaler.get_scale() < scale
    for a, b in zip(routing_state(blocks, budget), before):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # back to normal scales: steps go through and k, the budget and the weights move, finitely
    scaler.update(2.0**8)
    loss = step(x)
    assert torch.isfinite(loss)
    after = routing_state(blocks, budget)
    assert all(torch.isfinite(t).all() for t in after)
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[1], before[1])
    assert abs(float(after[1].sum()) - 2 * 2.0) < 1e-5  # the budget invariant holds
    assert all(torch.isfinite(p).all() for p in params)
