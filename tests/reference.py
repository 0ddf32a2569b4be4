"""Slow, obviously-correct pure-PyTorch oracle for softmoe.soft_topk (float64).

Deliberately a different algorithm from the C core (which sorts and uses the closed form of the
LapSum quadratic): per row, the threshold b is found by plain bisection on the (truncated) soft
count

    T(b) = sum_{i in candidates} G((r_i - b) / alpha),
    G(x) = 0 for x <= -c,  (F(x) - eps) / (1 - eps) otherwise,  c = -ln(2 eps)  (c = inf for eps = 0),
    F(x) = exp(x)/2 for x <= 0,  1 - exp(-x)/2 for x > 0.

The comparison T(b) > k is made without cancellation: the integer count of entries above b is
separated from the two small tail sums, which are compared in log space when that integer equals k
(otherwise T(b) == k in floating point over a whole interval of b when the gaps are large). The
bisection runs twice, first relative to the row maximum, then relative to the candidate score nearest
the threshold (shift invariance), so x = (r - b)/alpha is resolved to full precision.

The root is made differentiable by the implicit-function trick: with b0 the bisection root and
T'(b0) both detached,

    b = b0 - (T(b0; r, alpha, k) - stopgrad(T(b0; r, alpha, k))) / T'(b0)

has the value b0 and exactly the implicit derivatives db/dr = -dT/dr / T', db/dk = 1 / T',
db/dalpha = -dT/dalpha / T' at the root. Gradients of p = G((r - b)/alpha) with respect to scores,
k and alpha then come from plain torch autograd (no hand-written backward).

Candidates of a row: the `max_active` largest finite scores, ties broken by the lower index
(computed by counting, O(E^2) per row, no sort). -inf scores are never candidates.

Row-wise special cases follow the softmoe contract: k == 0 -> p = 0 (threshold +inf); k == number
of candidates -> p = 1 on the candidates (threshold -inf); both with zero gradients. A row with a
NaN or +inf score, k < 0, k > number of candidates, or alpha that is not a finite number > 0
gives NaN.
"""
import math
from typing import Optional, Tuple, Union

import torch

Param = Union[float, int, torch.Tensor]

BISECTION_STEPS = 200


def laplace_cdf(x: torch.Tensor) -> torch.Tensor:
    """F(x) with every exp argument <= 0; differentiable everywhere including x == 0."""
    left = 0.5 * torch.exp(torch.clamp(x, max=0.0))
    right = 1.0 - 0.5 * torch.exp(-torch.clamp(x, min=0.0))
    return torch.where(x <= 0, left, right)


def laplace_pdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.exp(-x.abs())


def truncation_c(eps: float) -> float:
    return math.inf if eps == 0.0 else -math.log(2.0 * eps)


def truncated_cdf(x: torch.Tensor, eps: float) -> torch.Tensor:
    """G_c(x): the Laplace CDF conditioned on x > -c (plain F for eps == 0)."""
    if eps == 0.0:
        return laplace_cdf(x)
    c = truncation_c(eps)
    g = (laplace_cdf(x) - eps) / (1.0 - eps)
    return torch.where(x > -c, g, torch.zeros_like(g))


def truncated_pdf(x: torch.Tensor, eps: float) -> torch.Tensor:
    if eps == 0.0:
        return laplace_pdf(x)
    c = truncation_c(eps)
    phi = laplace_pdf(x) / (1.0 - eps)
    return torch.where(x > -c, phi, torch.zeros_like(phi))


def candidate_mask(scores: torch.Tensor, max_active: Optional[int]) -> torch.Tensor:
    """[rows, E] bool: the max_active largest finite scores of each row, ties -> lower index.

    rank_i = #{j : r_j > r_i} + #{j < i : r_j == r_i}; a finite score is a candidate iff rank < m.
    (-inf scores rank after every finite one, so they never push a finite score out.)
    """
    rows, n = scores.shape
    m = n if max_active is None else max_active
    ri = scores.unsqueeze(-1)  # [rows, E, 1]  (i)
    rj = scores.unsqueeze(-2)  # [rows, 1, E]  (j)
    idx = torch.arange(n, device=scores.device)
    lower = (idx.unsqueeze(0) < idx.unsqueeze(1)).unsqueeze(0)  # [1, i, j]: j < i
    rank = (rj > ri).sum(-1) + ((rj == ri) & lower).sum(-1)
    return torch.isfinite(scores) & (rank < m)


