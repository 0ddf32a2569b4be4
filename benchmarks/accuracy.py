#!/usr/bin/env python3
"""Accuracy of softmoe.soft_topk (values and gradients) against the float64 bisection oracle.

The oracle is tests/reference.py: plain bisection on the soft count plus implicit-function
gradients, a different algorithm from the C core (sort + closed form). Every cell compares the op
with the oracle evaluated on the *same* inputs: the scores after rounding to the input dtype, and
k and alpha after rounding to the op's math type (float32, float64 for float64 input). So the
table measures the error the op adds, not the information lost by rounding the inputs; the
latter is reported separately ("input rounding", for information only: at alpha far below the
spacing of the scores, bf16 scores can swap two experts, and no routing op can undo that).

Grid: input dtype {float64, float32, bfloat16, float16} x alpha {1e-4, 1e-2, 1, 1e2, 1e4} relative
to the score scale (scores ~ N(0, 1)) x E {2, 8, 64, 256, 1024} x k {near 0 (1e-3), mid (m / 2),
near max (m - 1e-3)} (m = the candidates, here E) x eps {0, 1e-2}. Per cell, a few rows with a
per-row k and alpha tensor (so that their gradients are per row) and a fixed random upstream
gradient g.

Measured per cell (docs/accuracy.md explains each):
  p_abs            max |p - p_ref|
  sum_per_active   max over rows of |sum(p) - k| / (nonzero p of the row)
  support          entries exactly zero in one of p, p_ref only (eps > 0); support_off_cut: of
                   them, those not within rounding of the cut (must be 0); rows_on_cut: rows with
                   such an entry, left out of the gradient errors (the derivative jumps at the cut)
  grad_*           gradient error of scores, k, alpha relative to the size of the terms of its
                   formula (gradient_scales)
  input_rounding_p_abs   (not float64) max |p_ref(rounded scores) - p_ref(exact scores)|, for information

BOUNDS below are the documented guarantees (docs/accuracy.md, README): the same dict is asserted
by tests/test_numerics.py on a subset of the grid, so the doc and the tests cannot drift apart.

  python3 benchmarks/accuracy.py            # full grid (~5 min on 2 idle cores): writes
                                            #   benchmarks/results/accuracy.json and docs/accuracy.md
  python3 benchmarks/accuracy.py --quick    # E <= 64, prints the tables only
  python3 benchmarks/accuracy.py --from-json  # re-check BOUNDS and re-render the doc from the JSON
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

import softmoe

import _timing  # benchmarks/_timing.py, beside this script

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


def _load_oracle():
    """The tests' oracle module, tests/reference.py (the oracle lives with the tests), loaded from its
    file under a name of its own: this script imports its own folder's modules and the installed
    package, and tests/ is neither."""
    path = os.path.join(_ROOT, "tests", "reference.py")
    spec = importlib.util.spec_from_file_location("softmoe_tests_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_oracle = _load_oracle()
reference_soft_topk = _oracle.reference_soft_topk
truncated_pdf = _oracle.truncated_pdf
truncation_c = _oracle.truncation_c

DTYPES: Dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
ALPHAS = (1e-4, 1e-2, 1.0, 1e2, 1e4)
EXPERTS = (2, 8, 64, 256, 1024)
K_REGIMES = ("near_zero", "mid", "near_max")
EPSILONS = (0.0, 1e-2)
K_NEAR = 1e-3  # distance of k from 0 and from m in the two limit regimes

# The documented bounds: bound(dtype, key, E) = const + per_expert * E over the grid above.
# Why these values (docs/accuracy.md shows the measured maxima next to them):
#  - float64 / float32 are the math type's own error. It grows with E: the threshold solve sums
#    ~E exponentials (relative error ~E u in the sum, so ~E u in p); near k = max_active the scores
#    gradient carries the rounding of 1 - p for p near 1 (the solve works with m - k there), which
#    dominates. About 3x headroom over the measured maximum.
#  - bfloat16 / float16: p is returned in the input dtype, so rounding p in [0, 1] to it costs up
#    to half an ulp of 1 (2^-9 for bfloat16, 2^-12 for float16): the bound is one ulp. The scores
#    gradient is rounded to the input dtype as well; k and alpha gradients are float32 tensors.
#  - sum_per_active: |sum(p) - k| <= bound * (number of nonzero p of the row), no E term.
#  - Gradients are compared on the rows whose zero pattern matches the oracle's: with eps > 0 the
#    truncated kernel's derivative jumps at the cut (the density is eps / (1 - eps) there, 0 just
#    below), so an entry within rounding of the cut may take either one-sided derivative.
BOUNDS: Dict[str, Dict[str, Tuple[float, float]]] = {
    "float64": {"p_abs": (1e-15, 2e-16), "sum_per_active": (4e-15, 0.0), "grad_scores": (1e-12, 1e-13),
                "grad_k": (1e-13, 0.0), "grad_alpha": (4e-12, 0.0)},
    "float32": {"p_abs": (4e-7, 1e-7), "sum_per_active": (4e-6, 0.0), "grad_scores": (1e-3, 3e-5),
                "grad_k": (1e-4, 0.0), "grad_alpha": (1e-3, 0.0)},
    "bfloat16": {"p_abs": (2.0 ** -8, 1e-7), "sum_per_active": (2.0 ** -8, 0.0), "grad_scores": (2.0 ** -7, 3e-5),
                 "grad_k": (1e-4, 0.0), "grad_alpha": (1e-3, 0.0)},
    "float16": {"p_abs": (2.0 ** -11, 1e-7), "sum_per_active": (2.0 ** -11, 0.0), "grad_scores": (2.0 ** -9, 3e-5),
                "grad_k": (1e-4, 0.0), "grad_alpha": (1e-3, 0.0)},
}
BOUND_KEYS = ("p_abs", "sum_per_active", "grad_scores", "grad_k", "grad_alpha")


def bound(dtype: str, key: str, experts: int) -> float:
    """The documented bound of `key` for input dtype `dtype` at E = `experts`."""
    const, per_expert = BOUNDS[dtype][key]
    return const + per_expert * experts


def k_value(regime: str, m: int) -> float:
    if regime == "near_zero":
        return K_NEAR
    if regime == "near_max":
        return m - K_NEAR
    if regime == "mid":
        return m / 2
    raise ValueError(f"unknown k regime {regime!r}")


def rows_for(experts: int) -> int:
    return 4 if experts >= 1024 else 8


def gradient_scales(scores: torch.Tensor, threshold: torch.Tensor, alpha: torch.Tensor, g: torch.Tensor,
                    eps: float) -> Dict[str, torch.Tensor]:
    """Per row, the size of the terms of the gradient formulas (DESIGN.md 2.1), from the oracle's
    threshold, for upstream gradient g. With x = (r - b) / alpha, phi the (truncated) Laplace
    density at x, w = phi / sum(phi) and s = sum(g w):

        dL/dr_j = (phi_j / alpha) (g_j - s)
            scale: max_j (phi_j / alpha)(|g_j| + sum_i w_i |g_i|)
        dL/dk = s
            scale: sum_i w_i |g_i|
        dL/dalpha = -(1/alpha) sum_i g_i phi_i (x_i - xbar),   xbar = sum_i w_i x_i
            scale: (1/alpha) sum_i |g_i| phi_i (|x_i| + sum_j w_j |x_j|)

    The true gradient can cancel to far below these terms (one dominant expert: g_j - s ~ 0), so
    an error relative to the gradient itself would measure that cancellation, not the op."""
    x = (scores - threshold.unsqueeze(-1)) / alpha.unsqueeze(-1)
    phi = truncated_pdf(x, eps)
    w = phi / phi.sum(-1, keepdim=True)
    wg = (w * g.abs()).sum(-1)
    wx = (w * x.abs()).sum(-1)
    return {
        "scores": (phi / alpha.unsqueeze(-1) * (g.abs() + wg.unsqueeze(-1))).amax(-1),
        "k": wg,
        "alpha": (g.abs() * phi * (x.abs() + wx.unsqueeze(-1))).sum(-1) / alpha,
    }


def _scaled(err: torch.Tensor, scale: torch.Tensor, floor: float) -> float:
    """max |err| / max(scale, floor), row by row (0 where err is 0)."""
    err = err.abs()
    ratio = torch.where(err == 0, torch.zeros_like(err), err / scale.clamp_min(floor))
    return float(ratio.max()) if ratio.numel() else 0.0


def measure_cell(dtype: str, alpha: float, experts: int, regime: str, eps: float,
                 rows: Optional[int] = None, seed: int = 0, input_rounding: bool = True) -> Dict[str, Any]:
    """Errors of soft_topk for one cell of the grid (see the module docstring)."""
    dt = DTYPES[dtype]
    math_dt = torch.float64 if dt == torch.float64 else torch.float32
    rows = rows_for(experts) if rows is None else rows
    gen = torch.Generator().manual_seed(seed * 1_000_003 + experts)
    exact = torch.randn(rows, experts, generator=gen, dtype=torch.float64)
    scores = exact.to(dt)
    r64 = scores.double()
    k = k_value(regime, experts)
    # Per-row k around the regime's value (the limits stay inside (0, m)) and per-row alpha.
    jitter = torch.rand(rows, generator=gen, dtype=torch.float64)
    if regime == "mid":
        k_rows = k * (0.8 + 0.4 * jitter)
    elif regime == "near_zero":  # k in [1e-3, 1.5e-3]
        k_rows = k + 0.5 * K_NEAR * jitter
    else:  # k in [m - 1.5e-3, m - 1e-3]
        k_rows = k - 0.5 * K_NEAR * jitter
    a_rows = alpha * (0.75 + 0.5 * torch.rand(rows, generator=gen, dtype=torch.float64))
    k_op = k_rows.to(math_dt)
    a_op = a_rows.to(math_dt)
    g = torch.randn(rows, experts, generator=gen, dtype=torch.float64).to(dt)

    r = scores.clone().requires_grad_(True)
    kk = k_op.clone().requires_grad_(True)
    aa = a_op.clone().requires_grad_(True)
    p = softmoe.soft_topk(r, kk, aa, eps=eps)
    (p * g).sum().backward()

    rr = r64.clone().requires_grad_(True)
    kr = k_op.double().requires_grad_(True)
    ar = a_op.double().requires_grad_(True)
    ref, threshold = reference_soft_topk(rr, kr, ar, eps=eps, return_threshold=True)
    (ref * g.double()).sum().backward()
    scale = gradient_scales(r64, threshold, ar.detach(), g.double(), eps)

    p64 = p.detach().double()
    nnz = (p64 != 0).sum(-1).clamp_min(1).double()
    sum_err = (p64.sum(-1) - k_op.double()).abs()
    differs = (p64 == 0) != (ref.detach() == 0)
    if eps == 0:  # no cut; only underflow makes zeros (float32: ~103 alpha below b)
        differs = torch.zeros_like(differs)
    # An entry may be zero in one and not the other only within rounding of the cut x = -c.
    x = (r64 - threshold.unsqueeze(-1)) / a_op.double().unsqueeze(-1)
    u = torch.finfo(math_dt).eps
    c = truncation_c(eps) if eps > 0 else 0.0
    on_cut = (x + c).abs() <= 16 * u * ((r64.abs() + threshold.abs().unsqueeze(-1)) / a_op.double().unsqueeze(-1)
                                         + 1 + c)
    same = ~differs.any(-1)  # rows whose gradients are comparable (see BOUNDS)
    out: Dict[str, Any] = {
        "dtype": dtype, "alpha": alpha, "experts": experts, "k_regime": regime, "eps": eps, "rows": rows,
        "finite": bool(torch.isfinite(p64).all() and torch.isfinite(r.grad).all()
                       and torch.isfinite(kk.grad).all() and torch.isfinite(aa.grad).all()),
        "p_abs": float((p64 - ref.detach()).abs().max()),
        "sum_abs": float(sum_err.detach().max()),
        "sum_per_active": float((sum_err / nnz).detach().max()),
        "support": int(differs.sum()),
        "support_off_cut": int((differs & ~on_cut).sum()),
        "rows_on_cut": int((~same).sum()),
        "active_mean": float((p64 != 0).sum(-1).double().mean()),
        # The scores gradient is returned in the input dtype: below its smallest normal number
        # (6.1e-5 for float16) only absolute accuracy is possible. k and alpha are math-type tensors.
        "grad_scores": _scaled((r.grad.double() - rr.grad)[same], scale["scores"][same].unsqueeze(-1),
                               torch.finfo(dt).tiny),
        "grad_k": _scaled((kk.grad.double() - kr.grad)[same], scale["k"][same], torch.finfo(math_dt).tiny),
        "grad_alpha": _scaled((aa.grad.double() - ar.grad)[same], scale["alpha"][same], torch.finfo(math_dt).tiny),
    }
    if input_rounding and dt != torch.float64:
        with torch.no_grad():
            ref_exact = reference_soft_topk(exact, k_op.double(), a_op.double(), eps=eps)
        out["input_rounding_p_abs"] = float((ref.detach() - ref_exact).abs().max())
    return out


def violations(cell: Dict[str, Any]) -> List[str]:
    """The bounds this cell breaks (empty: within every documented bound)."""
    tag = (f"{cell['dtype']} alpha={cell['alpha']:g} E={cell['experts']} k={cell['k_regime']} "
           f"eps={cell['eps']:g}")
    bad = []
    if not cell["finite"]:
        bad.append(f"{tag}: non-finite values or gradients")
    for key in BOUND_KEYS:
        limit = bound(cell["dtype"], key, cell["experts"])
        if not cell[key] <= limit:
            bad.append(f"{tag}: {key} = {cell[key]:.3g} > {limit:.3g}")
    if cell["support_off_cut"]:
        bad.append(f"{tag}: {cell['support_off_cut']} entries away from the cut differ in being exactly zero")
    return bad


def run_grid(experts=EXPERTS, alphas=ALPHAS, dtypes=tuple(DTYPES), regimes=K_REGIMES, epsilons=EPSILONS,
             progress: bool = True) -> List[Dict[str, Any]]:
    cells = []
    grid = [(d, a, e, kr, ep) for e in experts for d in dtypes for a in alphas for kr in regimes for ep in epsilons]
    for d, a, e, kr, ep in _timing.progress(grid, desc="cells", disable=not progress, mininterval=2.0):
        cells.append(measure_cell(d, a, e, kr, ep))
    return cells


# ---- report ---------------------------------------------------------------------------------


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.1e}"


def _max_over(cells: List[Dict[str, Any]], key: str, **where: Any) -> float:
    vals = [c[key] for c in cells if all(c[k] == v for k, v in where.items()) and key in c]
    return max(vals) if vals else float("nan")


def bound_text(dtype: str, key: str) -> str:
    const, per_expert = BOUNDS[dtype][key]
    return _fmt(const) + (f" + {_fmt(per_expert)}·E" if per_expert else "")


def tables(cells: List[Dict[str, Any]]) -> str:
    dtypes = [d for d in DTYPES if any(c["dtype"] == d for c in cells)]
    alphas = sorted({c["alpha"] for c in cells})
    experts = sorted({c["experts"] for c in cells})
    regimes = [r for r in K_REGIMES if any(c["k_regime"] == r for c in cells)]
    titles = {"p_abs": "max |p − p_ref|", "sum_per_active": "max |Σp − k| / (nonzero p of the row)",
              "grad_scores": "scores gradient, relative to its terms", "grad_k": "k gradient, relative to its terms",
              "grad_alpha": "alpha gradient, relative to its terms"}
    lines = ["### Bounds: const + per_expert × E", "",
             "| input dtype | " + " | ".join(BOUND_KEYS) + " |", "|---|" + "---|" * len(BOUND_KEYS)]
    for d in dtypes:
        lines.append(f"| {d} | " + " | ".join(bound_text(d, k) for k in BOUND_KEYS) + " |")
    for key in BOUND_KEYS:
        lines += ["", f"### {key}: {titles[key]} — measured max (bound) by E", "",
                  "| input dtype | " + " | ".join(f"E = {e}" for e in experts) + " |", "|---|" + "---|" * len(experts)]
        for d in dtypes:
            measured = [_max_over(cells, key, dtype=d, experts=e) for e in experts]
            lines.append(f"| {d} | " + " | ".join(
                f"{_fmt(v)} ({_fmt(bound(d, key, e))})" for v, e in zip(measured, experts)) + " |")

    def grid(key: str, axis: str, values: List[Any], label, title: str = "") -> List[str]:
        out = ["", title or f"### max {key} by input dtype and {axis}", "",
               "| input dtype | " + " | ".join(label(v) for v in values) + " |", "|---|" + "---|" * len(values)]
        for d in dtypes:
            measured = [_max_over(cells, key, dtype=d, **{axis: v}) for v in values]
            if all(math.isnan(v) for v in measured):
                continue
            out.append(f"| {d} | " + " | ".join(_fmt(v) for v in measured) + " |")
        return out

    lines += grid("p_abs", "alpha", alphas, lambda a: f"alpha = {a:g}")
    lines += grid("p_abs", "k_regime", regimes, lambda r: r)
    lines += grid("grad_scores", "alpha", alphas, lambda a: f"alpha = {a:g}")
    lines += grid("grad_scores", "k_regime", regimes, lambda r: r)
    lines += ["", "### Exact zeros (eps = 1e-2)", "",
              "| input dtype | entries zero in one of p, p_ref only | of them away from the cut "
              "| rows left out of the gradient columns |",
              "|---|---|---|---|"]
    for d in dtypes:
        cs = [c for c in cells if c["dtype"] == d and c["eps"] > 0]
        lines.append(f"| {d} | {sum(c['support'] for c in cs)} of {sum(c['rows'] * c['experts'] for c in cs)} "
                     f"| {sum(c['support_off_cut'] for c in cs)} | {sum(c['rows_on_cut'] for c in cs)} of "
                     f"{sum(c['rows'] for c in cs)} |")
    on_cut = [c for c in cells if c["rows_on_cut"]]
    if on_cut:
        lines += ["", "Rows with an entry on the cut: " + "; ".join(
            f"{c['dtype']} alpha = {c['alpha']:g}, E = {c['experts']}, k {c['k_regime']}: {c['rows_on_cut']} of "
            f"{c['rows']}" for c in on_cut) + ". (At alpha = 1e4 × the score scale and k → 0 with eps > 0, every "
            "x = (r − b)/alpha lies within ~5e-4 of the cut −c, so rounding decides which side each is on.)"]
    lines += grid("input_rounding_p_abs", "alpha", alphas, lambda a: f"alpha = {a:g}",
                  "### For information: max |p_ref(scores rounded to the dtype) − p_ref(exact scores)| by alpha")
    return "\n".join(lines)


DOC_HEAD = """# soft_topk accuracy

