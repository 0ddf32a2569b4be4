"""Truncated dispatch ops: dispatch_plan, gather_rows, combine_rows (and their backward ops).

Values against the naive loops of tests/reference.py, opcheck of every op, float64 gradcheck,
torch.compile(fullgraph=True), determinism, edge cases, argument errors, CUDA parity (marked).
"""
import pytest
import torch

import softmoe
from softmoe import ops

from reference import reference_dispatch_plan, reference_moe

OPS = torch.ops.softmoe


def random_p(T, E, M, dtype=torch.float64, density=0.4, seed=0):
    """Routing weights with exact zeros, some empty rows and some rows with more than M actives."""
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(T, E, generator=g, dtype=torch.float64) + 0.05
    p = p * (torch.rand(T, E, generator=g, dtype=torch.float64) < density)
    if T > 2:
        p[::5] = 0.0  # empty rows
        p[1::7] = 0.5  # every expert active: truncated to the first M
    return p.to(dtype)


def assert_plan_equal(a, b):
    for name, x, y in zip(ops.DispatchPlan._fields, a, b):
        assert torch.equal(x.cpu(), y.cpu()), name


# ---- plan ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,E,M", [(1, 1, 1), (13, 4, 2), (40, 8, 3), (33, 6, 6), (300, 16, 4)])
def test_plan_matches_reference(dtype, T, E, M):
    p = random_p(T, E, M, dtype, seed=T * E + M)
    got = ops.dispatch_plan(p, M)
    assert all(t.dtype == torch.int64 for t in got)
    assert got.offsets.shape == (E + 1,) and got.pair_token.shape == (T * M,)
    assert got.pair_expert.shape == (T * M,) and got.token_pairs.shape == (T, M)
    assert_plan_equal(got, reference_dispatch_plan(p, M))


def test_plan_hand_made():
    nan = float("nan")
    p = torch.tensor(
        [[0, 0.5, 0, 0.25], [0, 0, 0, 0], [0.1, 0.2, 0.3, 0.4], [-0.0, 0, nan, 0], [0, 0, 0, 1e-300]],
        dtype=torch.float64,
    )
    plan = ops.dispatch_plan(p, 2)
    assert plan.offsets.tolist() == [0, 1, 3, 4, 6]
    assert plan.pair_token.tolist() == [2, 0, 2, 3, 0, 4, -1, -1, -1, -1]
    assert plan.pair_expert.tolist() == [0, 1, 1, 2, 3, 3, -1, -1, -1, -1]
    assert plan.token_pairs.tolist() == [[1, 4], [-1, -1], [0, 2], [3, -1], [5, -1]]
    assert plan.tokens_per_expert().tolist() == [1, 2, 1, 2]


def test_plan_of_soft_topk_routes_every_nonzero():
    scores = torch.randn(500, 32, generator=torch.Generator().manual_seed(1)) * 3
    p = softmoe.soft_topk(scores, 2.0, 1.0, eps=1e-2, max_active=6)
    plan = ops.dispatch_plan(p, 6)
    n = int((p != 0).sum())
    assert int(plan.offsets[-1]) == n
    assert torch.equal(plan.tokens_per_expert(), (p != 0).sum(0))
    assert_plan_equal(plan, reference_dispatch_plan(p, 6))


def test_plan_edges():
    z = torch.zeros(7, 5)
    plan = ops.dispatch_plan(z, 3)
    assert plan.offsets.tolist() == [0] * 6
    assert (plan.pair_token == -1).all() and (plan.token_pairs == -1).all()
    one = ops.dispatch_plan(torch.ones(4, 1), 1)
    assert one.offsets.tolist() == [0, 4] and one.token_pairs.flatten().tolist() == [0, 1, 2, 3]
    lead = ops.dispatch_plan(random_p(12, 5, 2).reshape(3, 4, 5), 2)  # leading dims flatten
    assert_plan_equal(lead, ops.dispatch_plan(random_p(12, 5, 2), 2))


# ---- values: gather, an expert per segment, combine --------------------------------------------


def run_experts(xs, plan, weights):
    """Expert e (a d -> h matrix) on its segment of xs; padding rows stay zero."""
    ys = xs.new_zeros((xs.shape[0], weights.shape[-1]))
    bounds = plan.offsets.tolist()
    for e in range(weights.shape[0]):
        a, b = bounds[e], bounds[e + 1]
        if b > a:
            ys = ys.index_copy(0, torch.arange(a, b), xs[a:b] @ weights[e])
    return ys