def _row_param(value: Param, rows: int, name: str) -> torch.Tensor:
    """k or alpha as a float64 [rows] tensor (keeps the autograd graph of a tensor argument)."""
    if isinstance(value, torch.Tensor):
        t = value.to(torch.float64)
        if t.numel() == 1:
            return t.reshape(()).expand(rows)
        if t.numel() != rows:
            raise ValueError(f"reference: {name} must have 1 or {rows} values, got {t.numel()}")
        return t.reshape(rows)
    return torch.full((rows,), float(value), dtype=torch.float64)


def _count_excess(x: torch.Tensor, use: torch.Tensor, k: torch.Tensor, eps: float) -> torch.Tensor:
    """(1 - eps) * (T(b) - k) without cancellation (differentiable in x and k).

    With N = #{candidates with x > 0}, U = sum_{x > 0} (1 - F(x)) and L = sum_{-c < x <= 0} (F(x) - eps):
    (1 - eps) T(b) = N (1 - eps) - U + L, so the integer part N - k is separated from the two small sums.
    Without this, T(b) == k in floating point over a whole interval of b when the gaps are large
    (e.g. r = [3, 1, 0.5, -2], k = 1, alpha = 0.01, where U and L are ~1e-44).
    """
    c = truncation_c(eps)
    above = use & (x > 0)
    below = use & (x <= 0) & (x > -c)
    n_above = above.sum(-1).to(x.dtype)
    u = torch.where(above, 0.5 * torch.exp(-torch.clamp(x, min=0.0)), torch.zeros_like(x)).sum(-1)
    low = torch.where(below, 0.5 * torch.exp(torch.clamp(x, max=0.0)) - eps, torch.zeros_like(x)).sum(-1)
    return (n_above - k) * (1.0 - eps) + (low - u)


def _count_above_k(x: torch.Tensor, use: torch.Tensor, k: torch.Tensor, eps: float) -> torch.Tensor:
    """T(b) > k, decided robustly (log space when the integer part N - k is exactly 0)."""
    c = truncation_c(eps)
    above = use & (x > 0)
    below = use & (x <= 0) & (x > -c)
    n_above = above.sum(-1).to(x.dtype)
    excess = _count_excess(x, use, k, eps)
    tie = n_above == k
    if not bool(tie.any()):
        return excess > 0
    neg_inf = torch.full_like(x, -math.inf)
    log_u = torch.logsumexp(torch.where(above, -x, neg_inf), -1)
    if eps == 0.0:
        log_terms = x
    else:  # log(F(x) - eps) + ln 2 = x + log(1 - exp(-(x + c)))
        log_terms = x + torch.log(-torch.expm1(-torch.clamp(x + c, min=1e-300)))
    log_l = torch.logsumexp(torch.where(below, log_terms, neg_inf), -1)
    return torch.where(tie, log_l > log_u, excess > 0)


