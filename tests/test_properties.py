"""Property tests (hypothesis) of softmoe.soft_topk: random shapes, dtypes, strides, k / alpha /
eps / max_active, checked against the math of LapSum (DESIGN.md 2.1-2.2) rather than fixed vectors.

Every test is derandomized (the same examples on every run, so CI is reproducible) and bounded in
examples; hypothesis shrinks a failure to a small case that the message prints.

Tolerances: the value bounds come from benchmarks/accuracy.py bound() / BOUNDS (the documented accuracy,
docs/accuracy.md); where a property is exact in floating point (bit-identical) the test says why.
"""
import math
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import softmoe
from reference import candidate_mask, reference_soft_topk, truncated_pdf, truncation_c

from accuracy import bound  # benchmarks/accuracy.py (pyproject.toml: pytest's pythonpath)

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
DTYPES = [F64, F32, BF16, F16]
NAMES = {F64: "float64", F32: "float32", BF16: "bfloat16", F16: "float16"}
soft_topk = softmoe.soft_topk


def props(n):
    """n derandomized examples, no deadline (a loaded CI box must not turn slowness into failures)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def math_dtype(dtype):
    return F64 if dtype == F64 else F32


@dataclass
class Case:
    scores: torch.Tensor  # [*lead, E] in its dtype
    k: object  # python float, or a math-dtype tensor (scalar or per row)
    alpha: object
    eps: float
    max_active: Optional[int]

    @property
    def experts(self) -> int:
        return self.scores.shape[-1]

    @property
    def m(self) -> int:
        return self.experts if self.max_active is None else self.max_active

    def call(self, scores=None, **kw):
        kw = {"k": self.k, "alpha": self.alpha, "eps": self.eps, "max_active": self.max_active, **kw}
        return soft_topk(self.scores if scores is None else scores, kw.pop("k"), kw.pop("alpha"), **kw)

    def rows_param(self, value) -> torch.Tensor:
        """k or alpha as the op sees it: rounded to the math type, float64, one value per row."""
        rows = self.scores.shape[:-1]
        t = torch.as_tensor(value, dtype=math_dtype(self.scores.dtype)).double()
        return t.expand(rows) if t.dim() == 0 else t

    def __repr__(self) -> str:  # hypothesis prints this for a failing example
        s = self.scores
        values = s.double().flatten()[:16].tolist()
        return (f"Case(scores={s.dtype} {tuple(s.shape)} stride={s.stride()} values={values}"
                f"..., k={self.k!r}, alpha={self.alpha!r}, eps={self.eps}, max_active={self.max_active})")


@st.composite
def cases(draw, dtypes=tuple(DTYPES), max_experts=48, max_lead=2, param_tensors=True, offsets=True):
    """Scores ~ offset + spread * N(0, 1) (optionally snapped to a coarse grid, which makes ties),
    k = frac * m for the m candidates, alpha = spread * 10^[-2, 2]."""
    dtype = draw(st.sampled_from(dtypes))
    experts = draw(st.integers(1, max_experts))
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=max_lead)))
    eps = draw(st.sampled_from([0.0, 1e-3, 1e-2, 0.2, 0.45]))
    max_active = draw(st.one_of(st.none(), st.integers(1, experts)))
    m = experts if max_active is None else max_active
    spread = 10.0 ** draw(st.floats(-2, 2))
    offset = draw(st.sampled_from([0.0, 3.7, -1e3, 1e4])) if offsets else 0.0
    grid = draw(st.sampled_from([None, None, 0.5, 1 / 64]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(*lead, experts, generator=gen, dtype=F64) * spread
    if grid is not None:
        raw = torch.round(raw / (grid * spread)) * (grid * spread)
    scores = (raw + offset).to(dtype)
    mdt = math_dtype(dtype)
    k_mode = draw(st.sampled_from(["float", "tensor", "rows"] if param_tensors else ["float"]))
    a_mode = draw(st.sampled_from(["float", "tensor", "rows"] if param_tensors else ["float"]))
    frac = draw(st.floats(1e-3, 1 - 1e-3))
    a_exp = draw(st.floats(-2, 2))
    if k_mode == "rows":
        fracs = 1e-3 + (1 - 2e-3) * torch.rand(lead, generator=gen, dtype=F64)
        k = (fracs * m).to(mdt)
    else:
        k = frac * m
        if k_mode == "tensor":
            k = torch.tensor(k, dtype=mdt)
    if a_mode == "rows":
        alpha = (spread * 10.0 ** (a_exp + torch.rand(lead, generator=gen, dtype=F64) - 0.5)).to(mdt)
    else:
        alpha = spread * 10.0 ** a_exp
        if a_mode == "tensor":
            alpha = torch.tensor(alpha, dtype=mdt)
    return Case(scores, k, alpha, eps, max_active)


def rows2d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


# ---- the constraints: 0 <= p <= 1, sum p = k, support ---------------------------------------


@props(150)
@given(cases())
def test_range_sum_and_support_size(case):
    """0 <= p <= 1 exactly; |sum p - k| <= sum_per_active * (nonzeros of the row); at most
    max_active nonzeros, and at least ceil(k) (each p <= 1 and they add up to k)."""
    p = case.call()
    assert p.dtype == case.scores.dtype and p.shape == case.scores.shape
    assert bool(torch.isfinite(p).all())
    assert bool((p >= 0).all()) and bool((p <= 1).all())
    p2 = rows2d(p).double()
    k = case.rows_param(case.k).reshape(-1)
    nnz = (p2 != 0).sum(-1)
    assert bool((nnz <= case.m).all())
    tol = bound(NAMES[case.scores.dtype], "sum_per_active", case.experts) * nnz.clamp_min(1).double()
    err = (p2.sum(-1) - k).abs()
    assert bool((err <= tol).all()), f"|sum p - k| = {err.max().item():.3g} > {tol[err.argmax()].item():.3g}"
    assert bool((nnz >= torch.ceil(k - tol)).all())


@props(100)
@given(cases(dtypes=(F64, F32)))
def test_exact_zeros_are_the_truncated_set(case):
    """p == 0 exactly where the math says: non-candidates, and (eps > 0) candidates at or below the
    cut, (r - b) / alpha <= -c with c = -ln(2 eps), b the op's own threshold. Entries within
    rounding of the cut may go either way."""
    scores = rows2d(case.scores)
    k = case.rows_param(case.k).reshape(-1)
    alpha = case.rows_param(case.alpha).reshape(-1)
    mdt = math_dtype(scores.dtype)
    p, b = torch.ops.softmoe.soft_topk(scores, k.to(mdt), alpha.to(mdt), case.eps, case.m)
    r = scores.double()
    x = (r - b.unsqueeze(-1)) / alpha.unsqueeze(-1)
    c = truncation_c(case.eps)
    cand = candidate_mask(r, case.max_active)
    expected = cand & (x > -c) if case.eps > 0 else cand
    u = torch.finfo(mdt).eps
    # x carries the rounding of r - b (relative to the larger of |r|, |b|) divided by alpha.
    near_cut = (x + c).abs() <= 16 * u * (r.abs() + b.abs().unsqueeze(-1)) / alpha.unsqueeze(-1) + 16 * u * (1 + c)
    if case.eps == 0:
        # No cut: only underflow can make a candidate exactly 0 (~103 alpha below b in float32).
        near_cut = x < math.log(torch.finfo(mdt).tiny) + 2
    mismatch = ((p != 0) != expected) & ~(near_cut & cand)
    assert not bool(mismatch.any()), f"{int(mismatch.sum())} entries zero/nonzero against the threshold"


@props(60)
@given(cases(dtypes=tuple(DTYPES), max_experts=24, max_lead=1))
def test_matches_oracle(case):
    """Values against the float64 bisection oracle on the same (rounded) inputs, within the
    documented bound of the input dtype (benchmarks/accuracy.py BOUNDS)."""
    scores = rows2d(case.scores)
    k = case.rows_param(case.k).reshape(-1)
    alpha = case.rows_param(case.alpha).reshape(-1)
    expected = reference_soft_topk(scores.double(), k, alpha, eps=case.eps, max_active=case.max_active)
    p = rows2d(case.call()).double()
    atol = bound(NAMES[case.scores.dtype], "p_abs", case.experts)
    torch.testing.assert_close(p, expected, rtol=0, atol=atol)


# ---- invariances ----------------------------------------------------------------------------


@props(120)
@given(cases(), st.sampled_from([1.0, 8.0, -64.0, 1024.0, 0.5]))
def test_shift_by_exact_constant_is_bit_identical(case, c):
    """p(r + c) = p(r) (the threshold moves with the scores). When r + c is exact in the input
    dtype the op gives the same bits: it works relative to a pivot score, and the differences
    (r_i + c) - (r_j + c) are the same real numbers as r_i - r_j, so they round the same."""
    shifted = case.scores + c
    exact = torch.equal(shifted.double() - c, case.scores.double()) and bool(torch.isfinite(shifted).all())
    assume(exact)
    assert torch.equal(case.call(shifted), case.call())


@props(80)
@given(cases(dtypes=(F64, F32)), st.floats(-1e4, 1e4))
def test_shift_by_any_constant(case, c):
    """Shift by any c: r + c is rounded to the input dtype (at most half an ulp of |r| + |c| per
    score), and p moves by at most that over alpha (|dp_i/dr_j| sums to at most 1/alpha over j)."""
    shifted = case.scores + c
    u = torch.finfo(case.scores.dtype).eps
    alpha = case.rows_param(case.alpha)
    rounding = u * (case.scores.double().abs().amax(-1) + abs(c)) / alpha
    tol = 2 * bound(NAMES[case.scores.dtype], "p_abs", case.experts) + rounding.unsqueeze(-1)
    err = (case.call(shifted).double() - case.call().double()).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g}"


@props(100)
@given(cases(), st.sampled_from([2.0, 0.5, 4.0, 0.125]))
def test_scaling_scores_and_alpha_by_a_power_of_two_is_bit_identical(case, s):
    """p(s r, k, s alpha) = p(r, k, alpha); for a power of two s nothing rounds differently, so
    the bits are the same (unless s r leaves the dtype's normal range, which is skipped)."""
    scaled = case.scores * s
    tiny = torch.finfo(case.scores.dtype).tiny
    exact = (torch.equal(scaled.double() / s, case.scores.double()) and bool(torch.isfinite(scaled).all())
             and not bool(((scaled != 0) & (scaled.abs() < tiny)).any()))
    assume(exact)
    alpha = case.alpha * s
    assert torch.equal(case.call(scaled, alpha=alpha), case.call())


@props(60)
@given(cases(dtypes=(F64, F32)), st.sampled_from([3.0, 0.1, 10.0, 1 / 3]))
def test_scaling_by_any_factor(case, s):
    """p(s r, k, s alpha) = p(r, k, alpha) up to rounding: s r is off by half an ulp of |s r|, s
    alpha by half an ulp, so (r - b) / alpha moves by about u (max |r| / alpha + 1), and p by at
    most that (like the shift test), plus the op's own error twice."""
    u = torch.finfo(case.scores.dtype).eps
    p = case.call()
    q = case.call(case.scores * s, alpha=case.alpha * s)
    rounding = 2 * u * (case.scores.double().abs().amax(-1) / case.rows_param(case.alpha) + 1)
    tol = 2 * bound(NAMES[case.scores.dtype], "p_abs", case.experts) + rounding.unsqueeze(-1)
    err = (q.double() - p.double()).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g}"