@pytest.mark.parametrize("T,E,M,d,h", [(17, 5, 2, 6, 4), (40, 8, 3, 16, 8), (9, 1, 1, 3, 5)])
def test_values_and_grads_against_naive_loop(T, E, M, d, h):
    g = torch.Generator().manual_seed(T + d)
    x = torch.randn(T, d, generator=g, dtype=torch.float64, requires_grad=True)
    p = random_p(T, E, M, seed=T).requires_grad_(True)
    w = torch.randn(E, d, h, generator=g, dtype=torch.float64, requires_grad=True)
    plan = ops.dispatch_plan(p.detach(), M)
    xs = ops.gather_rows(x, plan)
    assert xs.shape == (T * M, d)
    n = int(plan.offsets[-1])
    assert torch.equal(xs[:n], x.detach()[plan.pair_token[:n]]) and (xs[n:] == 0).all()
    y = ops.combine_rows(run_experts(xs, plan, w), p, plan)
    want = reference_moe(x, p, M, lambda e, v: v @ w[e])
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    gy = torch.randn(T, h, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad(y, (x, p, w), gy)
    want_grads = torch.autograd.grad(want, (x, p, w), gy)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_values(dtype):
    T, E, M, d = 60, 8, 3, 33
    g = torch.Generator().manual_seed(3)
    x = torch.randn(T, d, generator=g).to(dtype)
    p = random_p(T, E, M, torch.float32, seed=4)
    plan = ops.dispatch_plan(p, M)
    xs = ops.gather_rows(x, plan)
    y = ops.combine_rows(xs, p, plan)  # identity experts: y[t] = (sum of its kept p) * x[t]
    want = reference_moe(x.double(), p.double(), M, lambda e, v: v)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)


def test_mixed_dtypes_and_noncontiguous():
    T, E, M, d = 30, 6, 2, 8
    p = random_p(T, E, M, torch.float32, seed=5)
    plan = ops.dispatch_plan(p.t().contiguous().t(), M)
    assert_plan_equal(plan, ops.dispatch_plan(p, M))
    ys = torch.randn(d, T * M).t()  # non-contiguous
    y = ops.combine_rows(ys.to(torch.bfloat16), p, plan)
    y_ref = ops.combine_rows(ys.contiguous().to(torch.bfloat16), p, plan)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    y64 = ops.combine_rows(ys, p.double(), plan)  # f64 p: double math, f32 output
    assert y64.dtype == torch.float32
    want = torch.zeros(T, d, dtype=torch.float64)
    for s, (t, e) in enumerate(zip(plan.pair_token.tolist(), plan.pair_expert.tolist())):
        if t >= 0:
            want[t] += p.double()[t, e] * ys.double()[s]
    torch.testing.assert_close(y64.double(), want, rtol=1e-6, atol=1e-6)


def test_combine_reads_only_the_plan_pairs():
    """combine uses p only at the plan's pairs: p / k (normalised combining) shares the plan."""
    T, E, M, d = 20, 5, 2, 4
    p = random_p(T, E, M, seed=6)
    plan = ops.dispatch_plan(p, M)
    ys = torch.randn(T * M, d, dtype=torch.float64)
    y1 = ops.combine_rows(ys, p / 2.0, plan)
    noisy = p / 2.0 + (p == 0) * 123.0  # values off the plan are ignored
    torch.testing.assert_close(ops.combine_rows(ys, noisy, plan), y1, rtol=0, atol=0)


# ---- opcheck and gradcheck ------------------------------------------------------------------------


def op_samples():
    out = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        for rg in (False, True):
            T, E, M, d = 11, 5, 2, 3
            p = random_p(T, E, M, dtype, seed=7)
            plan = OPS.dispatch_plan(p, M)
            offsets, pair_token, pair_expert, token_pairs = plan
            x = torch.randn(T, d, dtype=dtype)
            ys = torch.randn(T * M, d, dtype=dtype)
            gy = torch.randn(T, d, dtype=dtype)
            out.append((OPS.dispatch_plan, (p.clone().requires_grad_(rg), M)))
            out.append((OPS.gather_rows, (x.clone().requires_grad_(rg), pair_token, token_pairs)))
            out.append((OPS.gather_rows_backward, (ys, token_pairs)))
            out.append(
                (
                    OPS.combine_rows,
                    (ys.clone().requires_grad_(rg), p.clone().requires_grad_(rg), pair_token, pair_expert, token_pairs),
                )
            )
            out.append((OPS.combine_rows_backward, (gy, ys, p, pair_token, pair_expert, token_pairs)))
            # the trimmed plan (routed prefix of the slots, DispatchPlan.trim)
            n = int(offsets[-1])
            ys_n = ys[:n].clone()
            out.append((OPS.gather_rows, (x.clone().requires_grad_(rg), pair_token[:n], token_pairs)))
            out.append((OPS.gather_rows_backward, (ys_n, token_pairs)))
            out.append(
                (
                    OPS.combine_rows,
                    (ys_n.requires_grad_(rg), p.clone().requires_grad_(rg), pair_token[:n], pair_expert[:n], token_pairs),
                )
            )
            out.append((OPS.combine_rows_backward, (gy, ys[:n].clone(), p, pair_token[:n], pair_expert[:n], token_pairs)))
    return out