<!-- Generated by `python3 benchmarks/accuracy.py` from BOUNDS and the measured grid in
     benchmarks/results/accuracy.json; do not edit by hand. tests/test_numerics.py asserts the same
     BOUNDS on a subset of the grid. -->

`softmoe.soft_topk` against the float64 bisection oracle of `tests/reference.py` (a different
algorithm: bisection on the soft count and implicit-function gradients, no sort, no closed form),
evaluated on the same inputs: the scores rounded to the input dtype, k and alpha rounded to the
op's math type (float32; float64 for float64 input).

Grid: input dtype × alpha ∈ {1e-4, 1e-2, 1, 1e2, 1e4} relative to the score scale (scores ~ N(0, 1))
× E ∈ {2, 8, 64, 256, 1024} × k ∈ {near 0 (1e-3), mid (E/2), near max (E − 1e-3)} × eps ∈ {0, 1e-2};
per cell 8 rows (4 at E = 1024) with a per-row k and alpha tensor and a random upstream gradient.

What is measured per cell:
- `p_abs`: max |p − p_ref|.
- `sum_per_active`: max over rows of |Σp − k| / (number of nonzero p); the guarantee is
  |Σp − k| ≤ bound × (number of nonzero p).
- `grad_scores`, `grad_k`, `grad_alpha`: the gradient error relative to the size of the terms of
  its formula (DESIGN.md §2.1; x = (r − b)/alpha, φ the truncated Laplace density, w = φ/Σφ):
  max_j |Δ ∂L/∂r_j| / max_j (φ_j/alpha)(|g_j| + Σ w|g|) per row, |Δ ∂L/∂k| / Σ w|g|, and
  |Δ ∂L/∂alpha| / ((1/alpha) Σ |g| φ (|x| + Σ w|x|)). Relative to the gradient itself would
  measure cancellation in the exact value (one dominant expert makes g_j − s ≈ 0), not the op.
  Below the smallest normal number of the returned dtype (6.1e-5 for float16) only absolute
  accuracy is possible, so the denominator is at least that number.
