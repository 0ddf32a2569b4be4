#!/usr/bin/env python3
"""Router-op benchmark (DESIGN.md section 7): forward+backward of a routing function on a
[rows, E] float32 score matrix, against hard top-k routing timed in the same run.

Methods
  hard_topk      baseline (ratio denominator): softmax over experts, torch.topk(k=2), renormalise
                 the two weights, scatter them into a dense [rows, E] tensor.
  softmoe        softmoe.soft_topk(scores, k=2, alpha=1)            (plain LapSum, eps=0)
  softmoe_trunc  softmoe.soft_topk(scores, k=2, alpha=1, eps=1e-2, max_active=8)
  lapsum_torch   sort-based pure-PyTorch LapSum (this file), differentiated by autograd
  entmax_budget  entmax.budget_bisect(scores, budget=2)  (n_iter=50, the package default)

Every method returns a dense p of shape [rows, E]; the timed step is
    p = method(scores); (p * g).sum().backward()
with g a fixed random upstream gradient and scores.requires_grad = True. Times are medians over
>= 5 repeats after warm-up; the methods are timed interleaved (round robin) and reported as
ratios to hard_topk from the same run, because the machines are noisy: "ratio" is
median(method)/median(hard_topk), "pratio" the median over repeats of the per-repeat ratio (each
repeat of the two ran back to back, so slow drifts of the machine cancel).

Next to each time: the bandwidth floor of the same run, one read of the logits and one write of
p (a torch copy of the [rows, E] float32 scores into a preallocated tensor, timed interleaved
with the methods), as ns per row, and each method's time in multiples of it ("x floor").
--breakdown also times the forward alone (with and without autograd), the backward alone, and
"step_overhead": the step with p = scores, i.e. what (p * g).sum().backward() and autograd cost
around any method, and "elementwise": the step with p = scores.relu(), the cheapest op that reads
the scores, writes p and has a backward: what any differentiable routing function costs at least
(in multiples of the floor: the least a method's "x floor" can be).

Before timing, the pure-PyTorch LapSum is checked against a float64 bisection (values and the
closed-form VJP), and softmoe.soft_topk (when built) against it to 1e-4 (float32).

  python3 benchmarks/bench_router.py                 # full run (E = 8, 64, 256; rows = 65536)
  python3 benchmarks/bench_router.py --quick         # smoke run, rows = 4096, a few seconds
  python3 benchmarks/bench_router.py --rows-sweep    # also rows = 16384..131072 at E = 64
  python3 benchmarks/bench_router.py --threads 1,2   # repeat the table per thread count
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

import _timing  # benchmarks/_timing.py, beside this script
from _timing import Case

_HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_JSON = os.path.join(_HERE, "results", "bench_router.json")
BASELINE = "hard_topk"
METHODS = ["hard_topk", "softmoe", "softmoe_trunc", "lapsum_torch", "entmax_budget"]
K = 2
ALPHA = 1.0
TRUNC_EPS = 1e-2
TRUNC_MAX_ACTIVE = 8
ENTMAX_N_ITER = 50


# --------------------------------------------------------------------------------------------
# Pure-PyTorch LapSum soft top-k (sort based, closed form; research/lapsum.md sections 1.4-1.5)
# --------------------------------------------------------------------------------------------
def lapsum_torch(scores: torch.Tensor, k: float, alpha: float = 1.0, dim: int = -1) -> torch.Tensor:
    """Plain LapSum soft top-k in pure PyTorch, differentiable by autograd.

    p_i = F((r_i - b)/alpha), F the Laplace CDF, b the threshold with sum_i p_i = k, 0 < k < n.
    Sorted descending s_0 >= ... >= s_{n-1}, z = (s - s_0)/alpha (<= 0) and, stably via
    logcumsumexp, U_i = sum_{j<i} e^{z_i - z_j}, V_i = sum_{j>i} e^{z_j - z_i}; the soft count at
    the knots is C_i = i + 1/2 + (V_i - U_i)/2; the bracket C_l < k <= C_{l+1} comes from
    searchsorted, and the closed-form root of the quadratic (three cancellation-free branches)
    gives tau = (s_pivot - b)/alpha. p is evaluated in the original order as
    F((r - s_pivot)/alpha + tau), so no un-sort is needed. Gradients flow through sort values,
    logcumsumexp, gathers and the closed form: inside a bracket the closed form *is* b(r, k,
    alpha), so autograd gives the exact implicit-function derivative.
    """
    if not (0.0 < float(k)):
        raise ValueError(f"k must be > 0, got {k}")
    r = scores.movedim(dim, -1)
    n = r.shape[-1]
    if not float(k) < n:
        raise ValueError(f"k must be < n (= {n}), got {k}")
    kt = torch.as_tensor(k, dtype=r.dtype, device=r.device)

    s, _ = torch.sort(r, dim=-1, descending=True)
    s0 = s[..., :1]
    z = (s - s0) / alpha  # z_0 = 0 >= z_1 >= ... >= z_{n-1}
    zero = torch.zeros_like(z[..., :1])
    if n > 1:
        # U_i (i >= 1) = e^{z_i} * sum_{j<i} e^{-z_j}
        lse_neg = torch.logcumsumexp(-z, dim=-1)
        U = torch.cat([zero, torch.exp(z[..., 1:] + lse_neg[..., :-1])], dim=-1)
        # V_i (i <= n-2) = e^{-z_i} * sum_{j>i} e^{z_j}
        lse_tail = torch.logcumsumexp(z.flip(-1), dim=-1).flip(-1)
        V = torch.cat([torch.exp(lse_tail[..., 1:] - z[..., :-1]), zero], dim=-1)
    else:
        U = zero
        V = zero
    idx = torch.arange(n, dtype=r.dtype, device=r.device)
    C = idx + 0.5 + 0.5 * (V - U)  # soft count at b = s_i, nondecreasing in i

    # j = #{i : C_i < k}: j = 0 left tail, j = n right tail, else interior bracket l = j - 1.
    kk = kt.expand(r.shape[:-1]).unsqueeze(-1).contiguous()
    j = torch.searchsorted(C.detach().contiguous(), kk.detach(), right=False)  # [..., 1] int64
    left = j == 0
    right = j == n

    # Left tail (k <= C_0): tau = (s_0 - b)/alpha = ln(2k / (1 + V_0)), pivot 0.
    tau_left = torch.log(2.0 * kk) - torch.log1p(V[..., :1])
    # Right tail (k > C_{n-1}): tau = (s_{n-1} - b)/alpha = ln((1 + U_{n-1}) / (2 (n - k))), pivot n-1.
    tau_right = torch.log1p(U[..., -1:]) - torch.log(2.0 * (n - kk))
    tau = torch.where(left, tau_left, tau_right)
    z_piv = torch.where(left, z[..., :1], z[..., -1:])
    if n > 1:
        # Interior: Q y^2 + 2 D y - P E = 0, y = e^{-tau}, tau = (s_l - b)/alpha in [0, d_l].
        lc = (j - 1).clamp(0, n - 2)
        z_l = z.gather(-1, lc)
        d = z_l - z.gather(-1, lc + 1)  # >= 0
        Q = 1.0 + U.gather(-1, lc)
        P = 1.0 + V.gather(-1, lc + 1)
        PQE = P * Q * torch.exp(-d)
        D = kk - (lc + 1).to(r.dtype)
        pos, neg = D > 0, D < 0
        # Substitute harmless values in the unused branches so that no inf/NaN enters autograd.
        Dp = torch.where(pos, D, torch.ones_like(D))
        Dn = torch.where(neg, D, -torch.ones_like(D))
        tau_pos = d + torch.log(Dp + torch.sqrt(Dp * Dp + PQE)) - torch.log(P)
        tau_neg = torch.log(Q) - torch.log(torch.sqrt(Dn * Dn + PQE) - Dn)
        tau_zero = 0.5 * (d + torch.log(Q) - torch.log(P))
        tau_int = torch.where(pos, tau_pos, torch.where(neg, tau_neg, tau_zero))
        interior = ~(left | right)
        tau = torch.where(interior, tau_int, tau)
        z_piv = torch.where(interior, z_l, z_piv)

    x = (r - s0) / alpha - z_piv + tau  # = (r - b)/alpha
    # One exp, never overflows. Not exp(-|x|): torch gives |x| a zero gradient at x = 0, but
    # F'(0) = 1/2 (all-equal rows with 2k = n land exactly there).
    neg = x <= 0
    e = torch.exp(torch.where(neg, x, -x))
    p = torch.where(neg, 0.5 * e, 1.0 - 0.5 * e)
    return p.movedim(-1, dim)


# --------------------------------------------------------------------------------------------
# Slow float64 references used only by the correctness checks
# --------------------------------------------------------------------------------------------
def _laplace_cdf(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(-x.abs())
    return torch.where(x <= 0, 0.5 * e, 1.0 - 0.5 * e)


def bisect_reference(
    r: torch.Tensor, k: float, alpha: float = 1.0, eps: float = 0.0, max_active: Optional[int] = None,
    iters: int = 200,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Brute-force float64 LapSum (optionally left-truncated, with a candidate cap) by bisection.

    Returns (p, b). Candidates = the max_active largest entries of each row (all when None).
    Kernel G(x) = 0 for x <= -c, (F(x) - eps)/(1 - eps) otherwise, c = -ln(2 eps) (eps = 0: F).
    """
    r = r.to(torch.float64)
    n = r.shape[-1]
    m = n if max_active is None else max_active
    cand = torch.zeros_like(r, dtype=torch.bool)
    top = torch.topk(r, m, dim=-1, largest=True, sorted=False).indices
    cand.scatter_(-1, top, True)

    def kern(x: torch.Tensor) -> torch.Tensor:
        if eps == 0.0:
            return _laplace_cdf(x)
        c = -math.log(2.0 * eps)
        return torch.where(x <= -c, torch.zeros_like(x), (_laplace_cdf(x) - eps) / (1.0 - eps))

    def count(b: torch.Tensor) -> torch.Tensor:
        return torch.where(cand, kern((r - b) / alpha), torch.zeros_like(r)).sum(-1, keepdim=True)

    span = alpha * (math.log(max(n, 2)) + 60.0)
    lo = r.min(-1, keepdim=True).values - span  # count(lo) ~ m > k
    hi = r.max(-1, keepdim=True).values + span  # count(hi) ~ 0 < k
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        big = count(mid) > k
        lo = torch.where(big, mid, lo)
        hi = torch.where(big, hi, mid)
    b = 0.5 * (lo + hi)
    p = torch.where(cand, kern((r - b) / alpha), torch.zeros_like(r))
    return p, b