@pytest.mark.parametrize("op,args", op_samples(), ids=lambda v: getattr(v, "__name__", None) or "")
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_gradcheck_float64():
    T, E, M, d = 9, 4, 2, 3
    p = random_p(T, E, M, seed=8)
    plan = ops.dispatch_plan(p, M)
    x = torch.randn(T, d, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(T * M, d, dtype=torch.float64, requires_grad=True)
    pg = p.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: ops.gather_rows(v, plan), (x,))
    assert torch.autograd.gradcheck(lambda a, b: ops.combine_rows(a, b, plan), (ys, pg))
    # grad_p is zero off the plan (including rows truncated to M)
    (gp,) = torch.autograd.grad(ops.combine_rows(ys, pg, plan).sum(), (pg,))
    routed = torch.zeros(T, E, dtype=torch.bool)
    n = int(plan.offsets[-1])
    routed[plan.pair_token[:n], plan.pair_expert[:n]] = True
    assert (gp[~routed] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_trimmed_plan_is_bit_identical(dtype):
    T, E, M, d = 40, 6, 3, 5
    p = random_p(T, E, M, dtype, seed=12)
    plan = ops.dispatch_plan(p, M)
    trimmed = plan.trim()
    n = int(plan.offsets[-1])
    assert 0 < n < T * M
    assert trimmed.pair_token.shape == (n,) and trimmed.pair_expert.shape == (n,)
    assert torch.equal(trimmed.offsets, plan.offsets) and torch.equal(trimmed.token_pairs, plan.token_pairs)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(T, d, generator=g).to(dtype)
    w = torch.randn(d, generator=g).to(dtype)
    gy = torch.randn(T, d, generator=g).to(dtype)

    def run(pl):
        xg, pg = x.clone().requires_grad_(True), p.clone().requires_grad_(True)
        xs = ops.gather_rows(xg, pl)
        y = ops.combine_rows(torch.tanh(xs) * w, pg, pl)
        return (xs, y, *torch.autograd.grad(y, (xg, pg), gy))

    full, short = run(plan), run(trimmed)
    assert short[0].shape == (n, d)
    assert torch.equal(short[0], full[0][:n])
    for a, b in zip(full[1:], short[1:]):
        assert torch.equal(a, b)
    if dtype == torch.float64:
        ys = torch.randn(n, d, dtype=dtype, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: ops.combine_rows(a, b, trimmed), (ys, p.clone().requires_grad_(True)))
        assert torch.autograd.gradcheck(lambda v: ops.gather_rows(v, trimmed), (x.clone().requires_grad_(True),))


def test_trim_of_an_empty_plan():
    plan = ops.dispatch_plan(torch.zeros(0, 4), 2).trim()
    assert plan.pair_token.shape == (0,)
    assert ops.gather_rows(torch.zeros(0, 3), plan).shape == (0, 3)
    none_routed = ops.dispatch_plan(torch.zeros(5, 4), 2).trim()
    assert none_routed.pair_token.shape == (0,)
    y = ops.combine_rows(ops.gather_rows(torch.randn(5, 3), none_routed), torch.zeros(5, 4), none_routed)
    assert torch.equal(y, torch.zeros(5, 3))


# ---- torch.compile --------------------------------------------------------------------------------


def pipeline(x, p, w, M):
    plan = ops.dispatch_plan(p.detach(), M)
    xs = ops.gather_rows(x, plan)
    ys = torch.tanh(xs) * w
    return ops.combine_rows(ys, p, plan)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    T, E, M, d = 24, 6, 3, 5
    g = torch.Generator().manual_seed(9)
    x = torch.randn(T, d, generator=g, requires_grad=True)
    p = random_p(T, E, M, torch.float32, seed=9).requires_grad_(True)
    w = torch.randn(d, generator=g, requires_grad=True)
    compiled = torch.compile(pipeline, fullgraph=True, backend=backend, dynamic=True)
    y = compiled(x, p, w, M)
    want = pipeline(x, p, w, M)
    torch.testing.assert_close(y, want)
    got_g = torch.autograd.grad(y.square().sum(), (x, p, w))
    want_g = torch.autograd.grad(want.square().sum(), (x, p, w))
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b)
    # another T reuses the dynamic graph
    x2 = torch.randn(2 * T + 1, d, requires_grad=True)
    p2 = random_p(2 * T + 1, E, M, torch.float32, seed=10)
    torch.testing.assert_close(compiled(x2, p2, w, M), pipeline(x2, p2, w, M))