- Exact zeros (eps > 0): entries exactly zero in one of p, p_ref only. An entry may differ only
  within rounding of the cut x = −c (checked: none elsewhere). The truncated kernel's derivative
  jumps at the cut (φ = eps/(1 − eps) just above, 0 below), so rows with such an entry take the
  other one-sided derivative and are left out of the gradient columns (counted below).
- `input_rounding_p_abs` (for information, not a property of the op): max |p_ref(rounded scores)
  − p_ref(exact scores)|. When alpha is far below the spacing of the scores, rounding the scores
  to bfloat16 reorders experts; no routing op can undo that, so keep router logits in float32
  (SoftMoELayer does) when alpha is small relative to their scale.

Why the bounds: float64 and float32 are the math type's own error, with headroom over the
measured maximum; it grows with E (the threshold solve sums ~E exponentials), and the scores
gradient near k = max_active is limited by the rounding of 1 − p for p close to 1 (the solve works
with m − k there). bfloat16 and float16 results are returned in
the input dtype, so rounding p ∈ [0, 1] costs up to half an ulp of 1 (2^-9, 2^-12): the bound is
one ulp; the scores gradient is rounded to the input dtype too.

Limits (tested in `tests/test_numerics.py`, all dtypes, no NaN, finite gradients):
- k → 0: p → 0 linearly. With eps = 0, once every p ≤ 1/2, p = k·softmax(r/alpha) exactly and
  ∂L/∂k = Σ g·softmax(r/alpha). With eps > 0 the top-scoring candidate is the only nonzero once
  k < eps/(1 − eps) × (its gap to the second)/alpha. A per-row k tensor may be exactly 0 (p = 0,
  zero gradients). With one active expert it carries k exactly, so Σp = k relative to k
  (`test_small_k_truncated_relative_accuracy`); two experts tied to within ~k/eps × alpha share a
  tiny k to an absolute ~ulp(c)·eps each, since (F(x) − eps) cancels near the cut
  (`test_small_k_near_tie_is_accurate_in_absolute_terms`).
