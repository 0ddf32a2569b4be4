"""Determinism beyond run-to-run and 1-vs-2-thread repeats (those are in test_soft_topk.py,
test_dispatch.py and test_layer.py): batch splits, concurrent calls from two Python threads, and
the 16-bit dtypes across thread counts.

What the math says, and what is tested:
- soft_topk and the dispatch pipeline (dispatch_plan -> gather_rows -> a row-wise function ->
  combine_rows) treat every row / token on its own, in a fixed order: routing a batch in two
  halves gives the same bits per token, forward and backward (per-row k / alpha gradients too).
- SoftMoELayer adds matmuls (the router's, the experts' per row block). BLAS picks its
  blocking from the number of rows, so a row's result can differ in the last bits when the batch
  is split (measured: relative 1.3e-7 float32, 3e-16 float64). The layer's per-token outputs and
  input gradients across a split agree within SPLIT_RTOL of the output's scale, not bit for bit.
- Two Python threads calling the ops (or one shared layer) at the same time get exactly the results
  of serial calls: the ops keep no global state.
"""
import threading

import pytest
import torch

import softmoe
from softmoe import ops

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
CUTS = (1, 37, 1500, 2999)  # one-row halves, an odd cut, the middle, one row left over
ROWS = 3000  # enough rows for the CPU kernels to split the work over 2 threads


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _soft_topk_fwd_bwd(scores, k, alpha, g, eps, max_active):
    r = scores.clone().requires_grad_(True)
    kk = k.clone().requires_grad_(True)
    aa = alpha.clone().requires_grad_(True)
    p = softmoe.soft_topk(r, kk, aa, eps=eps, max_active=max_active)
    p.backward(g)
    return p.detach(), r.grad, kk.grad, aa.grad


# ---- batch splits ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, F32, BF16])
@pytest.mark.parametrize("eps, max_active", [(0.0, None), (0.02, 6)])
def test_soft_topk_batch_split_is_bit_identical(dtype, eps, max_active, two_threads):
    gen = torch.Generator().manual_seed(3)
    E = 64
    scores = (torch.randn(ROWS, E, generator=gen, dtype=F64) * 2).to(dtype)
    mdt = F64 if dtype == F64 else F32
    k = (0.5 + 4 * torch.rand(ROWS, generator=gen, dtype=F64)).to(mdt)  # per row: gradients per row
    alpha = (0.2 + torch.rand(ROWS, generator=gen, dtype=F64)).to(mdt)
    g = torch.randn(ROWS, E, generator=gen, dtype=F64).to(dtype)
    whole = _soft_topk_fwd_bwd(scores, k, alpha, g, eps, max_active)
    for cut in CUTS:
        a = _soft_topk_fwd_bwd(scores[:cut], k[:cut], alpha[:cut], g[:cut], eps, max_active)
        b = _soft_topk_fwd_bwd(scores[cut:], k[cut:], alpha[cut:], g[cut:], eps, max_active)
        for name, full, x, y in zip(("p", "grad scores", "grad k", "grad alpha"), whole, a, b):
            assert torch.equal(torch.cat([x, y]), full), f"{name} differs when split at row {cut}"


def _pipeline(x, p, max_active):
    """The layer's dispatch path with a row-wise stand-in for the experts."""
    x = x.clone().requires_grad_(True)
    p = p.clone().requires_grad_(True)
    plan = ops.dispatch_plan(p.detach(), max_active)
    y = ops.combine_rows(torch.sin(ops.gather_rows(x, plan)) * 1.5, p, plan)
    gx, gp = torch.autograd.grad(y, (x, p), torch.cos(3 * y.detach()))
    return y.detach(), gx, gp, plan.tokens_per_expert()


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_dispatch_pipeline_batch_split_is_bit_identical(dtype, two_threads):
    gen = torch.Generator().manual_seed(5)
    E, M, d = 16, 4, 32
    x = torch.randn(ROWS, d, generator=gen).to(dtype)
    p = softmoe.soft_topk(torch.randn(ROWS, E, generator=gen) * 3, 2.0, 1.0, eps=1e-2, max_active=M).to(dtype)
    y, gx, gp, load = _pipeline(x, p, M)
    for cut in CUTS:
        a, b = _pipeline(x[:cut], p[:cut], M), _pipeline(x[cut:], p[cut:], M)
        assert torch.equal(torch.cat([a[0], b[0]]), y), f"y differs when split at {cut}"
        assert torch.equal(torch.cat([a[1], b[1]]), gx), f"grad x differs when split at {cut}"
        assert torch.equal(torch.cat([a[2], b[2]]), gp), f"grad p differs when split at {cut}"
        assert torch.equal(a[3] + b[3], load), "tokens per expert must add up"


# The layer across batch splits: BLAS rounding of the matmuls (see the module docstring); the
# bound is relative to max |y| (resp. max |grad x|), ~64 ulps of the math type.
SPLIT_RTOL = {F32: 64 * torch.finfo(F32).eps, F64: 64 * torch.finfo(F64).eps}


def _layer_fwd_bwd(layer, x, g):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (gx,) = torch.autograd.grad(y, (x,), g)
    return y.detach(), gx