# ---- determinism, empty input, errors -------------------------------------------------------------


def fwd_bwd(x, p, M):
    x = x.detach().requires_grad_(True)
    p = p.detach().requires_grad_(True)
    plan = ops.dispatch_plan(p.detach(), M)
    y = ops.combine_rows(torch.sin(ops.gather_rows(x, plan)), p, plan)
    gx, gp = torch.autograd.grad(y, (x, p), torch.cos(y.detach() * 3))
    return (*plan, y, gx, gp)


def test_deterministic_runs_and_threads():
    T, E, M, d = 3000, 16, 4, 64
    g = torch.Generator().manual_seed(11)
    x = torch.randn(T, d, generator=g)
    p = softmoe.soft_topk(torch.randn(T, E, generator=g) * 3, 2.0, 1.0, eps=1e-2, max_active=M)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        a = fwd_bwd(x, p, M)
        b = fwd_bwd(x, p, M)
        torch.set_num_threads(1)
        c = fwd_bwd(x, p, M)
    finally:
        torch.set_num_threads(threads)
    for u, v, w in zip(a, b, c):
        assert torch.equal(u, v) and torch.equal(u, w)


def test_empty_tokens():
    p = torch.zeros(0, 4, requires_grad=True)
    plan = ops.dispatch_plan(p.detach(), 2)
    assert plan.offsets.tolist() == [0] * 5 and plan.pair_token.shape == (0,) and plan.token_pairs.shape == (0, 2)
    x = torch.zeros(0, 3, requires_grad=True)
    xs = ops.gather_rows(x, plan)
    assert xs.shape == (0, 3)
    y = ops.combine_rows(xs * 2, p, plan)
    assert y.shape == (0, 3)
    gx, gp = torch.autograd.grad(y.sum(), (x, p))
    assert gx.shape == (0, 3) and gp.shape == (0, 4)


def test_bad_arguments():
    p = random_p(6, 4, 2, torch.float32)
    plan = ops.dispatch_plan(p, 2)
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match="max_active must satisfy"):
        ops.dispatch_plan(p, 5)
    with pytest.raises(ValueError, match="max_active must satisfy"):
        ops.dispatch_plan(p, 0)
    with pytest.raises(TypeError, match="max_active must be an int"):
        ops.dispatch_plan(p, 2.0)
    with pytest.raises(TypeError, match="p must be float32"):
        ops.dispatch_plan(p.long(), 2)
    with pytest.raises(TypeError, match="plan must be the DispatchPlan"):
        ops.gather_rows(x, tuple(plan))
    with pytest.raises(ValueError, match="x must hold the plan's 6 tokens"):
        ops.gather_rows(torch.randn(5, 3), plan)
    with pytest.raises(ValueError, match="ys must be 2-D"):
        ops.combine_rows(torch.randn(12), p, plan)
    # the raw ops check their arguments too, naming the argument and the rule
    with pytest.raises(RuntimeError, match="max_active must satisfy 1 <= max_active <= 4"):
        OPS.dispatch_plan(p, 5)
    with pytest.raises(RuntimeError, match="p must be 2-D"):
        OPS.dispatch_plan(p.reshape(2, 3, 4), 2)
    with pytest.raises(TypeError, match="pair_token must be an int64 tensor"):
        OPS.gather_rows(x, plan.pair_token.int(), plan.token_pairs)
    with pytest.raises(RuntimeError, match="token_pairs must have one row per token"):
        OPS.gather_rows(torch.randn(5, 3), plan.pair_token, plan.token_pairs)
    with pytest.raises(RuntimeError, match="pair_token must have at most tokens \\* max_active = 12 entries"):
        OPS.gather_rows(x, torch.cat([plan.pair_token, plan.pair_token[:1]]), plan.token_pairs)
    with pytest.raises(RuntimeError, match="ys must have one row per slot of pair_token \\(12\\)"):
        OPS.combine_rows(torch.randn(11, 3), p, plan.pair_token, plan.pair_expert, plan.token_pairs)
    with pytest.raises(RuntimeError, match="pair_expert must have as many slots as pair_token"):
        OPS.combine_rows(torch.randn(12, 3), p, plan.pair_token, plan.pair_expert[:-1], plan.token_pairs)
    # a prefix shorter than the routed pairs leaves token_pairs pointing past the slots
    routed = int(plan.offsets[-1])
    with pytest.raises(RuntimeError, match="index out of range"):
        OPS.combine_rows(torch.randn(routed - 1, 3), p, plan.pair_token[: routed - 1],
                         plan.pair_expert[: routed - 1], plan.token_pairs)
    with pytest.raises(RuntimeError, match="index out of range"):
        OPS.gather_rows_backward(torch.randn(routed - 1, 3), plan.token_pairs)
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        OPS.combine_rows_backward(torch.randn(6, 2), torch.randn(12, 3), p, *plan[1:])
    with pytest.raises(RuntimeError, match="token_pairs must have max_active <= 4"):
        OPS.combine_rows(torch.randn(30, 3), p, torch.full((30,), -1), torch.full((30,), -1), torch.full((6, 5), -1))
    with pytest.raises(RuntimeError, match="p must be on the device of ys|p must be 2-D"):
        OPS.combine_rows(torch.randn(12, 3), p[0], plan.pair_token, plan.pair_expert, plan.token_pairs)
    bad = plan.token_pairs.clone()
    bad[0, 0] = 99
    with pytest.raises(RuntimeError, match="index out of range"):
        OPS.combine_rows(torch.randn(12, 3), p, plan.pair_token, plan.pair_expert, bad)
    bad_tok = plan.pair_token.clone()
    bad_tok[0] = 6
    with pytest.raises(RuntimeError, match="index out of range"):
        OPS.gather_rows(x, bad_tok, plan.token_pairs)