def _bisect(rel: torch.Tensor, use: torch.Tensor, k: torch.Tensor, alpha: torch.Tensor, eps: float) -> torch.Tensor:
    """Root b of T(b) = k per row by bisection, with T over the `use` entries of the scores `rel`."""
    big = torch.full_like(rel, math.inf)
    r_max = torch.where(use, rel, -big).max(-1).values
    r_min = torch.where(use, rel, big).min(-1).values
    m = use.sum(-1).to(rel.dtype)
    # Bracket: G <= F, so T(b) <= m exp((r_max - b)/alpha)/2 < k for b >= b_hi; for x >= 0,
    # 1 - G(x) <= exp(-x)/(2(1 - eps)) <= exp(-x), so T(b) >= m - m exp((b - r_min)/alpha) > k for b <= b_lo.
    b_hi = r_max + alpha * (torch.log(m / k) + 1.0)
    b_lo = r_min + alpha * (torch.log((m - k) / m) - 1.0)

    def count_above_k(b: torch.Tensor) -> torch.Tensor:
        return _count_above_k((rel - b.unsqueeze(-1)) / alpha.unsqueeze(-1), use, k, eps)

    assert not bool(count_above_k(b_hi).any()) and bool(count_above_k(b_lo).all()), "bad bracket"
    lo, hi = b_lo, b_hi
    for step in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        above = count_above_k(mid)  # count too large -> the threshold must move up
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
        # Stop once b is known to 1e-18 * alpha (far below the float64 resolution of p) or to 1 ulp.
        if step % 8 == 7:
            nxt = 0.5 * (lo + hi)
            if bool(((hi - lo <= 1e-18 * alpha) | (nxt == lo) | (nxt == hi)).all()):
                break
    return 0.5 * (lo + hi)