- k → max_active (m candidates): p → 1 on the candidates, exactly 0 elsewhere; once every
  candidate is above the threshold, 1 − p = (m − k)·softmax(−r/alpha) over the candidates (any
  eps). A per-row k tensor may be exactly m (p = 1 on the candidates, zero gradients).

"""


def write_doc(path: str, cells: List[Dict[str, Any]], info: Dict[str, Any]) -> None:
    text = DOC_HEAD + tables(cells) + (
        f"\n\nMeasured on {info.get('cpu_model', '?')} with torch {info.get('torch', '?')} "
        f"({info.get('date_utc', '?')}); command: `{info.get('command', 'python3 benchmarks/accuracy.py')}`.\n")
    with open(path, "w") as f:
        f.write(text)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="E <= 64 only; print, write nothing")
    ap.add_argument("--out", default=os.path.join(_HERE, "results", "accuracy.json"))
    ap.add_argument("--doc", default=os.path.join(_ROOT, "docs", "accuracy.md"))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--from-json", action="store_true",
                    help="re-check and re-render --doc from the cells stored in --out (no measuring)")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.out) as f:
            stored = json.load(f)
        cells = stored["cells"]
        failures = [v for c in cells for v in violations(c)]
        stored.update(bounds=BOUNDS, passed=not failures, failures=failures)
        _timing.write_json(args.out, stored)
        write_doc(args.doc, cells, stored["machine"])
        print(tables(cells))
        print(f"\nre-rendered {args.doc} from {args.out}: " + ("BOUNDS VIOLATED:\n  " + "\n  ".join(failures)
                                                                if failures else "all cells within the bounds"))
        return 1 if failures else 0
    if args.threads:
        torch.set_num_threads(args.threads)
    experts = tuple(e for e in EXPERTS if e <= 64) if args.quick else EXPERTS
    t0 = time.perf_counter()
    cells = run_grid(experts=experts)
    elapsed = time.perf_counter() - t0
    print(tables(cells))
    failures = [v for c in cells for v in violations(c)]
    if failures:
        print("\nBOUNDS VIOLATED:\n  " + "\n  ".join(failures))
    else:
        print(f"\nall {len(cells)} cells within the documented bounds ({elapsed:.0f} s)")
    if not args.quick:
        info = _timing.machine_info()
        if argv is not None:
            info["command"] = "python3 benchmarks/accuracy.py " + " ".join(argv)
        _timing.write_json(args.out, {"benchmark": "accuracy", "machine": info, "bounds": BOUNDS,
                                      "grid": {
                                          "dtypes": list(DTYPES), "alphas": list(ALPHAS), "experts": list(experts),
                                          "k_regimes": list(K_REGIMES), "k_near": K_NEAR, "eps": list(EPSILONS)},
                                      "wall_s": elapsed, "passed": not failures, "failures": failures,
                                      "cells": cells})
        write_doc(args.doc, cells, info)
        print(f"wrote {args.out} and {args.doc}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
