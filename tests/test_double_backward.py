"""Second derivatives (a backward taken with create_graph=True, then another backward through it).

The linear ops (gather_rows, combine_rows, grouped_mm, matmul) are twice differentiable: float64
gradgradcheck, and opcheck of their backward ops with inputs that require grad. soft_topk and
expert_ffn (so SoftMoELayer) are differentiable once: a second backward raises a NotImplementedError
naming the op, instead of torch's autograd fallback ("may lead to silently incorrect behavior").
"""
import pytest
import torch

import softmoe
from softmoe import ops

from test_dispatch import random_p
from test_experts import make

OPS = torch.ops.softmoe
F64 = torch.float64


def plan_and_rows(trim: bool):
    T, E, M, d = 9, 4, 2, 3
    p = random_p(T, E, M, seed=8)
    plan = ops.dispatch_plan(p, M)
    if trim:
        plan = plan.trim()
    slots = plan.pair_token.shape[0]
    return p, plan, slots, d


@pytest.mark.parametrize("trim", [False, True], ids=["padded", "trimmed"])
def test_gather_rows_gradgradcheck(trim):
    p, plan, _, d = plan_and_rows(trim)
    x = torch.randn(p.shape[0], d, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda v: ops.gather_rows(v, plan), (x,))


@pytest.mark.parametrize("trim", [False, True], ids=["padded", "trimmed"])
def test_combine_rows_gradgradcheck(trim):
    p, plan, slots, d = plan_and_rows(trim)
    ys = torch.randn(slots, d, dtype=F64, requires_grad=True)
    pg = p.clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda a, b: ops.combine_rows(a, b, plan), (ys, pg))


def test_grouped_mm_gradgradcheck():
    x, w_in, _, offsets = make(3, 10, 4, 3, 5, "gelu", counts=[4, 0, 5])  # one empty segment, one padding row
    assert torch.autograd.gradgradcheck(lambda a, b: ops.grouped_mm(a, b, offsets), (x, w_in))


def test_matmul_gradgradcheck():
    a = torch.randn(5, 4, dtype=F64, requires_grad=True)
    b = torch.randn(4, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(ops.matmul, (a, b))


def test_gradient_penalty_through_the_dispatch_ops_matches_plain_torch():
    """A gradient penalty through gather -> grouped_mm -> combine equals the same computation
    written with plain torch indexing (float64)."""
    p, plan, _, d = plan_and_rows(trim=True)
    T, E = p.shape
    w = torch.randn(E, d, 2, dtype=F64, requires_grad=True)
    x = torch.randn(T, d, dtype=F64, requires_grad=True)

    def penalty(model):
        y = model(x)
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
        return torch.autograd.grad(g.square().sum(), w)[0]

    def with_ops(v):
        return ops.combine_rows(ops.grouped_mm(ops.gather_rows(v, plan), w, plan.offsets), p, plan)

    def with_torch(v):
        n = int(plan.offsets[-1])
        tok, exp = plan.pair_token[:n], plan.pair_expert[:n]
        rows = torch.einsum("sd,sdo->so", v[tok], w[exp]) * p[tok, exp].unsqueeze(1)
        return torch.zeros(T, 2, dtype=F64).index_add(0, tok, rows)

    torch.testing.assert_close(penalty(with_ops), penalty(with_torch), rtol=1e-12, atol=1e-12)


def backward_op_samples():
    """The linear backward ops with inputs that require grad: opcheck then also checks their autograd
    kernels (registered, and usable by AOT autograd)."""
    out = []
    for dtype in (torch.float32, F64):
        for trim in (False, True):
            T, E, M, d = 11, 5, 2, 3
            p = random_p(T, E, M, dtype, seed=7)
            plan = ops.dispatch_plan(p, M)
            if trim:
                plan = plan.trim()
            _, pair_token, pair_expert, token_pairs = plan
            slots = pair_token.shape[0]
            ys = torch.randn(slots, d, dtype=dtype, requires_grad=True)
            gy = torch.randn(T, d, dtype=dtype, requires_grad=True)
            out.append((OPS.gather_rows_backward.default, (ys, token_pairs)))
            out.append((OPS.combine_rows_backward.default,
                        (gy, ys, p.clone().requires_grad_(True), pair_token, pair_expert, token_pairs)))
        x, w_in, _, offsets = make(3, 10, 4, 3, 5, "gelu", dtype, counts=[4, 0, 5])
        out.append((OPS.grouped_mm_weight_grad.default,
                    (x, torch.randn(10, w_in.shape[2], dtype=dtype, requires_grad=True), offsets, 3)))
    return out


@pytest.mark.parametrize("op,args", backward_op_samples(), ids=lambda v: getattr(v, "__name__", None) or "")
def test_opcheck_backward_ops_with_grad(op, args):
    torch.library.opcheck(op, args)


def second_backward(fn, *inputs):
    out = fn(*inputs)
    (g,) = torch.autograd.grad(out.square().sum(), inputs[0], create_graph=True)
    g.square().sum().backward()


def test_soft_topk_second_backward_names_the_op():
    scores = torch.randn(4, 6, requires_grad=True)
    with pytest.raises(NotImplementedError, match=r"soft_topk can be differentiated once.*softmoe::soft_topk_backward"):
        second_backward(lambda s: softmoe.soft_topk(s, 2.0, alpha=0.5, eps=1e-2), scores)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_expert_ffn_second_backward_names_the_op(activation):
    x, w_in, w_out, offsets = make(3, 10, 4, 3, 5, activation, counts=[4, 0, 5])
    with pytest.raises(NotImplementedError, match=r"expert_ffn can be differentiated once.*softmoe::expert_ffn_backward"):
        second_backward(lambda v: ops.expert_ffn(v, w_in, w_out, offsets, activation), x)


def test_layer_second_backward_raises_and_first_order_create_graph_works():
    layer = softmoe.SoftMoELayer(8, d_hidden=16, num_experts=4, k=2.0, eps=1e-2, max_active=3)
    x = torch.randn(5, 8, requires_grad=True)
    with pytest.raises(NotImplementedError, match=r"softmoe::(soft_topk|expert_ffn)_backward"):
        second_backward(layer, x)
    # create_graph=True on its own is fine: the first-order gradient is the usual one.
    (g_graph,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    (g_plain,) = torch.autograd.grad(layer(x).square().sum(), x)
    assert torch.equal(g_graph.detach(), g_plain)


def test_the_fallback_warning_fails_the_suite():
    """pyproject.toml's filterwarnings turns torch's "silently incorrect" fallback warning into an
    error: an op without an autograd kernel, backpropagated through, fails the test that does it."""
    lib = torch.library.Library("softmoe_fallback_probe", "DEF")
    lib.define("twice(Tensor x) -> Tensor")
    lib.impl("twice", lambda x: x * 2, "CPU")
    y = torch.ops.softmoe_fallback_probe.twice(torch.randn(3, requires_grad=True))
    with pytest.raises(UserWarning, match="an autograd kernel was not registered"):
        y.sum().backward()