def closed_form_vjp(
    r: torch.Tensor, p: torch.Tensor, b: torch.Tensor, g: torch.Tensor, alpha: float, eps: float = 0.0
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dL/dr, dL/dk, dL/dalpha from research/lapsum.md sec. 2.2 / 6.4 (phi = f/(1-eps) on p > 0)."""
    x = (r - b) / alpha
    phi = torch.where(p > 0, 0.5 * torch.exp(-x.abs()) / (1.0 - eps), torch.zeros_like(p))
    S = phi.sum(-1, keepdim=True)
    w = phi / S
    s = (g * w).sum(-1, keepdim=True)
    xbar = (w * x).sum(-1, keepdim=True)
    dr = phi / alpha * (g - s)
    dalpha = -(g * phi * torch.where(p > 0, x - xbar, torch.zeros_like(x))).sum(-1) / alpha
    return dr, s.squeeze(-1), dalpha


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------
def hard_topk(scores: torch.Tensor, k: int = K) -> torch.Tensor:
    probs = torch.softmax(scores, dim=-1)
    vals, idx = torch.topk(probs, k, dim=-1)
    w = vals / vals.sum(dim=-1, keepdim=True)
    return torch.zeros_like(scores).scatter(-1, idx, w)


def _softmoe():
    try:
        import softmoe  # noqa: F401

        softmoe.soft_topk  # noqa: B018
        return softmoe, None
    except Exception as exc:  # not built yet / broken build
        return None, f"{type(exc).__name__}: {exc}"


def _entmax():
    try:
        from entmax import budget_bisect

        return budget_bisect, None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def build_methods(wanted: List[str], E: int) -> Tuple[Dict[str, Callable], Dict[str, str]]:
    """name -> fn(scores) -> dense p; and name -> reason for every method that cannot run."""
    fns: Dict[str, Callable] = {}
    skipped: Dict[str, str] = {}
    smoe, smoe_err = _softmoe()
    budget_bisect, ent_err = _entmax()
    for name in wanted:
        if name == "hard_topk":
            fns[name] = lambda x: hard_topk(x, K)
        elif name == "lapsum_torch":
            fns[name] = lambda x: lapsum_torch(x, float(K), ALPHA)
        elif name == "softmoe":
            if smoe is None:
                skipped[name] = "not built (" + smoe_err + ")"
            else:
                fns[name] = lambda x, _s=smoe: _s.soft_topk(x, K, alpha=ALPHA)
        elif name == "softmoe_trunc":
            if smoe is None:
                skipped[name] = "not built (" + smoe_err + ")"
            elif TRUNC_MAX_ACTIVE > E or not K < TRUNC_MAX_ACTIVE:
                skipped[name] = f"max_active={TRUNC_MAX_ACTIVE} invalid for E={E}"
            else:
                fns[name] = lambda x, _s=smoe: _s.soft_topk(
                    x, K, alpha=ALPHA, eps=TRUNC_EPS, max_active=TRUNC_MAX_ACTIVE
                )
        elif name == "entmax_budget":
            if budget_bisect is None:
                skipped[name] = "not installed (pip install --no-deps entmax)"
            else:
                fns[name] = lambda x, _f=budget_bisect: _f(x, budget=K, dim=-1, n_iter=ENTMAX_N_ITER)
        else:
            raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
    return fns, skipped


# --------------------------------------------------------------------------------------------
# Correctness checks (run before timing)
# --------------------------------------------------------------------------------------------
def _maxabs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def run_checks(verbose: bool = True) -> Dict[str, Any]:
    """Returns {"ok": bool, "checks": [...]} ; each check has name, error, tol, ok."""
    out: List[Dict[str, Any]] = []

    def record(name: str, err: float, tol: float) -> None:
        ok = bool(err <= tol) and math.isfinite(err)
        out.append({"name": name, "max_abs_err": err, "tol": tol, "ok": ok})
        if verbose:
            print(f"  [{'ok' if ok else 'FAIL'}] {name}: max|err| = {err:.3g} (tol {tol:g})")

    gen = torch.Generator().manual_seed(1234)

    # 1. Test vectors of research/lapsum.md sec. 7 (float64).
    tv1 = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    p_tv1 = torch.tensor([[0.111565080074, 0.303265329856, 0.696734670144, 0.888434919926]], dtype=torch.float64)
    record("lapsum_torch TV1 p (f64)", _maxabs(lapsum_torch(tv1, 2.0, 1.0), p_tv1), 1e-11)
    tv2 = torch.tensor([[0.3, -1.2, 2.0, 0.7, -0.1]], dtype=torch.float64, requires_grad=True)
    p_tv2 = torch.tensor([[0.495867293422, 0.024687778839, 0.983174293605, 0.773463096842, 0.222807537293]],
                         dtype=torch.float64)
    g_tv2 = torch.tensor([[1.0, -0.5, 0.25, 2.0, 0.0]], dtype=torch.float64)
    dr_tv2 = torch.tensor([[0.0461547150694, -0.0717654285623, -0.0236724436282, 0.474159581396,
                            -0.424876424274]], dtype=torch.float64)
    p = lapsum_torch(tv2, 2.5, 0.5)
    (gr,) = torch.autograd.grad((p * g_tv2).sum(), tv2)
    record("lapsum_torch TV2 p (f64)", _maxabs(p, p_tv2), 1e-11)
    record("lapsum_torch TV2 dL/dr (f64)", _maxabs(gr, dr_tv2), 1e-11)
    tv7 = torch.tensor([[3.0, 1.0, 0.5, -2.0]], dtype=torch.float64)
    record("lapsum_torch TV7 p (f64, alpha=0.01, D=0 branch)",
           _maxabs(lapsum_torch(tv7, 1.5, 0.01), torch.tensor([[1.0, 0.5, 0.0, 0.0]], dtype=torch.float64)),
           1e-12)

    # 2. Random rows vs float64 bisection + closed-form VJP; all three tails/branches get hit.
    worst_p = worst_g = 0.0
    for E in (1, 2, 3, 8, 64, 256):
        for k in sorted({x for x in (0.3, 1.0, 2.0, 2.7, E - 0.5, E - 0.05) if 0 < x < E}):
            for alpha in (0.05, 1.0, 7.0):
                r = (torch.randn(16, E, generator=gen, dtype=torch.float64) * 2.0 + 3.0)
                r[0] = 0.25  # all equal
                if E >= 4:
                    r[1, : E // 2] = r[1, 0]  # ties
                r.requires_grad_(True)
                g = torch.randn(16, E, generator=gen, dtype=torch.float64)
                p = lapsum_torch(r, k, alpha)
                (gr,) = torch.autograd.grad((p * g).sum(), r)
                p_ref, b_ref = bisect_reference(r.detach(), k, alpha)
                dr_ref, _, _ = closed_form_vjp(r.detach(), p_ref, b_ref, g, alpha)
                worst_p = max(worst_p, _maxabs(p, p_ref))
                worst_g = max(worst_g, _maxabs(gr, dr_ref) / max(1.0, 1.0 / alpha))
    record("lapsum_torch vs f64 bisection, p (E=1..256, k/alpha sweep, ties)", worst_p, 1e-9)
    record("lapsum_torch autograd vs closed-form VJP, dL/dr (x alpha)", worst_g, 1e-9)

    # 3. float32 pure-PyTorch LapSum vs float64 reference on benchmark-like inputs.
    for E in (8, 64, 256):
        r64 = torch.randn(256, E, generator=gen, dtype=torch.float64)
        p32 = lapsum_torch(r64.float(), float(K), ALPHA)
        p_ref, _ = bisect_reference(r64.float().double(), float(K), ALPHA)
        record(f"lapsum_torch f32 vs f64 reference, E={E}", _maxabs(p32, p_ref), 1e-5)

    # 4. softmoe.soft_topk vs the pure-PyTorch LapSum (f32, 1e-4) and the f64 references.
    smoe, err = _softmoe()
    if smoe is None:
        out.append({"name": "softmoe checks", "skipped": "not built (" + err + ")", "ok": True})
        if verbose:
            print(f"  [skip] softmoe checks: not built ({err})")
    else:
        for E in (8, 64, 256):
            r = torch.randn(512, E, generator=gen)
            g = torch.randn(512, E, generator=gen)
            ra = r.clone().requires_grad_(True)
            rb = r.clone().requires_grad_(True)
            pa = smoe.soft_topk(ra, K, alpha=ALPHA)
            pb = lapsum_torch(rb, float(K), ALPHA)
            (ga,) = torch.autograd.grad((pa * g).sum(), ra)
            (gb,) = torch.autograd.grad((pb * g).sum(), rb)
            record(f"softmoe.soft_topk vs lapsum_torch p, f32, E={E}", _maxabs(pa, pb), 1e-4)
            record(f"softmoe.soft_topk vs lapsum_torch dL/dr, f32, E={E}", _maxabs(ga, gb), 1e-4)
            # truncated variant vs f64 bisection of the truncated, capped kernel
            rt = r.double().clone().requires_grad_(True)
            pt = smoe.soft_topk(rt, K, alpha=ALPHA, eps=TRUNC_EPS, max_active=min(TRUNC_MAX_ACTIVE, E))
            (gt,) = torch.autograd.grad((pt * g.double()).sum(), rt)
            pt_ref, bt_ref = bisect_reference(r.double(), float(K), ALPHA, TRUNC_EPS, min(TRUNC_MAX_ACTIVE, E))
            dr_ref, _, _ = closed_form_vjp(r.double(), pt_ref, bt_ref, g.double(), ALPHA, TRUNC_EPS)
            record(f"softmoe truncated (eps={TRUNC_EPS}, max_active={TRUNC_MAX_ACTIVE}) vs f64 bisection p, "
                   f"f64, E={E}", _maxabs(pt, pt_ref), 1e-9)
            record(f"softmoe truncated vs closed-form VJP dL/dr, f64, E={E}", _maxabs(gt, dr_ref), 1e-9)
            p32 = smoe.soft_topk(r, K, alpha=ALPHA, eps=TRUNC_EPS, max_active=min(TRUNC_MAX_ACTIVE, E))
            record(f"softmoe truncated f32 vs f64 bisection p, E={E}", _maxabs(p32, pt_ref), 1e-4)

    # 5. Baselines produce what they claim (sum of weights).
    x = torch.randn(64, 64, generator=gen)
    record("hard_topk rows sum to 1", _maxabs(hard_topk(x).sum(-1), torch.ones(64)), 1e-5)
    bb, err = _entmax()
    if bb is not None:
        record("entmax budget_bisect rows sum to k", _maxabs(bb(x, budget=K).sum(-1), torch.full((64,), float(K))), 1e-4)
    return {"ok": all(c.get("ok", True) for c in out), "checks": out}


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def _inputs(rows: int, E: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 7919 * E + rows)
    x = torch.randn(rows, E, generator=gen, dtype=torch.float32).requires_grad_(True)
    g = torch.randn(rows, E, generator=gen, dtype=torch.float32)
    return x, g


def _step_cases(fns: Dict[str, Callable], x: torch.Tensor, g: torch.Tensor, mode: str) -> List[Case]:
    cases = []
    for name, fn in fns.items():
        if mode == "fwd_bwd":
            def step(_s, fn=fn):
                x.grad = None
                p = fn(x)
                (p * g).sum().backward()
            cases.append(Case(name, step))
        elif mode == "fwd":  # forward with autograd recording (what training pays before backward)
            def step(_s, fn=fn):
                fn(x)
            cases.append(Case(name, step))
        elif mode == "fwd_nograd":  # inference
            def step(_s, fn=fn):
                with torch.no_grad():
                    fn(x)
            cases.append(Case(name, step))
        elif mode == "bwd":  # backward only: the forward runs untimed in setup
            def setup(fn=fn):
                x.grad = None
                return (fn(x) * g).sum()
            def step(loss):
                loss.backward()
            cases.append(Case(name, step, setup))
        else:
            raise ValueError(mode)
    return cases


FLOOR = "bandwidth_floor"
STEP_OVERHEAD = "step_overhead"
ELEMENTWISE = "elementwise"


def _floor_case(x: torch.Tensor) -> Case:
    """One read of the logits and one write of p: a copy of the scores' bytes into a tensor of
    the same shape, allocated once (the methods allocate p; the floor does not)."""
    src = x.detach()
    out = torch.empty_like(src)
    return Case(FLOOR, lambda _s: out.copy_(src))


def _active_stats(fns: Dict[str, Callable], x: torch.Tensor) -> Dict[str, float]:
    """Mean number of nonzero weights per row (realised active experts)."""
    out = {}
    with torch.no_grad():
        for name, fn in fns.items():
            p = fn(x)
            out[name] = float((p != 0).sum(-1).float().mean())
    return out


def bench_config(rows: int, E: int, methods: List[str], args: argparse.Namespace, modes: List[str]) -> List[Dict[str, Any]]:
    fns, skipped = build_methods(methods, E)
    x, g = _inputs(rows, E, args.seed)
    records: List[Dict[str, Any]] = []
    active = _active_stats(fns, x)
    mem: Dict[str, Optional[int]] = {}
    if args.memory:
        for name, fn in fns.items():
            def once(fn=fn):
                x.grad = None
                (fn(x) * g).sum().backward()
            mem[name] = _timing.peak_memory_bytes(once)
    for mode in modes:
        cases = _step_cases(fns, x, g, mode)
        names = list(methods)
        if mode == "fwd_bwd" and args.breakdown:
            cases += _step_cases({STEP_OVERHEAD: lambda t: t, ELEMENTWISE: torch.relu}, x, g, mode)
            names += [STEP_OVERHEAD, ELEMENTWISE]
        cases.append(_floor_case(x))
        stats = _timing.measure(cases, repeats=args.repeats, warmup=args.warmup, min_repeat_s=args.min_repeat_s)
        base = stats.get(BASELINE)
        floor = stats[FLOOR]
        floor_ns = floor.median_ms * 1e6 / rows
        records.append({
            "method": FLOOR, "mode": mode, "E": E, "rows": rows, "threads": torch.get_num_threads(),
            "dtype": "float32", **floor.as_dict(), "ms": floor.median_ms, "ns_per_row": floor_ns,
            "bytes_per_row": 2 * 4 * E, "GB_per_s": 2 * 4 * E * rows / (floor.median_ms * 1e-3) / 1e9,
        })
        for name in names:
            rec: Dict[str, Any] = {
                "method": name, "mode": mode, "E": E, "rows": rows,
                "threads": torch.get_num_threads(), "dtype": "float32",
            }
            if name in skipped:
                rec["skipped"] = skipped[name]
            else:
                st = stats[name]
                rec.update(st.as_dict())
                rec["ms"] = st.median_ms
                rec["ns_per_row"] = st.median_ms * 1e6 / rows
                rec["floor_ns_per_row"] = floor_ns
                rec["x_floor"] = rec["ns_per_row"] / floor_ns
                if base is not None:
                    rec["ratio_vs_hard_topk"] = _timing.ratio_of_medians(st, base)
                    rec["median_of_paired_ratios"] = _timing.median_of_ratios(st, base)
                    rec["ratio_of_mins"] = st.min_ms / base.min_ms
                rec["mean_active_per_row"] = active.get(name)
                if name in mem:
                    rec["peak_mem_MiB_approx"] = None if mem[name] is None else mem[name] / 2**20
            records.append(rec)
    del x, g
    return records


def _fmt_table(records: List[Dict[str, Any]]) -> str:
    head = (f"{'method':<15} {'mode':<10} {'E':>4} {'rows':>7} {'thr':>3} {'ms':>10} {'iqr':>8} {'min':>9} {'ratio':>7} "
            f"{'pratio':>7} {'ns/row':>8} {'xfloor':>7} {'active':>6}")
    if any(r.get("peak_mem_MiB_approx") is not None for r in records):
        head += f" {'peakMiB~':>9}"
    lines = [head, "-" * len(head)]
    for r in records:
        if "skipped" in r:
            lines.append(f"{r['method']:<15} {r['mode']:<10} {r['E']:>4} {r['rows']:>7} {r['threads']:>3} "
                         f"{'-':>10}  {r['skipped']}")
            continue
        ratio = r.get("ratio_vs_hard_topk")
        pr = r.get("median_of_paired_ratios")
        act = r.get("mean_active_per_row")
        lines.append(
            f"{r['method']:<15} {r['mode']:<10} {r['E']:>4} {r['rows']:>7} {r['threads']:>3} "
            f"{r['ms']:>10.3f} {r['iqr_ms']:>8.3f} {r['min_ms']:>9.3f} {('%.2f' % ratio) if ratio is not None else '-':>7} "
            f"{('%.2f' % pr) if pr is not None else '-':>7} "
            f"{r['ns_per_row']:>8.1f} {('%.1f' % r['x_floor']) if 'x_floor' in r else '-':>7} "
            f"{('%.2f' % act) if act is not None else '-':>6}"
            + (f" {r['peak_mem_MiB_approx']:>9.1f}" if r.get("peak_mem_MiB_approx") is not None else "")
        )
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="softmoe router benchmark: forward+backward of soft_topk vs hard top-k, "
                    "a sort-based pure-PyTorch LapSum and entmax.budget_bisect (ratios vs hard top-k, same run).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--rows", type=int, default=65536, help="rows (tokens) per call")
    ap.add_argument("--experts", type=str, default="8,64,256", help="comma-separated expert counts E")
    ap.add_argument("--methods", type=str, default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--rows-sweep", action="store_true",
                    help="also time rows = 16384, 32768, 65536, 131072 at E = 64 (linearity)")
    ap.add_argument("--sweep-rows", type=str, default="16384,32768,65536,131072", help="rows used by --rows-sweep")
    ap.add_argument("--breakdown", action="store_true",
                    help="also time forward only (grad mode), forward under no_grad, and backward only")
    ap.add_argument("--threads", type=str, default=None,
                    help="torch.set_num_threads value(s), comma-separated (e.g. 1,2); default: torch's default")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats per method (>= 5 recommended)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls per method")
    ap.add_argument("--min-repeat-s", type=float, default=0.0,
                    help="calls per repeat are raised until one repeat takes at least this long")
    ap.add_argument("--memory", action="store_true", help="approximate peak memory per method (torch profiler, slow)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: rows=4096, repeats=5, warmup=1, no sweep, 1 thread unless --threads is "
                         "given (2 OpenMP threads on a busy 2-core machine make small ops 10x slower)")
    ap.add_argument("--skip-check", action="store_true", help="skip the correctness checks before timing")
    ap.add_argument("--json", type=str, default=None,
                    help="where to write the JSON results ('' = don't); default benchmarks/results/bench_router.json, "
                         "or bench_router_quick.json with --quick (so smoke runs never overwrite the full results)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows = 4096
        args.repeats = max(5, min(args.repeats, 5))
        args.warmup = 1
        args.rows_sweep = False
        args.sweep_rows = "1024,2048,4096,8192"
        if args.threads is None:
            args.threads = "1"
    if args.json is None:
        args.json = DEFAULT_JSON.replace(".json", "_quick.json") if args.quick else DEFAULT_JSON
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    experts = [int(e) for e in args.experts.split(",") if e.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; choose from {METHODS}")
    if BASELINE not in methods:
        methods.insert(0, BASELINE)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    default_threads = torch.get_num_threads()

    torch.manual_seed(args.seed)
    result: Dict[str, Any] = {
        "benchmark": "bench_router",
        "machine": _timing.machine_info(),
        "settings": {
            "rows": args.rows, "experts": experts, "methods": methods, "k": K, "alpha": ALPHA,
            "trunc_eps": TRUNC_EPS, "trunc_max_active": TRUNC_MAX_ACTIVE, "entmax_n_iter": ENTMAX_N_ITER,
            "dtype": "float32", "repeats": args.repeats, "warmup": args.warmup,
            "min_repeat_s": args.min_repeat_s, "threads": threads, "seed": args.seed,
            "quick": args.quick, "rows_sweep": args.rows_sweep,
            "sweep_rows": [int(r) for r in args.sweep_rows.split(",")] if args.rows_sweep else [],
            "baseline": BASELINE,
            "step": "p = method(scores); (p * g).sum().backward(); scores.grad reset to None each call",
            "timing": "median over repeats of per-call wall time (time.perf_counter), methods interleaved "
                      "round robin; ratio = median(method) / median(hard_topk) of the same config and run",
        },
    }
    smoe, smoe_err = _softmoe()
    result["softmoe_available"] = smoe is not None
    if smoe is None:
        result["softmoe_error"] = smoe_err
    else:
        result["softmoe_version"] = getattr(smoe, "__version__", None)
    try:
        import entmax

        result["entmax_version"] = getattr(entmax, "__version__", None)
    except Exception:
        result["entmax_version"] = None

    if not args.skip_check:
        print("correctness checks:")
        chk = run_checks(verbose=True)
        result["checks"] = chk
        if not chk["ok"]:
            if args.json:
                _timing.write_json(args.json, result)
            raise SystemExit("correctness checks failed; not timing (see above / --skip-check)")

    modes = ["fwd_bwd"] + (["fwd", "fwd_nograd", "bwd"] if args.breakdown else [])
    configs: List[Tuple[str, int, int]] = [("main", args.rows, E) for E in experts]
    if args.rows_sweep:
        configs += [("rows_sweep", int(r), 64) for r in args.sweep_rows.split(",")]

    records: List[Dict[str, Any]] = []
    try:
        for t in threads:
            torch.set_num_threads(t)
            for tag, rows, E in _timing.progress(configs, desc=f"threads={t}"):
                cfg_modes = modes if tag == "main" else ["fwd_bwd"]
                for rec in bench_config(rows, E, methods, args, cfg_modes):
                    rec["table"] = tag
                    records.append(rec)
    finally:
        torch.set_num_threads(default_threads)
    result["records"] = records

    # Per-method linear fit of time vs rows (rows sweep): ms = a + b * rows.
    if args.rows_sweep:
        fits = {}
        for t in threads:
            for m in methods:
                pts = [(r["rows"], r["ms"]) for r in records
                       if r["table"] == "rows_sweep" and r["method"] == m and r["threads"] == t and "ms" in r]
                if len(pts) >= 2:
                    n = len(pts)
                    mx = sum(p[0] for p in pts) / n
                    my = sum(p[1] for p in pts) / n
                    sxx = sum((p[0] - mx) ** 2 for p in pts)
                    slope = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
                    icpt = my - slope * mx
                    ss_res = sum((p[1] - (icpt + slope * p[0])) ** 2 for p in pts)
                    ss_tot = sum((p[1] - my) ** 2 for p in pts)
                    fits[f"{m}@threads={t}"] = {
                        "ns_per_row_slope": slope * 1e6, "intercept_ms": icpt,
                        "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"),
                        "ms_per_rows": {str(r): ms for r, ms in pts},
                    }
        result["rows_sweep_linear_fit"] = fits

    print()
    print(f"torch {torch.__version__}, cpu: {result['machine']['cpu_model']}, threads {threads}, "
          f"k={K}, alpha={ALPHA}, float32; ratio = median / median(hard_topk), same run")
    for tag in ["main", "rows_sweep"]:
        rs = [r for r in records if r["table"] == tag]
        if rs:
            print(f"\n[{tag}]")
            print(_fmt_table(rs))
    if args.rows_sweep:
        print("\nrows sweep, linear fit ms = a + b*rows:")
        for key, f in result["rows_sweep_linear_fit"].items():
            print(f"  {key:<28} b = {f['ns_per_row_slope']:8.1f} ns/row, a = {f['intercept_ms']:7.3f} ms, R^2 = {f['r2']:.4f}")
    if args.json:
        _timing.write_json(args.json, result)
        print(f"\nwrote {os.path.relpath(args.json)}")
    return result


if __name__ == "__main__":
    main()