@pytest.mark.parametrize("dtype", [F32, F64])
def test_layer_batch_split_within_rounding(dtype, two_threads):
    torch.manual_seed(0)
    layer = softmoe.SoftMoELayer(32, 48, 8, k=2.0, max_active=4).to(dtype)
    gen = torch.Generator().manual_seed(7)
    T = 1024
    x = torch.randn(T, 32, generator=gen, dtype=F64).to(dtype)
    g = torch.randn(T, 32, generator=gen, dtype=F64).to(dtype)
    y, gx = _layer_fwd_bwd(layer, x, g)
    # Routing given the same logits is bit-identical per token (soft_topk is per row); the layer's
    # own logits may differ in the last bit (the router's matmul over another number of rows).
    with torch.no_grad():
        logits = layer.router(x).to(F64 if dtype == F64 else F32)
        p = softmoe.soft_topk(logits, layer.k, layer.alpha, eps=layer.eps, max_active=layer.max_active)
    rtol = SPLIT_RTOL[dtype]
    for cut in (1, 333, T - 1):
        with torch.no_grad():
            pa = softmoe.soft_topk(logits[:cut], layer.k, layer.alpha, eps=layer.eps, max_active=layer.max_active)
            pb = softmoe.soft_topk(logits[cut:], layer.k, layer.alpha, eps=layer.eps, max_active=layer.max_active)
        assert torch.equal(torch.cat([pa, pb]), p)
        a, b = _layer_fwd_bwd(layer, x[:cut], g[:cut]), _layer_fwd_bwd(layer, x[cut:], g[cut:])
        dy = (torch.cat([a[0], b[0]]) - y).abs().max() / y.abs().max()
        dg = (torch.cat([a[1], b[1]]) - gx).abs().max() / gx.abs().max()
        assert dy <= rtol and dg <= rtol, f"split at {cut}: y {dy.item():.2e}, grad x {dg.item():.2e} > {rtol:.2e}"


# ---- concurrent calls from two Python threads ------------------------------------------------


def _concurrently(fns, repeats):
    """Runs every fn in its own Python thread, `repeats` times each, all started together; returns
    each thread's list of results (an exception in a thread is re-raised here)."""
    results = [[] for _ in fns]
    errors = []
    start = threading.Barrier(len(fns))

    def worker(i, fn):
        try:
            start.wait()
            for _ in range(repeats):
                results[i].append(fn())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def _assert_all_equal(results, expected):
    for thread, (runs, want) in enumerate(zip(results, expected)):
        for i, got in enumerate(runs):
            for j, (u, v) in enumerate(zip(got, want)):
                assert torch.equal(u, v), f"thread {thread}, repeat {i}, tensor {j} differs from the serial call"


@pytest.mark.parametrize("torch_threads", [1, 2])
def test_two_python_threads_soft_topk(torch_threads):
    """Different inputs (and eps / max_active) in each thread; every concurrent result equals the
    serial one bit for bit, forward and backward."""
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        gen = torch.Generator().manual_seed(9)
        calls = []
        for eps, max_active, dtype in ((0.0, None, F32), (0.02, 5, F64)):
            scores = torch.randn(2048, 32, generator=gen, dtype=F64).to(dtype)
            k = torch.tensor(2.5, dtype=dtype)
            alpha = torch.tensor(0.5, dtype=dtype)
            g = torch.randn(2048, 32, generator=gen, dtype=F64).to(dtype)
            calls.append(lambda s=scores, k=k, a=alpha, g=g, e=eps, m=max_active: _soft_topk_fwd_bwd(s, k, a, g, e, m))
        expected = [fn() for fn in calls]
        _assert_all_equal(_concurrently(calls, repeats=20), expected)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("torch_threads", [1, 2])
def test_two_python_threads_share_one_layer(torch_threads):
    """Two threads run forward and backward of the same SoftMoELayer on their own inputs; the
    output and the gradients of the input and of every parameter (torch.autograd.grad, so nothing
    accumulates into .grad across threads) equal the serial results bit for bit. (layer.last_stats
    is one attribute: it holds whichever forward finished last.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        torch.manual_seed(1)
        layer = softmoe.SoftMoELayer(32, 48, 8, k=2.0, max_active=4, learn_alpha=True)
        params = list(layer.parameters())
        gen = torch.Generator().manual_seed(11)
        calls = []
        for tokens in (256, 200):
            x = torch.randn(tokens, 32, generator=gen)
            g = torch.randn(tokens, 32, generator=gen)

            def call(x=x, g=g):
                xx = x.clone().requires_grad_(True)
                y = layer(xx)
                return (y.detach(), *torch.autograd.grad(y, [xx] + params, g))

            calls.append(call)
        expected = [fn() for fn in calls]
        _assert_all_equal(_concurrently(calls, repeats=8), expected)
    finally:
        torch.set_num_threads(threads)


# ---- thread counts for the 16-bit dtypes (float32 / float64 are in test_soft_topk.py) --------


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_half_precision_bit_identical_across_thread_counts(dtype):
    gen = torch.Generator().manual_seed(13)
    scores = (torch.randn(ROWS, 64, generator=gen) * 2).to(dtype)
    k = torch.tensor(3.5)
    alpha = torch.tensor(0.5)
    g = torch.randn(ROWS, 64, generator=gen).to(dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _soft_topk_fwd_bwd(scores, k, alpha, g, 0.02, 8)
        torch.set_num_threads(2)
        two = _soft_topk_fwd_bwd(scores, k, alpha, g, 0.02, 8)
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(("p", "grad scores", "grad k", "grad alpha"), one, two):
        assert torch.equal(a, b), f"{name} depends on the thread count"


def test_bfloat16_layer_bit_identical_across_thread_counts():
    torch.manual_seed(2)
    layer = softmoe.SoftMoELayer(32, 48, 8, k=2.0, max_active=4).to(BF16)
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(1024, 32, generator=gen).to(BF16)
    g = torch.randn(1024, 32, generator=gen).to(BF16)
    params = list(layer.parameters())

    def run():
        xx = x.clone().requires_grad_(True)
        y = layer(xx)
        return (y.detach(), *torch.autograd.grad(y, [xx] + params, g))

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    for i, (a, b) in enumerate(zip(one, two)):
        assert torch.equal(a, b), f"tensor {i} depends on the thread count"