def _no_tie_at_the_cap(scores: torch.Tensor, m: int) -> bool:
    """The m-th and (m+1)-th largest scores of every row differ (else the cap's tie rule, lower
    index first, depends on the order of the experts)."""
    if m >= scores.shape[-1]:
        return True
    top = rows2d(scores).double().sort(-1, descending=True).values
    return bool((top[:, m - 1] != top[:, m]).all())


@props(100)
@given(cases(), st.integers(0, 2 ** 31 - 1))
def test_permuting_experts_permutes_p(case, seed):
    """soft_topk(r[..., perm]) == soft_topk(r)[..., perm], bit for bit (the op sorts each row, so
    the permutation never reaches the arithmetic); gradients permute too, up to the order of a
    row sum in the backward (relative 1e-12 / 1e-5)."""
    assume(_no_tie_at_the_cap(case.scores, case.m))
    perm = torch.randperm(case.experts, generator=torch.Generator().manual_seed(seed))
    p = case.call()
    assert torch.equal(case.call(case.scores[..., perm]), p[..., perm])
    if case.scores.dtype in (F64, F32):
        g = torch.randn(case.scores.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
        g = g.to(case.scores.dtype)
        r1 = case.scores.clone().requires_grad_(True)
        r2 = case.scores[..., perm].clone().requires_grad_(True)
        (case.call(r1) * g).sum().backward()
        (case.call(r2) * g[..., perm]).sum().backward()
        rtol = 1e-12 if case.scores.dtype == F64 else 1e-5
        scale = float(r1.grad.abs().max()) or 1.0
        torch.testing.assert_close(r2.grad, r1.grad[..., perm], rtol=0, atol=rtol * scale)


@props(150)
@given(cases())
def test_monotone_in_the_scores(case):
    """r_i > r_j implies p_i >= p_j (G is nondecreasing and a candidate's better scores are
    candidates too), and equal scores that are both candidates get equal p, exactly."""
    r = rows2d(case.scores).double()
    p = rows2d(case.call()).double()
    greater = r.unsqueeze(-1) > r.unsqueeze(-2)
    assert not bool((greater & (p.unsqueeze(-1) < p.unsqueeze(-2))).any())
    cand = candidate_mask(r, case.max_active)
    both = cand.unsqueeze(-1) & cand.unsqueeze(-2) & (r.unsqueeze(-1) == r.unsqueeze(-2))
    assert not bool((both & (p.unsqueeze(-1) != p.unsqueeze(-2))).any())


# ---- layout: strides, dim, leading batch dims -----------------------------------------------


def _flat(v):
    return v.reshape(-1) if isinstance(v, torch.Tensor) and v.dim() > 0 else v


@props(80)
@given(cases(max_lead=2, offsets=False), st.sampled_from(["dim0", "expert_stride", "step2", "padded_rows", "expand"]),
       st.integers(0, 2 ** 31 - 1))
def test_layout_does_not_change_a_bit(case, view, seed):
    """Non-contiguous scores (the experts along dim 0, a strided expert dimension, every second
    column, rows padded apart, a broadcast row) and any leading batch shape give the same p and
    the same gradients as the contiguous [rows, E] tensor, bit for bit: rows are independent and
    are read by stride, never reordered within."""
    base = case.scores
    lead, experts = base.shape[:-1], case.experts
    g = torch.randn(base.shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(base.dtype)
    kw = dict(eps=case.eps, max_active=case.max_active)

    if view == "expand":  # stride 0: every row is the same row; compare with that row alone
        assume(len(lead) >= 1 and all(isinstance(v, float) or v.dim() == 0 for v in (case.k, case.alpha)))
        row = base.reshape(-1, experts)[:1]
        p = soft_topk(row.expand(*lead, experts), case.k, case.alpha, **kw)
        assert not row.expand(*lead, experts).is_contiguous() or rows2d(p).shape[0] == 1
        single = soft_topk(row.clone(), case.k, case.alpha, **kw)
        assert torch.equal(rows2d(p), single.expand(rows2d(p).shape[0], experts))
        return

    r_ref = rows2d(base).contiguous().clone().requires_grad_(True)
    p_ref = soft_topk(r_ref, _flat(case.k), _flat(case.alpha), **kw)
    p_ref.backward(rows2d(g).contiguous())

    if view == "dim0":
        leaf = base.movedim(-1, 0).contiguous().requires_grad_(True)  # [E, *lead]
        p = soft_topk(leaf, case.k, case.alpha, dim=0, **kw)
        p.backward(g.movedim(-1, 0))
        got_p, got_g = p.detach().movedim(0, -1), leaf.grad.movedim(0, -1)
    else:
        if view == "expert_stride":  # [*lead, E] with the experts strided by the number of rows
            leaf = base.movedim(-1, 0).contiguous().requires_grad_(True)
            scores, back = leaf.movedim(0, -1), (lambda t: t.movedim(0, -1))
        elif view == "step2":
            leaf = torch.zeros(*lead, 2 * experts, dtype=base.dtype)
            leaf[..., ::2] = base
            leaf.requires_grad_(True)
            scores, back = leaf[..., ::2], (lambda t: t[..., ::2])
        else:  # padded_rows: unit expert stride, rows 3 entries further apart than E
            leaf = torch.zeros(*lead, experts + 3, dtype=base.dtype)
            leaf[..., 1:experts + 1] = base
            leaf.requires_grad_(True)
            scores, back = leaf[..., 1:experts + 1], (lambda t: t[..., 1:experts + 1])
        assert torch.equal(scores.detach(), base)
        p = soft_topk(scores, case.k, case.alpha, **kw)
        p.backward(g)
        got_p, got_g = p.detach(), back(leaf.grad)
    assert torch.equal(rows2d(got_p), p_ref.detach())
    assert torch.equal(rows2d(got_g), r_ref.grad)


# ---- gradients vs finite differences --------------------------------------------------------


def _pattern_is_stable(case: Case, h: float) -> bool:
    """The active set and the candidate set do not change within +-h of the inputs: every
    candidate is at least `margin` (in x units) from the cut and the cap has a clear gap. Then
    finite differences never step over a truncation kink."""
    r = rows2d(case.scores)
    k = case.rows_param(case.k).reshape(-1)
    alpha = case.rows_param(case.alpha).reshape(-1)
    _, b = torch.ops.softmoe.soft_topk(r, k, alpha, case.eps, case.m)
    x = (r - b.unsqueeze(-1)) / alpha.unsqueeze(-1)
    cand = candidate_mask(r, case.max_active)
    if case.max_active is not None and case.max_active < case.experts:
        top = r.sort(-1, descending=True).values
        if bool(((top[:, case.max_active - 1] - top[:, case.max_active]) < 1e3 * h).any()):
            return False
    if case.eps == 0:
        return True
    c = truncation_c(case.eps)
    # 1e3 h in x units: moving r, k or alpha by h moves x by far less than that for alpha >= 0.05.
    return not bool((cand & ((x + c).abs() < 1e3 * h / alpha.unsqueeze(-1).clamp(max=1.0))).any())


@props(30)
@given(cases(dtypes=(F64,), max_experts=8, max_lead=1, offsets=False), st.integers(0, 2 ** 31 - 1))
def test_gradients_match_finite_differences(case, seed):
    """torch.autograd.gradcheck (float64) of p with respect to scores, k and alpha (as tensors),
    on random instances whose active pattern is stable under the finite-difference step."""
    h = 1e-6
    rows = rows2d(case.scores)
    alpha_rows = case.rows_param(case.alpha).reshape(-1)
    assume(bool((alpha_rows >= 0.05).all()))
    assume(_pattern_is_stable(case, h))
    k = case.rows_param(case.k).reshape(-1).clone().requires_grad_(True)
    alpha = alpha_rows.clone().requires_grad_(True)
    scores = rows.clone().requires_grad_(True)

    def fn(s, kk, aa):
        return soft_topk(s, kk, aa, eps=case.eps, max_active=case.max_active)

    assert torch.autograd.gradcheck(fn, (scores, k, alpha), eps=h, atol=1e-6, rtol=1e-4, nondet_tol=0.0)


@props(80)
@given(cases(dtypes=(F64, F32)), st.integers(0, 2 ** 31 - 1))
def test_gradient_identities_of_the_invariances(case, seed):
    """Shift invariance gives sum_j dL/dr_j = 0 per row; scale invariance (Euler) gives
    sum_j r_j dL/dr_j + alpha dL/dalpha = 0 per row. Tolerance: the documented gradient accuracy
    (relative to the size of the terms of the gradient formulas, as in benchmarks/accuracy.py
    gradient_scales) times the size of those terms."""
    r = rows2d(case.scores).clone().requires_grad_(True)
    alpha = case.rows_param(case.alpha).reshape(-1).to(case.scores.dtype).clone().requires_grad_(True)
    k = case.rows_param(case.k).reshape(-1).to(case.scores.dtype)
    g = torch.randn(r.shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(r.dtype)
    p = soft_topk(r, k, alpha, eps=case.eps, max_active=case.max_active)
    (p * g).sum().backward()
    gr, ga = r.grad.double(), alpha.grad.double()
    # Relative to a pivot the scores are small: use r - max r for the Euler sum (shift invariance).
    rr = r.detach().double()
    rel = rr - rr.amax(-1, keepdim=True)
    a = alpha.detach().double()
    # The terms: dL/dr_j = (phi_j / alpha)(g_j - s), alpha dL/dalpha = -sum_i g_i phi_i (x_i - xbar).
    _, b = torch.ops.softmoe.soft_topk(r.detach(), k, alpha.detach(), case.eps, case.m)
    x = (rr - b.unsqueeze(-1)) / a.unsqueeze(-1)
    phi = torch.where(candidate_mask(rr, case.max_active), truncated_pdf(x, case.eps), torch.zeros_like(x))
    w = phi / phi.sum(-1, keepdim=True)
    gd = g.double().abs()
    terms_r = phi / a.unsqueeze(-1) * (gd + (w * gd).sum(-1, keepdim=True))
    terms_a = (gd * phi * (x.abs() + (w * x.abs()).sum(-1, keepdim=True))).sum(-1)
    tol = bound(NAMES[case.scores.dtype], "grad_scores", case.experts)
    shift = gr.sum(-1).abs()
    assert bool((shift <= 2 * tol * terms_r.sum(-1)).all()), f"{(shift / terms_r.sum(-1)).max().item():.3g}"
    euler = ((rel * gr).sum(-1) + a * ga).abs()
    size = (rel.abs() * terms_r).sum(-1) + terms_a
    assert bool((euler <= 2 * tol * size).all()), f"{(euler / size).max().item():.3g}"


# ---- devices --------------------------------------------------------------------------------


@pytest.mark.cuda  # skipped without a GPU (conftest.py)
@props(60)
@given(cases())
def test_cuda_matches_cpu(case):
    """The CUDA kernels run the same per-row math as the CPU ones: values within the dtype's
    documented bound of each other, gradients within its gradient bound."""
    name, n = NAMES[case.scores.dtype], case.experts
    to = lambda v: v.cuda() if isinstance(v, torch.Tensor) else v  # noqa: E731
    g = torch.randn(case.scores.shape, dtype=F64).to(case.scores.dtype)
    r_cpu = case.scores.clone().requires_grad_(True)
    r_gpu = case.scores.cuda().requires_grad_(True)
    p_cpu = soft_topk(r_cpu, case.k, case.alpha, eps=case.eps, max_active=case.max_active)
    p_gpu = soft_topk(r_gpu, to(case.k), to(case.alpha), eps=case.eps, max_active=case.max_active)
    torch.testing.assert_close(p_gpu.cpu().double(), p_cpu.double(), rtol=0, atol=bound(name, "p_abs", n))
    (p_cpu * g).sum().backward()
    (p_gpu * g.cuda()).sum().backward()
    scale = float(r_cpu.grad.abs().max()) or 1.0
    torch.testing.assert_close(r_gpu.grad.cpu().double(), r_cpu.grad.double(), rtol=0,
                               atol=bound(name, "grad_scores", n) * scale)
