"""Numerical limits of softmoe.soft_topk: the documented accuracy (docs/accuracy.md) asserted on a
subset of its grid, and the behaviour at k -> 0 and k -> max_active.

The bounds are benchmarks/accuracy.py BOUNDS, the same dict the doc is generated from, so the doc
and this test cannot disagree; benchmarks/accuracy.py checks the full grid.

The limits have closed forms (DESIGN.md 2.1-2.2, with x = (r - b) / alpha over the m candidates):
- small k: once every x <= 0 (p_i <= 1/2 for all i), sum_i exp(x_i) / 2 = k gives, for eps = 0,
  p = k * softmax(r / alpha) and dL/dk = sum_i g_i softmax_i exactly; with eps > 0 the top score
  is the only nonzero as soon as k < (eps / (1 - eps)) * (gap to the second score) / alpha.
- k near m: once every x >= 0, 1 - p_i = exp(-x_i) / (2 (1 - eps)), so
  1 - p = (m - k) * softmax(-r / alpha) over the candidates (for every eps), p = 0 elsewhere.
"""
import math
import os

import pytest
import torch

import softmoe
from reference import candidate_mask, reference_soft_topk

import accuracy  # benchmarks/accuracy.py (pyproject.toml: pytest's pythonpath)

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
NAMES = {F64: "float64", F32: "float32", BF16: "bfloat16", F16: "float16"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Hundreds of tiny op calls: one torch thread avoids scheduler stalls on a loaded 2-core box
    (results do not depend on the thread count: test_soft_topk.py / test_determinism.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the documented accuracy, on a subset of the grid ---------------------------------------


@pytest.mark.parametrize("dtype", list(accuracy.DTYPES))
@pytest.mark.parametrize("alpha", [1e-4, 1.0, 1e4])
@pytest.mark.parametrize("experts", [8, 256])
def test_documented_accuracy(dtype, alpha, experts):
    """Every k regime (near 0, mid, near max) and eps in {0, 1e-2} of one (dtype, alpha, E)."""
    bad = []
    for regime in accuracy.K_REGIMES:
        for eps in accuracy.EPSILONS:
            cell = accuracy.measure_cell(dtype, alpha, experts, regime, eps, input_rounding=False)
            bad += accuracy.violations(cell)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("dtype", list(accuracy.DTYPES))
def test_documented_accuracy_at_1024_experts(dtype):
    bad = []
    for regime in accuracy.K_REGIMES:
        cell = accuracy.measure_cell(dtype, 1.0, 1024, regime, 1e-2, rows=2, input_rounding=False)
        bad += accuracy.violations(cell)
    assert not bad, "\n".join(bad)


def test_bounds_are_those_of_the_doc():
    """docs/accuracy.md shows BOUNDS; a changed bound must regenerate the doc
    (python3 benchmarks/accuracy.py --from-json)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "accuracy.md")
    with open(path) as f:
        doc = f.read()
    for dtype in accuracy.BOUNDS:
        row = "| " + dtype + " | " + " | ".join(accuracy.bound_text(dtype, k) for k in accuracy.BOUND_KEYS) + " |"
        assert row in doc, f"docs/accuracy.md lacks the bounds row {row!r}: regenerate it"


# ---- k -> 0 -----------------------------------------------------------------------------------


def _scores(rows, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, n, generator=gen, dtype=F64).to(dtype)


def _fwd_bwd(scores, k, alpha, eps, max_active=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(scores.shape, generator=gen, dtype=F64).to(scores.dtype)
    mdt = F64 if scores.dtype == F64 else F32
    r = scores.clone().requires_grad_(True)
    kk = torch.tensor(k, dtype=mdt, requires_grad=True)
    aa = torch.tensor(alpha, dtype=mdt, requires_grad=True)
    p = softmoe.soft_topk(r, kk, aa, eps=eps, max_active=max_active)
    (p * g).sum().backward()
    return p.detach(), r.grad, kk.grad, aa.grad, g


def _rtol(dtype):
    return {F64: 1e-10, F32: 1e-4, BF16: 2.0 ** -7, F16: 2.0 ** -9}[dtype]


@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16])
@pytest.mark.parametrize("k", [1e-3, 1e-6, 1e-9, 1e-12])
def test_small_k_is_k_times_softmax(dtype, k):
    """eps = 0, k -> 0: p = k softmax(r / alpha) (p -> 0 linearly in k, no NaN), and
    dL/dk = sum_i g_i softmax_i; every gradient finite."""
    scores = _scores(16, 32, dtype)
    alpha = 0.7
    p, gr, gk, ga, g = _fwd_bwd(scores, k, alpha, 0.0)
    mdt = F64 if dtype == F64 else F32
    k_eff = float(torch.tensor(k, dtype=mdt))
    soft = torch.softmax(scores.double() / float(torch.tensor(alpha, dtype=mdt)), -1)
    # float16 p below its normal range (6.1e-5) is subnormal: absolute spacing 2^-24.
    atol = 2.0 ** -24 if dtype == F16 else 0.0
    torch.testing.assert_close(p.double(), k_eff * soft, rtol=_rtol(dtype), atol=atol)
    for t in (p, gr, gk, ga):
        assert bool(torch.isfinite(t).all())
    expected_gk = (g.double() * soft).sum()
    torch.testing.assert_close(gk.double(), expected_gk, rtol=max(_rtol(dtype), 1e-9), atol=1e-12)


@pytest.mark.parametrize("dtype", [F64, F32, BF16])
@pytest.mark.parametrize("eps", [1e-2, 0.2])
def test_small_k_truncated_keeps_only_the_top_expert(dtype, eps):
    """eps > 0, k -> 0: the top candidate is the only nonzero once k < eps/(1-eps) * gap/alpha, and
    it carries all of k; with max_active the same among the candidates."""
    scores = _scores(64, 16, dtype, seed=2)
    alpha = 0.5
    top2 = scores.double().topk(2, -1).values
    gap = top2[:, 0] - top2[:, 1]
    for k in (1e-4, 1e-7):
        p, gr, gk, ga, _ = _fwd_bwd(scores, k, alpha, eps, max_active=4)
        clear = gap / alpha > 2 * k * (1 - eps) / eps
        assert bool(clear.sum() >= 48), "the test needs rows with a clear top score"
        nnz = (p != 0).sum(-1)
        assert bool((nnz[clear] == 1).all())
        top = scores.double().argmax(-1)
        pk = p.double().gather(-1, top.unsqueeze(-1)).squeeze(-1)
        tol = accuracy.bound(NAMES[dtype], "sum_per_active", 16)
        assert bool(((pk[clear] - k).abs() <= max(tol, k * _rtol(dtype))).all())
        for t in (p, gr, gk, ga):
            assert bool(torch.isfinite(t).all())


@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_k_to_zero_is_continuous_at_zero(eps):
    """A per-row k tensor may be exactly 0 (p = 0, zero gradients); tiny k > 0 approaches it."""
    scores = _scores(4, 8, F64, seed=3)
    k = torch.tensor([0.0, 1e-12, 1e-6, 1e-3], dtype=F64, requires_grad=True)
    r = scores.clone().requires_grad_(True)
    p = softmoe.soft_topk(r, k, 0.5, eps=eps)
    assert bool((p[0] == 0).all())
    # Absolute accuracy (the documented bounds); relative accuracy at tiny k with eps > 0 is
    # test_small_k_truncated_relative_accuracy below.
    assert bool((p.sum(-1) - k.detach()).abs().max() <= 8 * accuracy.bound("float64", "sum_per_active", 8))
    assert bool((p[1:] <= k.detach()[1:].unsqueeze(-1) + accuracy.bound("float64", "p_abs", 8)).all())
    (p * torch.randn(4, 8, dtype=F64)).sum().backward()
    assert bool((r.grad[0] == 0).all()) and k.grad[0] == k.grad[0]  # finite, defined
    assert bool(torch.isfinite(r.grad).all()) and bool(torch.isfinite(k.grad).all())


@pytest.mark.parametrize("dtype", [F32, F64])
def test_small_k_truncated_relative_accuracy(dtype):
    """For k << eps one expert is active (a second one only within ~k / eps * alpha of a tie) and
    it carries k exactly: sum(p) = k relative to k, where (F - eps) / (1 - eps) would cancel."""
    scores = _scores(64, 8, F64, seed=3).to(dtype)
    for k in (1e-6, 1e-9):
        p = softmoe.soft_topk(scores, k, 0.5, eps=1e-2).double()
        k_eff = float(torch.tensor(k, dtype=dtype))
        rel = float(((p.sum(-1) - k_eff) / k_eff).abs().max())
        assert rel <= 1e-4, f"k = {k}: sum(p) off by {rel:.2g} relative"


@pytest.mark.parametrize("dtype", [F32, F64])
def test_small_k_near_tie_is_accurate_in_absolute_terms(dtype):
    """The documented limit: two experts tied to within the resolution of the threshold share a
    tiny k with an absolute error of about ulp(c) * eps per expert (c = -log(2 eps)), not relative
    to k: sum(p) is within 8 * eps * ulp(4) * active of k."""
    scores = torch.tensor([[1.0, 1.0, -3.0, -5.0], [2.0, 2.0 - 1e-12, 0.0, -1.0]], dtype=dtype)
    k = 1e-9
    p = softmoe.soft_topk(scores, k, 0.5, eps=1e-2).double()
    ulp = float(torch.finfo(dtype).eps) * 4
    assert bool((p[:, 2:] == 0).all()) and bool((p[:, :2] > 0).all())
    assert float((p.sum(-1) - float(torch.tensor(k, dtype=dtype))).abs().max()) <= 8 * 1e-2 * ulp * 2


# ---- k -> max_active ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16])
@pytest.mark.parametrize("eps", [0.0, 1e-2, 0.2])
@pytest.mark.parametrize("max_active", [None, 6])
@pytest.mark.parametrize("gap", [1e-3, 1e-6])
def test_k_near_max_active(dtype, eps, max_active, gap):
    """k = m - gap: p -> 1 on the m candidates, exactly 0 elsewhere, with
    1 - p = (m - k) softmax(-r / alpha) over the candidates; gradients finite."""
    n = 16
    m = n if max_active is None else max_active
    scores = _scores(16, n, dtype, seed=4)
    alpha = 0.7
    mdt = F64 if dtype == F64 else F32
    k = float(torch.tensor(m - gap, dtype=mdt))
    p, gr, gk, ga, _ = _fwd_bwd(scores, k, alpha, eps, max_active=max_active)
    for t in (p, gr, gk, ga):
        assert bool(torch.isfinite(t).all())
    cand = candidate_mask(scores.double(), max_active)
    assert bool((p[~cand] == 0).all())
    assert bool((p[cand] > 0).all())
    a = float(torch.tensor(alpha, dtype=mdt))
    neg = torch.where(cand, -scores.double() / a, torch.full_like(scores, -math.inf, dtype=F64))
    expected = (m - k) * torch.softmax(neg, -1)  # 1 - p on the candidates
    got = torch.where(cand, 1 - p.double(), torch.zeros_like(expected))
    # 1 - p cancels: the absolute error is that of p (accuracy BOUNDS), relative to m - k here.
    atol = accuracy.bound(NAMES[dtype], "p_abs", n)
    torch.testing.assert_close(got, expected, rtol=_rtol(dtype), atol=atol)


def test_k_exactly_max_active_is_the_limit():
    """A per-row k tensor may be exactly m: p = 1 on the candidates, zero gradients; m - 1e-9
    is within 1e-9 of it."""
    scores = _scores(2, 8, F64, seed=5)
    k = torch.tensor([6.0, 6.0 - 1e-9], dtype=F64)
    p = softmoe.soft_topk(scores, k, 0.5, eps=1e-2, max_active=6)
    cand = candidate_mask(scores, 6)
    assert torch.equal(p[0], cand[0].to(F64))
    assert float((p[1] - cand[1].to(F64)).abs().max()) <= 1e-9
    ref = reference_soft_topk(scores, k, 0.5, eps=1e-2, max_active=6)
    torch.testing.assert_close(p, ref, rtol=0, atol=1e-12)