def reference_soft_topk(
    scores: torch.Tensor,
    k: Param,
    alpha: Param = 1.0,
    eps: float = 0.0,
    max_active: Optional[int] = None,
    return_threshold: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """p (float64, [rows, E]) and optionally the threshold b (float64, [rows], not differentiable).

    scores: [rows, E] (any float dtype; converted to float64 with its autograd graph kept).
    k, alpha: python numbers, or tensors with 1 or `rows` values (gradients flow to them).
    """
    assert scores.dim() == 2, "reference_soft_topk takes a [rows, E] tensor"
    r = scores.to(torch.float64)
    rows, n = r.shape
    kk = _row_param(k, rows, "k")
    aa = _row_param(alpha, rows, "alpha")
    if rows == 0:
        p = r * 0.0
        return (p, r.new_empty((0,))) if return_threshold else p

    with torch.no_grad():
        rd = r.detach()
        kd = kk.detach()
        ad = aa.detach()
        cand = candidate_mask(rd, max_active)
        ncand = cand.sum(-1).to(torch.float64)
        bad_scores = torch.isnan(rd).any(-1) | torch.isposinf(rd).any(-1)
        bad_alpha = ~(torch.isfinite(ad) & (ad > 0))
        bad_k = torch.isnan(kd) | (kd < 0) | (kd > ncand)
        bad = bad_scores | bad_alpha | bad_k
        zero_row = ~bad & (kd == 0)
        full_row = ~bad & ~zero_row & (kd == ncand)
        interior = ~(bad | zero_row | full_row)

        # Dummy values on the special rows so the bisection stays finite there (masked out below).
        ks = torch.where(interior, kd, torch.full_like(kd, 0.5))
        als = torch.where(interior, ad, torch.ones_like(ad))
        # Candidates of the interior rows; each special row gets one dummy candidate at score 0.
        cand_i = cand & interior.unsqueeze(-1)
        use = cand_i.clone()
        use[~interior, 0] = True

        # Work in a shifted frame (shift invariance; the shift is a detached constant) so that the
        # bisection on b resolves x = (r - b)/alpha to full precision: first relative to the row
        # maximum, then again relative to the candidate score nearest to the threshold found.
        safe_r = torch.where(cand, rd, torch.full_like(rd, -math.inf))
        shift = safe_r.max(-1).values
        shift = torch.where(interior, shift, torch.zeros_like(shift))
        b0 = _bisect(torch.where(cand_i, rd - shift.unsqueeze(-1), torch.zeros_like(rd)), use, ks, als, eps)
        dist = torch.where(cand_i, (rd - (shift + b0).unsqueeze(-1)).abs(), torch.full_like(rd, math.inf))
        nearest = torch.gather(rd, -1, dist.argmin(-1, keepdim=True)).squeeze(-1)
        shift = torch.where(interior, nearest, torch.zeros_like(shift))
        rel = torch.where(cand_i, rd - shift.unsqueeze(-1), torch.zeros_like(rd))
        b0 = _bisect(rel, use, ks, als, eps)
        x0 = (rel - b0.unsqueeze(-1)) / als.unsqueeze(-1)
        dT_db = -torch.where(use, truncated_pdf(x0, eps), torch.zeros_like(x0)).sum(-1) / als
        dT_db_safe = torch.where(dT_db != 0, dT_db, torch.full_like(dT_db, -1.0))

    # Differentiable part (graph through r, k, alpha of the interior rows only).
    alpha_rows = torch.where(interior, aa, torch.ones_like(aa))
    k_rows = torch.where(interior, kk, torch.full_like(kk, 0.5))
    r_rel = torch.where(cand_i, r - shift.unsqueeze(-1), torch.zeros_like(r))
    x_at_b0 = (r_rel - b0.unsqueeze(-1)) / alpha_rows.unsqueeze(-1)
    resid = _count_excess(x_at_b0, use, k_rows, eps) / (1.0 - eps)  # T(b0) - k, differentiable
    # Only the derivative of the residual is used: the value of b stays the bisection root b0 (a full
    # Newton step would overshoot where T' is tiny, e.g. next to the truncation kink).
    resid = resid - resid.detach()
    step = torch.where(dT_db != 0, resid / dT_db_safe, torch.zeros_like(resid))
    b = b0 - step  # value b0; derivatives = the implicit derivatives db = -dT / T'(b0)
    x = (r_rel - b.unsqueeze(-1)) / alpha_rows.unsqueeze(-1)
    g = truncated_cdf(x, eps)
    p = torch.where(cand_i, g, torch.zeros_like(g))

    zeros = torch.zeros_like(p)
    ones_on_cand = torch.where(cand, torch.ones_like(p), zeros)
    out = torch.where(interior.unsqueeze(-1), p, zeros)
    out = torch.where(full_row.unsqueeze(-1), ones_on_cand, out)
    out = torch.where(bad.unsqueeze(-1), torch.full_like(p, math.nan), out)

    if not return_threshold:
        return out
    with torch.no_grad():
        thr = b.detach() + shift
        thr = torch.where(zero_row, torch.full_like(thr, math.inf), thr)
        thr = torch.where(full_row, torch.full_like(thr, -math.inf), thr)
        thr = torch.where(bad, torch.full_like(thr, math.nan), thr)
    return out, thr


def reference_nd(
    scores: torch.Tensor,
    k: Param,
    alpha: Param = 1.0,
    dim: int = -1,
    eps: float = 0.0,
    max_active: Optional[int] = None,
) -> torch.Tensor:
    """reference_soft_topk for any shape/dim: k/alpha tensors are scalars or scores.shape minus dim."""
    moved = scores.movedim(dim, -1)
    lead = moved.shape[:-1]
    flat = moved.reshape(-1, moved.shape[-1])
    p = reference_soft_topk(flat, k, alpha, eps=eps, max_active=max_active)
    return p.reshape(*lead, moved.shape[-1]).movedim(-1, dim)


# ==== Truncated dispatch reference (dispatch_plan / gather_rows / combine_rows) ===============
# Deliberately naive: Python loops over tokens and experts, float64, for small sizes only. Used by
# tests/test_dispatch.py.


def reference_dispatch_plan(p: torch.Tensor, max_active: int) -> Tuple[torch.Tensor, ...]:
    """(offsets, pair_token, pair_expert, token_pairs) of p [T, E] by the definition: a token's
    first max_active nonzero entries in expert order, pairs listed expert by expert and token by
    token, -1 padding."""
    T, E = p.shape
    M = max_active
    pv = p.detach().double().cpu()
    kept = []
    for t in range(T):
        row = [e for e in range(E) if pv[t, e].item() != 0.0][:M]  # NaN != 0 is True
        kept.append(row)
    pairs = [(t, e) for e in range(E) for t in range(T) if e in kept[t]]
    offsets = [0] * (E + 1)
    for _, e in pairs:
        offsets[e + 1] += 1
    for e in range(E):
        offsets[e + 1] += offsets[e]
    P = T * M
    pair_token = [-1] * P
    pair_expert = [-1] * P
    token_pairs = [[-1] * M for _ in range(T)]
    for s, (t, e) in enumerate(pairs):
        pair_token[s] = t
        pair_expert[s] = e
        token_pairs[t][kept[t].index(e)] = s
    as_long = dict(dtype=torch.int64)
    return (
        torch.tensor(offsets, **as_long),
        torch.tensor(pair_token, **as_long),
        torch.tensor(pair_expert, **as_long),
        torch.tensor(token_pairs, **as_long).reshape(T, M),
    )


def reference_moe(x: torch.Tensor, p: torch.Tensor, max_active: int, experts) -> torch.Tensor:
    """y[t] = sum over token t's first max_active nonzero p[t, e] of p[t, e] * experts(e, x[t]),
    summed in expert order, by a loop over tokens and experts (differentiable in x and p)."""
    T, E = p.shape
    rows = []
    for t in range(T):
        acc = torch.zeros_like(experts(0, x[t : t + 1])[0])
        n = 0
        for e in range(E):
            if n == max_active:
                break
            if p[t, e].item() != 0.0:
                acc = acc + p[t, e] * experts(e, x[t : t + 1])[0]
                n += 1
        rows.append(acc)
    if not rows:
        return x.new_zeros((0, experts(0, x[:1] if len(x) else x.new_zeros((1, x.shape[-1]))).shape[-1]))
    return torch.stack(rows)


# ==== naive per-token SoftMoE layer reference ===================================================
# Deliberately naive: a Python loop over tokens and over each token's experts, float64 throughout,
# small sizes only. Routing uses the bisection oracle above, one token (one row) at a time; each
# expert is written out with plain matmuls from the layer's weight tensors. Everything stays on the
# autograd graph of the layer's parameters (router, experts, k_logit, log_alpha) and of x, so the
# reference gives reference gradients too. Used by tests/test_layer.py and tests/test_baselines.py.


def _ref_silu(h: torch.Tensor) -> torch.Tensor:
    return h * (1.0 / (1.0 + torch.exp(-h)))


def _ref_gelu(h: torch.Tensor) -> torch.Tensor:
    return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))


