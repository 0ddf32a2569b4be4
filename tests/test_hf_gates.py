"""softmoe.hf_gates: the pretrained routers' gates in SoftMoE terms.

In the sharp limit (the soft top-k of the gate's selection scores with k = the router's top-k and
a tiny alpha) Gate.weights equals each family's router, transcribed here from transformers 5.23
(Mixtral, Qwen2-MoE without renormalisation, gpt-oss / Granite, DeepSeek-V2 and -V3, ERNIE-4.5,
Kolibri, Laguna, Llama 4, PhiMoE); away from it gradients reach logits, k and alpha (float64
gradcheck of the gate alone and of a SoftMoEBlock with a DeepSeek-V3 gate); argument errors;
the selection bias stays float32 under a 16-bit cast.
"""
import math

import pytest
import torch
from torch.func import functional_call

import softmoe
from softmoe.hf_gates import Gate, SparseMixerGate

from test_layer import single_thread  # noqa: F401  (the fixture: thousands of tiny op calls run on one thread)

E, TOP_K = 8, 2
SHARP = 1e-8


def logits(rows=64, experts=E, seed=0, std=4.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, experts, generator=g, dtype=torch.float64) * std).to(dtype)


def sharp(gate, l, k=TOP_K):
    """The gate's combine weights with the soft top-k in its sharp limit."""
    p = softmoe.soft_topk(gate.selection(gate.logits(l)), k * (1 - 1e-6), alpha=SHARP, eps=1e-2,
                          max_active=min(gate.eligible, k + 2))
    return p, gate.weights(gate.logits(l), p)


def scatter(index, values, like):
    return torch.zeros_like(like).scatter_(1, index, values.to(like.dtype))


# ---- the routers, transcribed -------------------------------------------------------------------


def mixtral(l, normalize=True):
    probs = torch.softmax(l, -1)
    top, index = probs.topk(TOP_K, -1)
    if normalize:
        top = top / top.sum(-1, keepdim=True)
    return scatter(index, top, l)


def gpt_oss(l, bias):
    top, index = (l + bias).topk(TOP_K, -1)
    return scatter(index, torch.softmax(top, -1), l)


def deepseek_v3(l, bias, n_group, topk_group, scale, normalize=True):
    scores = l.sigmoid()
    choice = scores + bias
    group_scores = choice.view(-1, n_group, E // n_group).topk(2, -1)[0].sum(-1)
    group_idx = group_scores.topk(topk_group, -1, sorted=False)[1]
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    mask = mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E)
    choice = choice.masked_fill(~mask.bool(), float("-inf"))
    index = choice.topk(TOP_K, -1, sorted=False)[1]
    w = scores.gather(1, index)
    if normalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return scatter(index, w * scale, l)


