"""torch.compile(fullgraph=True) through softmoe.soft_topk: no graph breaks, same results as eager."""
import pytest
import torch
import torch._dynamo

import softmoe
from conftest import random_scores

F64 = torch.float64


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def route_float_k(scores, w):
    logits = scores @ w
    p = softmoe.soft_topk(logits, 2.5, 0.5, eps=0.02, max_active=6)
    return (p * logits).sum(), p


def route_tensor_k(scores, w, k, alpha):
    logits = scores @ w
    p = softmoe.soft_topk(logits, k, alpha, eps=0.02)
    return (p * logits.tanh()).sum(), p


def _inputs(dtype=torch.float32):
    scores = random_scores(16, 12, dtype=dtype).requires_grad_(True)
    w = (torch.randn(12, 8, dtype=F64) / 3).to(dtype).requires_grad_(True)
    k = torch.tensor(3.0, dtype=dtype, requires_grad=True)
    alpha = torch.full((16,), 0.7, dtype=dtype).requires_grad_(True)
    return scores, w, k, alpha


def _run(fn, args):
    """Forward and backward; returns the outputs and the gradients of every leaf that requires grad."""
    args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
    loss, p = fn(*args)
    loss.backward()
    return [loss.detach(), p.detach()] + [a.grad for a in args if a.requires_grad]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("backend", ["aot_eager"])  # inductor: see test_compile_tensor_k (compile time)
def test_compile_float_k(backend, dtype):
    scores, w, _, _ = _inputs(dtype)
    eager = _run(route_float_k, (scores, w))
    compiled = _run(torch.compile(route_float_k, fullgraph=True, backend=backend), (scores, w))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, **tol)


def test_compile_tensor_k():
    args = _inputs(torch.float32)
    eager = _run(route_tensor_k, args)
    compiled = _run(torch.compile(route_tensor_k, fullgraph=True, backend="aot_eager"), args)
    assert len(compiled) == 6  # loss, p, and gradients of scores, w, k, alpha
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


def _op_only_tensor_k(s, k, alpha):
    return softmoe.soft_topk(s, k, alpha, eps=0.02)


def test_compile_inductor():
    """Inductor on a graph that is only the op with tensor k/alpha, so nothing is code-generated (a cold
    C++ build costs ~15 s; a python k is materialised by a generated kernel, so that case runs on
    aot_eager above, which traces the same fake kernels and autograd formula)."""
    scores, _, k, alpha = _inputs(torch.float32)
    args = (scores, k, alpha)
    g = torch.randn(16, 12)

    def run(f):
        leaves = [a.detach().clone().requires_grad_(True) for a in args]
        p = f(*leaves)
        p.backward(g)
        return [p.detach()] + [a.grad for a in leaves]

    eager = run(_op_only_tensor_k)
    compiled = run(torch.compile(_op_only_tensor_k, fullgraph=True, backend="inductor"))
    assert len(compiled) == 4
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)


def test_compile_dynamic_shapes():
    """Two different numbers of rows through one dynamic compiled graph."""
    fn = torch.compile(route_float_k, fullgraph=True, backend="aot_eager", dynamic=True)
    for rows in (5, 9):
        scores = random_scores(rows, 12).float().requires_grad_(True)
        w = (torch.randn(12, 8) / 3).requires_grad_(True)
        compiled = _run(fn, (scores, w))
        eager = _run(route_float_k, (scores, w))
        for c, e in zip(compiled, eager):
            torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5)


def test_compile_raw_op():
    def f(s, k, a):
        p, thr = torch.ops.softmoe.soft_topk(s, k, a, 0.05, 8)
        return p, thr

    s = random_scores(4, 8)
    k = torch.tensor(2.0, dtype=F64)
    a = torch.tensor(0.5, dtype=F64)
    p_c, t_c = torch.compile(f, fullgraph=True, backend="inductor")(s, k, a)
    p_e, t_e = f(s, k, a)
    torch.testing.assert_close(p_c, p_e, rtol=0, atol=0)
    torch.testing.assert_close(t_c, t_e, rtol=0, atol=0)
    assert t_c.dtype == F64 and t_c.shape == (4,)


@pytest.mark.parametrize("fn, nargs", [(route_float_k, 2), (route_tensor_k, 4)])
def test_no_graph_breaks(fn, nargs):
    args = _inputs()[:nargs]
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