def reference_expert(experts, e: int, x_t: torch.Tensor) -> torch.Tensor:
    """Expert e of a GroupedExperts on one token x_t [d_model], float64, plain matmuls.

    SwiGLU: (silu(x W_in[:, :h]) * (x W_in[:, h:])) W_out; GELU (exact, erf): gelu(x W_in) W_out.
    """
    w_in = experts.w_in[e].to(torch.float64)
    w_out = experts.w_out[e].to(torch.float64)
    h = x_t.to(torch.float64) @ w_in
    if experts.activation == "swiglu":
        d_hidden = experts.d_hidden
        a = _ref_silu(h[:d_hidden]) * h[d_hidden:]
    elif experts.activation == "gelu":
        a = _ref_gelu(h)
    else:  # pragma: no cover
        raise ValueError(f"unknown activation {experts.activation!r}")
    return a @ w_out


def reference_softmoe_routing(layer, x_t: torch.Tensor) -> torch.Tensor:
    """Routing weights p [E] (float64) of one token x_t [d_model] of a SoftMoELayer: float64 router
    logits, then the bisection oracle with the layer's k, alpha, eps and max_active."""
    logits = layer.router.weight.to(torch.float64) @ x_t.to(torch.float64)
    return reference_soft_topk(
        logits.unsqueeze(0), layer.k, layer.alpha, eps=layer.eps, max_active=layer.max_active
    )[0]