def deepseek_v2_grouped(l, n_group, topk_group, scale):
    scores = l.softmax(-1)
    group_scores = scores.view(-1, n_group, E // n_group).max(-1).values
    group_idx = group_scores.topk(topk_group, -1, sorted=False)[1]
    mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    mask = mask.unsqueeze(-1).expand(-1, n_group, E // n_group).reshape(-1, E)
    w, index = scores.masked_fill(~mask.bool(), 0.0).topk(TOP_K, -1, sorted=False)
    return scatter(index, w * scale, l)


def ernie(l, bias, norm_min):
    probs = torch.softmax(l, -1)
    index = (probs + bias).topk(TOP_K, -1)[1]
    w = probs.gather(-1, index)
    return scatter(index, w / w.sum(-1, keepdim=True).clamp(min=norm_min), l)


def kolibri(l, bias):
    index = (l + bias).topk(TOP_K, -1)[1]
    w = l.gather(1, index).sigmoid()
    return scatter(index, w / w.sum(-1, keepdim=True), l)


def laguna(l, bias, cap, scale):
    l = torch.tanh(l / cap) * cap
    scores = l.sigmoid()
    index = (scores + bias).topk(TOP_K, -1)[1]
    w = scores.gather(-1, index)
    return scatter(index, w / w.sum(-1, keepdim=True) * scale, l)


def phimoe(scores, jitter_eps):
    """transformers' sparsemixer in evaluation mode (top-2)."""
    threshold, max_ind = scores.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    masked = scores.masked_fill(((threshold - scores) / factor) > (2 * jitter_eps), float("-inf"))
    first = torch.softmax(masked, -1).gather(-1, max_ind)
    rest = torch.scatter(scores, -1, max_ind, float("-inf"))
    threshold2, max_ind2 = rest.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold2)
    masked2 = rest.masked_fill(((threshold2 - scores) / factor) > (2 * jitter_eps), float("-inf"))
    second = torch.softmax(masked2, -1).gather(-1, max_ind2)
    return scatter(torch.cat([max_ind, max_ind2], -1), torch.cat([first, second], -1), scores)


BIAS = torch.randn(E, generator=torch.Generator().manual_seed(5)) * 0.05


CASES = {
    "mixtral": (lambda: Gate(E), lambda l: mixtral(l)),
    "qwen2_moe (no renormalisation)": (lambda: Gate(E, normalize=False), lambda l: mixtral(l, normalize=False)),
    "gpt_oss (router bias)": (lambda: Gate(E), lambda l: gpt_oss(l, 0.0)),
    "deepseek_v3": (lambda: Gate(E, score="sigmoid", choose_by="scores", bias=BIAS, groups=(4, 2), scale=2.5,
                                 denominator_eps=1e-20), lambda l: deepseek_v3(l, BIAS, 4, 2, 2.5)),
    "deepseek_v3 (norm_topk_prob=False)": (lambda: Gate(E, score="sigmoid", choose_by="scores", bias=BIAS, groups=(2, 1),
                                                        normalize=False), lambda l: deepseek_v3(l, BIAS, 2, 1, 1.0, False)),
    "deepseek_v2 (group_limited_greedy)": (lambda: Gate(E, normalize=False, groups=(4, 2), group_score="max", scale=1.5),
                                           lambda l: deepseek_v2_grouped(l, 4, 2, 1.5)),
    "ernie4_5_moe": (lambda: Gate(E, choose_by="scores", bias=BIAS, denominator_min=0.3), lambda l: ernie(l, BIAS, 0.3)),
    "kolibri1 (bias on the logits)": (lambda: Gate(E, score="sigmoid", bias=BIAS * 20), lambda l: kolibri(l, BIAS * 20)),
    "laguna (softcap)": (lambda: Gate(E, score="sigmoid", choose_by="scores", bias=BIAS, softcap=6.0, scale=1.7),
                         lambda l: laguna(l, BIAS, 6.0, 1.7)),
    "phimoe": (lambda: SparseMixerGate(E, jitter_eps=0.3), lambda l: phimoe(l, 0.3)),
}


@pytest.mark.parametrize("family", list(CASES))
def test_sharp_limit_is_the_router(family):
    make, router = CASES[family]
    gate = make()
    l = logits()
    p, w = sharp(gate, l)
    want = router(l)
    assert torch.equal(p > 0, want > 0), family  # the active set is the router's top-k
    torch.testing.assert_close(w, want, rtol=1e-5, atol=1e-6)


def test_gpt_oss_router_bias_enters_as_logits():
    """gpt-oss adds its bias to the logits before the top-k and the softmax: a converted block's
    router carries the bias, so the gate sees biased logits."""
    bias = torch.randn(E, generator=torch.Generator().manual_seed(2))
    l = logits()
    _, w = sharp(Gate(E), l + bias)
    torch.testing.assert_close(w, gpt_oss(l, bias), rtol=1e-5, atol=1e-6)


def test_llama4_gate_scales_inputs_and_sums_outputs():
    gate = Gate(E, score="sigmoid", normalize=False, on_input=True)
    l = logits()
    p, w = sharp(gate, l, k=1)
    assert torch.equal(w, p)  # outputs weighted by p (1 on the top-1): the sigmoid scales the input instead
    assert torch.equal(p > 0, l == l.max(-1, keepdim=True).values)


def test_group_limited_choice_never_leaves_the_chosen_groups():
    gate = Gate(16, score="sigmoid", choose_by="scores", groups=(4, 1))
    l = logits(experts=16, rows=200)
    s = gate.selection(l)
    finite = torch.isfinite(s).view(200, 4, 4)
    assert bool((finite.all(-1).sum(-1) == 1).all()) and bool((finite.any(-1).sum(-1) == 1).all())
    assert gate.eligible == 4
    p = softmoe.soft_topk(s, 2.5, alpha=0.5, eps=1e-2, max_active=4)
    assert bool((p[~torch.isfinite(s)] == 0).all())  # soft routing stays inside the groups too
    filled = Gate(16, score="sigmoid", choose_by="scores", groups=(4, 1), group_fill=0.0)
    assert filled.eligible == 16 and bool(torch.isfinite(filled.selection(l)).all())


def test_soft_weights_modulate_the_gate():
    """Away from the sharp limit the weights are p * g (renormalised): a half-active expert gets
    half its gate score before renormalisation."""
    gate = Gate(E)
    l = logits(rows=4)
    p = softmoe.soft_topk(l, 1.5, alpha=SHARP, eps=1e-2, max_active=4)
    g = torch.softmax(l, -1)
    w = gate.weights(l, p)
    top2 = l.topk(2).indices
    first, second = g.gather(1, top2[:, :1]), g.gather(1, top2[:, 1:])
    torch.testing.assert_close(w.gather(1, top2[:, 1:]), 0.5 * second / (first + 0.5 * second))
    torch.testing.assert_close(w.sum(-1), torch.ones(4))


# ---- gradients ----------------------------------------------------------------------------------


GRAD_GATES = {
    "softmax": lambda: Gate(6),
    "softmax, not renormalised, scaled": lambda: Gate(6, normalize=False, scale=1.3),
    "sigmoid + selection bias + groups": lambda: Gate(6, score="sigmoid", choose_by="scores", groups=(3, 2),
                                                      bias=torch.tensor([0.05, -0.02, 0.0, 0.03, -0.04, 0.01]),
                                                      denominator_eps=1e-20, scale=2.0),
    "sigmoid, softcap": lambda: Gate(6, score="sigmoid", softcap=3.0),
    "sparse mixer": lambda: SparseMixerGate(6, jitter_eps=0.4),
}


@pytest.mark.parametrize("name", list(GRAD_GATES))
def test_gradcheck_gate_through_the_soft_topk(name, single_thread):
    """float64 gradcheck of weights(logits, soft_topk(selection(logits), k, alpha)) w.r.t. the
    logits, k and alpha, soft enough that every input gets a gradient."""
    gate = GRAD_GATES[name]().double()
    l = logits(rows=5, experts=6, seed=3, std=1.0, dtype=torch.float64).requires_grad_(True)
    k = torch.tensor(2.3, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)

    def fn(l, k, alpha):
        x = gate.logits(l)
        p = softmoe.soft_topk(gate.selection(x), k, alpha, eps=1e-2, max_active=gate.eligible)
        return gate.weights(x, p)

    assert torch.autograd.gradcheck(fn, (l, k, alpha), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_converted_block_with_a_deepseek_gate(single_thread):
    """float64 gradcheck of a SoftMoEBlock with a DeepSeek-V3 gate and combine="gate" w.r.t. the
    input, router, experts, k and alpha (the layer's own routing path, with the gate's)."""
    hf = pytest.importorskip("softmoe.hf")
    torch.manual_seed(4)
    gate = Gate(6, score="sigmoid", choose_by="scores", groups=(3, 2), bias=torch.randn(6) * 0.05, scale=1.5)
    block = hf.SoftMoEBlock(4, 3, 6, gate=gate, k=2.2, alpha=0.3, max_active=4, combine="gate", learn_alpha=True).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    names = [n for n, _ in block.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in block.named_parameters()]
    assert {"k_logit", "log_alpha", "router.weight", "experts.w_in", "experts.w_out"} <= set(names)

    def fn(x, *ps):
        return functional_call(block, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, [x.requires_grad_(True)] + params, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---- arguments and dtypes ----------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    (dict(score="relu"), "score must be 'softmax' or 'sigmoid'"),
    (dict(choose_by="probs"), "choose_by must be 'logits' or 'scores'"),
    (dict(group_score="mean"), "group_score must be 'top2' or 'max'"),
    (dict(scale=0.0), "scale must be a finite number > 0"),
    (dict(scale=math.inf), "scale must be a finite number > 0"),
    (dict(softcap=-1.0), "softcap must be None or > 0"),
    (dict(groups=(3, 1)), "groups .* must split the 8 experts into equal groups"),
    (dict(groups=(4, 5)), "1 <= topk_group <= n_group"),
    (dict(groups=(8, 1)), "group_score 'top2' needs at least 2 experts per group"),
    (dict(bias=torch.zeros(7)), r"bias must have shape \[8\]"),
])
def test_gate_argument_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        Gate(E, **kw)
    with pytest.raises(ValueError, match="jitter_eps must be a finite number >= 0"):
        SparseMixerGate(E, jitter_eps=-0.1)


def test_selection_bias_stays_float32_under_a_16_bit_cast():
    gate = Gate(E, score="sigmoid", choose_by="scores", bias=BIAS).to(torch.bfloat16)
    assert gate.bias.dtype == torch.float32
    assert torch.equal(gate.bias, BIAS)
    assert Gate(E, bias=BIAS).double().bias.dtype == torch.float64