def test_index_error_names_the_c_status():
    """An index the C core rejects is reported with the core's own status text (smoe_status_string)."""
    plan = ops.dispatch_plan(random_p(6, 4, 2, torch.float32), 2)
    bad = plan.pair_token.clone()
    bad[0] = 6
    with pytest.raises(RuntimeError, match=r"pair_token hold an index out of range; .*\(invalid argument: "):
        OPS.gather_rows(torch.randn(6, 3), bad, plan.token_pairs)


# ---- CUDA parity ----------------------------------------------------------------------------------

# (tests/conftest.py skips the tests marked cuda when no CUDA device is present.)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("T,E,M,d", [(1, 1, 1, 1), (37, 8, 3, 33), (5000, 64, 8, 96), (700, 300, 5, 40)])
def test_cuda_parity(dtype, T, E, M, d):
    g = torch.Generator().manual_seed(T + E)
    p = random_p(T, E, M, dtype, seed=T)
    x = torch.randn(T, d, generator=g).to(dtype)
    gy = torch.randn(T, d, generator=g).to(dtype)
    cpu = fwd_bwd_full(x, p, gy, M)
    dev = fwd_bwd_full(x.cuda(), p.cuda(), gy.cuda(), M)
    names = ["offsets", "pair_token", "pair_expert", "token_pairs", "xs", "y", "grad_x", "grad_ys", "grad_p"]
    for name, a, b in zip(names, cpu, dev):
        b = b.cpu()
        if name in ("offsets", "pair_token", "pair_expert", "token_pairs", "xs", "grad_ys"):
            assert torch.equal(a, b), name  # integer plan, bit copies, one multiply: exact
        else:
            tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
            torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol, msg=name)


def fwd_bwd_full(x, p, gy, M):
    plan = OPS.dispatch_plan(p, M)
    _, pair_token, pair_expert, token_pairs = plan
    xs = OPS.gather_rows(x, pair_token, token_pairs)
    ys = xs * 0.5 + 1.0
    ys = torch.where((pair_token >= 0)[:, None], ys, torch.zeros_like(ys))
    y = OPS.combine_rows(ys, p, pair_token, pair_expert, token_pairs)
    grad_x = OPS.gather_rows_backward(ys, token_pairs)
    grad_ys, grad_p = OPS.combine_rows_backward(gy, ys, p, pair_token, pair_expert, token_pairs)
    return (*plan, xs, y, grad_x, grad_ys, grad_p)


@pytest.mark.cuda
def test_cuda_deterministic_and_compiled():
    T, E, M, d = 4096, 64, 8, 128
    x = torch.randn(T, d, device="cuda")
    p = softmoe.soft_topk(torch.randn(T, E, device="cuda") * 3, 2.0, 1.0, eps=1e-2, max_active=M)
    a = fwd_bwd(x, p, M)
    b = fwd_bwd(x, p, M)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    w = torch.ones(d, device="cuda", requires_grad=True)
    compiled = torch.compile(pipeline, fullgraph=True)
    torch.testing.assert_close(compiled(x, p, w, M), pipeline(x, p, w, M))