def reference_softmoe_layer(layer, x: torch.Tensor) -> torch.Tensor:
    """SoftMoELayer(x) by its definition, token by token (float64 result, shape of x).

    y_t = sum_{i : p_i > 0} w_i * Expert_i(x_t), in expert order, with p the per-token soft top-k
    of the router logits and w_i = p_i / k (combine="normalized"), p_i (combine="sum") or
    p_i g_i / sum_{j : p_j > 0} p_j g_j with g the softmax of the logits (combine="gate").
    """
    d_model = layer.router.weight.shape[1]
    tokens = x.reshape(-1, d_model)
    k = layer.k.to(torch.float64)
    rows = []
    for t in range(tokens.shape[0]):
        x_t = tokens[t]
        p = reference_softmoe_routing(layer, x_t)
        if layer.combine == "gate":
            logits = layer.router.weight.to(torch.float64) @ x_t.to(torch.float64)
            g = torch.exp(logits - logits.max())
            g = g / g.sum()
            gated_total = sum(p[e] * g[e] for e in range(p.shape[0]) if p[e].item() > 0.0)
        acc = torch.zeros(d_model, dtype=torch.float64)
        for e in range(p.shape[0]):
            if p[e].item() > 0.0:
                if layer.combine == "gate":
                    w = p[e] * g[e] / gated_total
                else:
                    w = p[e] / k if layer.combine == "normalized" else p[e]
                acc = acc + w * reference_expert(layer.experts, e, x_t)
        rows.append(acc)
    if not rows:
        return x.new_zeros(x.shape, dtype=torch.float64)
    return torch.stack(rows).reshape(*x.shape[:-1], d_model)


def reference_topk_routing(moe, x_t: torch.Tensor) -> Tuple[torch.Tensor, list]:
    """TopKMoE routing of one token: (softmax probabilities [E] float64, [(expert, weight), ...] in
    decreasing probability order). Top-k by a plain sort of the probabilities (ties: lower index
    first, as torch.topk on distinct values); weights renormalised to sum 1 when moe.normalize."""
    logits = moe.router.weight.to(torch.float64) @ x_t.to(torch.float64)
    probs = torch.exp(logits - logits.max())
    probs = probs / probs.sum()
    order = sorted(range(probs.shape[0]), key=lambda e: (-probs[e].item(), e))[: moe.top_k]
    chosen = [probs[e] for e in order]
    if moe.normalize:
        total = sum(chosen)
        chosen = [w / total for w in chosen]
    return probs, list(zip(order, chosen))


def reference_topk_moe(moe, x: torch.Tensor) -> torch.Tensor:
    """TopKMoE(x) token by token (float64 result, shape of x): y_t = sum over the token's top_k
    experts of w_e * Expert_e(x_t)."""
    d_model = moe.router.weight.shape[1]
    tokens = x.reshape(-1, d_model)
    rows = []
    for t in range(tokens.shape[0]):
        _, routed = reference_topk_routing(moe, tokens[t])
        acc = torch.zeros(d_model, dtype=torch.float64)
        for e, w in sorted(routed):  # expert order, like the layer's combine
            acc = acc + w * reference_expert(moe.experts, e, tokens[t])
        rows.append(acc)
    return torch.stack(rows).reshape(*x.shape[:-1], d_model)


def reference_topk_losses(moe, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(load-balancing loss, router z-loss) of TopKMoE by the Switch formulas, with loops:
    lb = E * sum_e f_e * P_e, f_e = (#tokens routed to e) / (T * top_k), P_e = mean_t probs[t, e];
    z = mean_t (log sum_e exp(logits[t, e]))^2."""
    d_model = moe.router.weight.shape[1]
    tokens = x.reshape(-1, d_model)
    T, E = tokens.shape[0], moe.router.weight.shape[0]
    counts = [0] * E
    prob_sum = [0.0] * E
    z = 0.0
    for t in range(T):
        probs, routed = reference_topk_routing(moe, tokens[t])
        for e, _ in routed:
            counts[e] += 1
        for e in range(E):
            prob_sum[e] += probs[e].item()
        logits = (moe.router.weight.to(torch.float64) @ tokens[t].to(torch.float64)).tolist()
        m = max(logits)
        z += (m + math.log(sum(math.exp(v - m) for v in logits))) ** 2
    lb = E * sum((counts[e] / (T * moe.top_k)) * (prob_sum[e] / T) for e in range(E))
    return torch.tensor(lb, dtype=torch.float64), torch.tensor(z / T, dtype=torch.float64)
