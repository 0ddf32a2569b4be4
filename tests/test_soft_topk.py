"""softmoe.soft_topk / torch.ops.softmoe.soft_topk against the float64 reference oracle
(tests/reference.py), the test vectors of ../shared/research/lapsum.md section 7, and the
invariants and edge cases of the API contract."""
import math

import pytest
import torch

import softmoe
from conftest import DEVICES, random_scores
from reference import candidate_mask, reference_nd, reference_soft_topk

F64 = torch.float64
soft_topk = softmoe.soft_topk


def op(scores, k, alpha, eps=0.0, max_active=None):
    """The raw op: (p, threshold); k/alpha may be python numbers (sent as float64 scalars)."""
    n = scores.shape[-1]
    k = k if isinstance(k, torch.Tensor) else torch.tensor(float(k), dtype=F64)
    alpha = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(float(alpha), dtype=F64)
    return torch.ops.softmoe.soft_topk(scores, k, alpha, eps, n if max_active is None else max_active)


def t64(x):
    return torch.tensor(x, dtype=F64)


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def c_of(eps):
    return -math.log(2.0 * eps)


# ------------------------------------------------------------------------------------------------
# Values and gradients against the reference oracle
# ------------------------------------------------------------------------------------------------

def _random_params(rows, m, mode, dtype=F64):
    """k and alpha as python floats, scalar tensors or per-row tensors (k in (0, m))."""
    k_rows = 0.02 + torch.rand(rows, dtype=F64) * (m - 0.04)
    a_rows = 0.3 + torch.rand(rows, dtype=F64) * 1.2
    if mode == "float":
        return float(k_rows[0]), float(a_rows[0])
    if mode == "scalar_tensor":
        return k_rows[0].to(dtype), a_rows[0].to(dtype)
    if mode == "per_row_k":  # per-row k tensor, python alpha
        return k_rows.to(dtype), float(a_rows[0])
    if mode == "per_row_alpha":  # python k, per-row alpha tensor
        return float(k_rows[0]), a_rows.to(dtype)
    return k_rows.to(dtype), a_rows.to(dtype)


@pytest.mark.parametrize("cap", [None, "half"])
@pytest.mark.parametrize("mode", ["float", "scalar_tensor", "per_row", "per_row_k", "per_row_alpha"])
@pytest.mark.parametrize("eps", [0.0, 1e-2, 0.2])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 64, 256])
def test_matches_reference(n, eps, mode, cap):
    rows = 7
    m = None if cap is None else max(1, n // 2)
    m_eff = n if m is None else m
    scores = random_scores(rows, n, spread=1.5)
    k, alpha = _random_params(rows, m_eff, mode)

    expected, expected_b = reference_soft_topk(scores, k, alpha, eps=eps, max_active=m, return_threshold=True)
    p = soft_topk(scores, k, alpha, eps=eps, max_active=m)
    assert p.dtype == F64 and p.shape == scores.shape
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-12)
    k_rows = torch.as_tensor(k, dtype=F64).expand(rows)
    torch.testing.assert_close(p.sum(-1), k_rows, rtol=0, atol=1e-12)
    assert bool(((p >= 0) & (p <= 1)).all())

    _, b = op(scores, k, alpha, eps, m)
    assert b.dtype == F64 and b.shape == (rows,)
    torch.testing.assert_close(b, expected_b, rtol=1e-12, atol=1e-11)

    # VJP for a random upstream gradient, through autograd of both sides.
    g = torch.randn(rows, n, dtype=F64)
    tensor_k, tensor_a = isinstance(k, torch.Tensor), isinstance(alpha, torch.Tensor)
    r1, r2 = leaf(scores), leaf(scores)
    k1, k2 = (leaf(k), leaf(k)) if tensor_k else (k, k)
    a1, a2 = (leaf(alpha), leaf(alpha)) if tensor_a else (alpha, alpha)
    (soft_topk(r1, k1, a1, eps=eps, max_active=m) * g).sum().backward()
    (reference_soft_topk(r2, k2, a2, eps=eps, max_active=m) * g).sum().backward()
    torch.testing.assert_close(r1.grad, r2.grad, rtol=1e-9, atol=1e-10)
    if tensor_k:
        assert k1.grad.shape == k.shape
        torch.testing.assert_close(k1.grad, k2.grad, rtol=1e-9, atol=1e-10)
    if tensor_a:
        assert a1.grad.shape == alpha.shape
        torch.testing.assert_close(a1.grad, a2.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference_on_device(device):
    """The same check on every device (CUDA when present), float64 and float32."""
    scores = random_scores(33, 64, spread=2.0)
    k = 0.5 + torch.rand(33, dtype=F64) * 10
    alpha = 0.2 + torch.rand(33, dtype=F64)
    expected = reference_soft_topk(scores, k, alpha, eps=1e-2, max_active=16)
    for dtype, atol in ((F64, 1e-12), (torch.float32, 2e-6)):
        s, kd, ad = scores.to(dtype), k.to(dtype), alpha.to(dtype)
        ref = expected if dtype == F64 else reference_soft_topk(
            s.double(), kd.double(), ad.double(), eps=1e-2, max_active=16)
        p = soft_topk(s.to(device), kd.to(device), ad.to(device), eps=1e-2, max_active=16)
        assert p.device.type == device
        torch.testing.assert_close(p.cpu().double(), ref, rtol=0, atol=atol)


# ------------------------------------------------------------------------------------------------
# Test vectors (lapsum.md section 7): float64 values from 60-digit mpmath, 12 significant digits
# ------------------------------------------------------------------------------------------------

TV9_R = [0.12, -0.53, 1.07, 0.88, -1.4, 0.35, 0.0, -0.2]
TEST_VECTORS = {
    "TV1": ([0, 1, 2, 3], 2, 1, 1.5, [0.111565080074, 0.303265329856, 0.696734670144, 0.888434919926]),
    "TV2": ([0.3, -1.2, 2.0, 0.7, -0.1], 2.5, 0.5, 0.304149880540622,
            [0.495867293422, 0.024687778839, 0.983174293605, 0.773463096842, 0.222807537293]),
    "TV3": ([1, 1, 1, 0.2, 0.2], 2, 0.5, 0.906246641050599, [0.585488225567] * 3 + [0.121767661649] * 2),
    "TV4": ([0] * 6, 2, 1, 0.405465108108164, [1 / 3] * 6),
    "TV5": ([5], 0.3, 1, 5.51082562376599, [0.3]),
    "TV6": ([3, 1, 0.5, -2], 1, 0.01, 2, [1, 1.86003798801e-44, 3.58754798658e-66, 9.57584798357e-175]),
    "TV7": ([3, 1, 0.5, -2], 1.5, 0.01, 1, [1, 0.5, 9.64374923982e-23, 2.57410011121e-131]),
    "TV8": ([50, 49.9, 10, -20], 1.5, 0.01, 49.899999546011, [0.999977301066, 0.500022698934, 0, 0]),
    "TV9": (TV9_R, 2, 0.1, 0.614348801920904,
            [0.00356484323381, 5.35952503453e-06, 0.994750692739, 0.964903685757, 8.92820824385e-10,
             0.0355563968368, 0.0010737101484, 0.000145310867047]),
    "TV10": (TV9_R, 7.9, 0.3, -1.90943792475531,
             [0.999423156906, 0.994964656821, 0.999975689615, 0.999954202158, 0.908486941077,
              0.999732022337, 0.999139451226, 0.998323879859]),
    "TV11": (TV9_R, 0.05, 0.3, 1.92199160752406,
             [0.00123117550322, 0.000141042042401, 0.0292136502203, 0.0155071737589, 7.76058733624e-06,
              0.0026502025561, 0.000825281619997, 0.000423713711729]),
    "TV12": ([1000.3, 1000.1, 999.8, 1000.0], 2, 0.1, 1000.05,
             [0.958957500688, 0.696734670144, 0.0410424993119, 0.303265329856]),
    "TV13": ([3, 1, 1, -2], 1.5, 0.001, None, [1, 0.25, 0.25, 0]),
}


@pytest.mark.parametrize("name", sorted(TEST_VECTORS))
def test_vector(name):
    r, k, alpha, b, expected = TEST_VECTORS[name]
    scores = t64([r])
    p = soft_topk(scores, k, alpha)
    # Relative accuracy even for the tiny tail values (1e-44 .. 1e-175); exact zeros where they underflow.
    torch.testing.assert_close(p[0], t64(expected), rtol=1e-9, atol=1e-300)
    torch.testing.assert_close(p.sum(), t64(float(k)), rtol=0, atol=1e-13)
    p_op, b_op = op(scores, k, alpha)
    torch.testing.assert_close(p_op, p, rtol=0, atol=0)
    if b is not None:
        torch.testing.assert_close(b_op[0], t64(b), rtol=1e-11, atol=1e-12)
    # The oracle agrees with the published vector too.
    torch.testing.assert_close(reference_soft_topk(scores, k, alpha)[0], t64(expected), rtol=1e-9, atol=1e-300)


def test_vector_tv2_vjp():
    scores = leaf(t64([[0.3, -1.2, 2.0, 0.7, -0.1]]))
    k, alpha = leaf(t64(2.5)), leaf(t64(0.5))
    p = soft_topk(scores, k, alpha)
    p.backward(t64([[1, -0.5, 0.25, 2, 0]]))
    torch.testing.assert_close(
        scores.grad[0], t64([0.0461547150694, -0.0717654285623, -0.0236724436282, 0.474159581396, -0.424876424274]),
        rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(k.grad, t64(0.953460617708), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(alpha.grad, t64(-0.854038781887), rtol=1e-9, atol=1e-12)
    # The oracle's autograd reproduces the published VJP too.
    r2, k2, a2 = leaf(scores.detach()), leaf(t64(2.5)), leaf(t64(0.5))
    reference_soft_topk(r2, k2, a2).backward(t64([[1, -0.5, 0.25, 2, 0]]))
    torch.testing.assert_close(r2.grad, scores.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(k2.grad, k.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a2.grad, alpha.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("eps, max_active", [(0.0, None), (0.05, None), (0.05, 3)])
def test_reference_oracle_gradcheck(eps, max_active):
    """The oracle's implicit-function gradients agree with its own finite differences."""
    scores = random_scores(2, 5).requires_grad_(True)
    k = t64([1.3, 2.2]).requires_grad_(True)
    alpha = t64(0.7).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, kk, aa: reference_soft_topk(s, kk, aa, eps, max_active),
                                    (scores, k, alpha), eps=1e-6, atol=1e-7, rtol=1e-5)


TRUNCATED_VECTORS = {
    1: (0.446006801542682, [0, 0, 0.99880524258, 0.992011978007, 0, 0.00918277941244, 0, 0],
        [0, 0, 0.0212044718303, 0.0379265744572, 0, -0.0591310462875, 0, 0], -0.274793065066, -0.353683041802),
    3: (0.575732713240472, [0, 0, 0.996341168445, 0.975537438444, 0, 0.0281213931107, 0, 0],
        [0, 0, 0.0574393344298, 0.0660200266035, 0, -0.123459361033, 0, 0], -0.0698819028094, -0.763469348893),
}


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("c", sorted(TRUNCATED_VECTORS))
def test_truncated_vector(c, per_row):
    b, p_exp, gr_exp, gk_exp, ga_exp = TRUNCATED_VECTORS[c]
    eps = 0.5 * math.exp(-c)
    scores = leaf(t64([TV9_R]))
    k = leaf(t64([2.0]) if per_row else t64(2.0))
    alpha = leaf(t64([0.1]) if per_row else t64(0.1))
    p = soft_topk(scores, k, alpha, eps=eps)
    torch.testing.assert_close(p[0], t64(p_exp), rtol=1e-9, atol=0)  # the zeros are exact
    _, b_op = op(scores.detach(), k.detach(), alpha.detach(), eps)
    torch.testing.assert_close(b_op[0], t64(b), rtol=1e-11, atol=1e-12)
    p.backward(t64([[0.5, -1, 1.5, 0.2, 0, -0.3, 0.8, 0.1]]))
    torch.testing.assert_close(scores.grad[0], t64(gr_exp), rtol=1e-9, atol=0)
    torch.testing.assert_close(k.grad.reshape(()), t64(gk_exp), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(alpha.grad.reshape(()), t64(ga_exp), rtol=1e-9, atol=1e-12)
    assert k.grad.shape == k.shape and alpha.grad.shape == alpha.shape


# ------------------------------------------------------------------------------------------------
# Reduced precision
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 1e-2])
@pytest.mark.parametrize("alpha", [0.1, 1.0])
@pytest.mark.parametrize("offset", [0.0, 20.0])
@pytest.mark.parametrize("per_row", [False, True])
def test_float32_close_to_float64(eps, alpha, offset, per_row):
    rows, n = 64, 256
    s32 = (random_scores(rows, n, spread=2.0) + offset).float()
    s64 = s32.double()  # the same (rounded) inputs
    if per_row:
        k = 0.5 + torch.rand(rows, dtype=F64) * 20
        a = torch.full((rows,), alpha, dtype=F64)
        k32, a32 = k.float(), a.float()
        k64, a64 = k32.double(), a32.double()
    else:
        k32 = k64 = 8.0
        a32 = a64 = alpha
    p32 = soft_topk(s32, k32, a32, eps=eps)
    p64 = soft_topk(s64, k64, a64, eps=eps)
    assert p32.dtype == torch.float32
    torch.testing.assert_close(p32.double(), p64, rtol=0, atol=1e-6)
    k_rows = torch.as_tensor(k64, dtype=F64).expand(rows)
    assert float((p32.double().sum(-1) - k_rows).abs().max()) <= 1e-5
    if eps > 0:  # the exact zeros are the same set up to entries sitting on the cut
        assert float(((p32 == 0) != (p64 == 0)).float().mean()) < 1e-3


@pytest.mark.parametrize("eps", [0.0, 0.02])
@pytest.mark.parametrize("n", [8, 256])
def test_float32_gradients_close_to_float64(n, eps):
    rows = 16
    s32 = random_scores(rows, n, spread=2.0).float()
    k32 = (0.5 + torch.rand(rows) * 6).float()
    g = torch.randn(rows, n, dtype=F64)
    r1, k1, a1 = leaf(s32), leaf(k32), leaf(torch.tensor(0.5))
    (soft_topk(r1, k1, a1, eps=eps) * g.float()).sum().backward()
    r2, k2, a2 = leaf(s32.double()), leaf(k32.double()), leaf(t64(0.5))
    (reference_soft_topk(r2, k2, a2, eps=eps) * g).sum().backward()
    torch.testing.assert_close(r1.grad.double(), r2.grad, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(k1.grad.double(), k2.grad, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(a1.grad.double(), a2.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("eps", [0.0, 0.05])
@pytest.mark.parametrize("dtype, resolution", [(torch.bfloat16, 2.0 ** -8), (torch.float16, 2.0 ** -10)])
def test_half_precision_inputs(dtype, resolution, eps):
    rows, n = 16, 64
    s = random_scores(rows, n, spread=2.0).to(dtype)
    k = 0.5 + torch.rand(rows, dtype=F64) * 6
    expected = reference_soft_topk(s.double(), k, 0.7, eps=eps)  # float64 on the same rounded inputs
    p = soft_topk(s, k.float(), 0.7, eps=eps)
    assert p.dtype == dtype and p.shape == s.shape
    torch.testing.assert_close(p.double(), expected, rtol=0, atol=resolution)
    # Backward runs and returns finite gradients of the input dtype.
    r = leaf(s)
    kk = leaf(k.float())
    soft_topk(r, kk, 0.7, eps=eps).backward(torch.randn(rows, n).to(dtype))
    assert r.grad.dtype == dtype and bool(torch.isfinite(r.grad).all())
    assert kk.grad.dtype == torch.float32 and bool(torch.isfinite(kk.grad).all())


# ------------------------------------------------------------------------------------------------
# Invariants
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 0.05])
@pytest.mark.parametrize("shift", [3.7, -250.0])
def test_shift_invariance(shift, eps):
    scores = random_scores(16, 32)
    p = soft_topk(scores, 3.5, 0.4, eps=eps)
    torch.testing.assert_close(soft_topk(scores + shift, 3.5, 0.4, eps=eps), p, rtol=0, atol=1e-11)
    _, b0 = op(scores, 3.5, 0.4, eps)
    _, b1 = op(scores + shift, 3.5, 0.4, eps)
    torch.testing.assert_close(b1, b0 + shift, rtol=0, atol=1e-10)


@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_scale_invariance(eps):
    """p(r, k, alpha) = p(r/alpha, k, 1)."""
    scores = random_scores(16, 32)
    alpha = 0.37
    torch.testing.assert_close(soft_topk(scores, 2.5, alpha, eps=eps), soft_topk(scores / alpha, 2.5, 1.0, eps=eps),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_active", [None, 5])
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_permutation_equivariance(eps, max_active):
    scores = random_scores(8, 16)
    perm = torch.randperm(16)
    p = soft_topk(scores, 2.5, 0.6, eps=eps, max_active=max_active)
    pp = soft_topk(scores[:, perm], 2.5, 0.6, eps=eps, max_active=max_active)
    torch.testing.assert_close(pp, p[:, perm], rtol=0, atol=1e-14)
    # Gradients permute the same way.
    g = torch.randn(8, 16, dtype=F64)
    r1, r2 = leaf(scores), leaf(scores[:, perm])
    (soft_topk(r1, 2.5, 0.6, eps=eps, max_active=max_active) * g).sum().backward()
    (soft_topk(r2, 2.5, 0.6, eps=eps, max_active=max_active) * g[:, perm]).sum().backward()
    torch.testing.assert_close(r2.grad, r1.grad[:, perm], rtol=0, atol=1e-12)


@pytest.mark.parametrize("eps", [0.0, 0.05])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_equal_logits_equal_p(dtype, eps):
    base = torch.randn(6, 5, dtype=F64)
    scores = base.repeat_interleave(3, dim=1).to(dtype)  # every value three times
    p = soft_topk(scores, 4.0, 0.5, eps=eps).view(6, 5, 3)
    assert bool((p == p[..., :1]).all()), "tied scores must get identical p"
    # All-equal row: p = k/E exactly (up to rounding).
    flat = torch.zeros(3, 10, dtype=dtype)
    torch.testing.assert_close(soft_topk(flat, 2.5, 1.0, eps=eps), torch.full_like(flat, 0.25),
                               rtol=0, atol=1e-15 if dtype == F64 else 1e-7)


@pytest.mark.parametrize("eps", [0.0, 0.05])
@pytest.mark.parametrize("dtype, atol", [(F64, 1e-13), (torch.float32, 1e-5)])
def test_grad_scores_sum_to_zero(dtype, atol, eps):
    rows, n = 32, 64
    scores = leaf(random_scores(rows, n, dtype=dtype))
    k = leaf(torch.full((rows,), 6.0, dtype=dtype))
    g = torch.randn(rows, n, dtype=dtype) * 3
    (soft_topk(scores, k, 0.5, eps=eps) * g).sum().backward()
    assert float(scores.grad.double().sum(-1).abs().max()) <= atol
    # dL/dk = <g, w> with w a probability vector: within [min g, max g] over the active set.
    active = soft_topk(scores.detach(), k.detach(), 0.5, eps=eps) > 0
    g_min = torch.where(active, g, torch.full_like(g, math.inf)).min(-1).values
    g_max = torch.where(active, g, torch.full_like(g, -math.inf)).max(-1).values
    assert bool(((k.grad >= g_min - 1e-6) & (k.grad <= g_max + 1e-6)).all())


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("eps", [1e-3, 0.05, 0.3])
def test_truncation_support(eps, dtype):
    """p_i = 0 exactly iff r_i <= b - c alpha (x_i <= -c), and sum p = k."""
    rows, n, alpha = 64, 128, 0.3
    scores = random_scores(rows, n, dtype=dtype, spread=2.0)
    k = 0.5 + torch.rand(rows, dtype=F64) * 5
    p, b = op(scores, k.to(dtype), torch.tensor(alpha, dtype=dtype), eps)
    x = (scores.double() - b.unsqueeze(-1)) / alpha
    c = c_of(eps)
    margin = 1e-9 if dtype == F64 else 1e-4  # entries sitting on the cut may go either way
    assert bool((p[x <= -c - margin] == 0).all())
    assert bool((p[x > -c + margin] > 0).all())
    assert bool(((p > 0).sum(-1) >= torch.ceil(k.to(dtype).double())).all())
    tol = 1e-12 if dtype == F64 else 2e-5
    torch.testing.assert_close(p.double().sum(-1), k, rtol=0, atol=tol)


@pytest.mark.parametrize("eps", [0.0, 0.05])
@pytest.mark.parametrize("max_active", [1, 3, 10])
def test_max_active_zero_outside_candidates(max_active, eps):
    rows, n = 32, 24
    scores = random_scores(rows, n)
    scores[:, ::5] = scores[:, 1::5]  # some ties, so the lower-index rule matters
    k = 0.01 + torch.rand(rows, dtype=F64) * (max_active - 0.02)
    p = soft_topk(scores, k, 0.5, eps=eps, max_active=max_active)
    cand = candidate_mask(scores, max_active)
    assert bool((p[~cand] == 0).all())
    assert int((p > 0).sum(-1).max()) <= max_active
    torch.testing.assert_close(p, reference_soft_topk(scores, k, 0.5, eps=eps, max_active=max_active),
                               rtol=0, atol=1e-12)
    r = leaf(scores)
    (soft_topk(r, k, 0.5, eps=eps, max_active=max_active) * torch.randn(rows, n, dtype=F64)).sum().backward()
    assert bool((r.grad[~cand] == 0).all())


def test_ties_at_cap_boundary():
    scores = t64([[3.0, 1.0, 1.0, 1.0, -2.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    p = soft_topk(scores, 1.5, 0.5, max_active=2)
    assert bool((p[0, 2:] == 0).all()) and bool((p[1, 2:] == 0).all())  # the lower index wins the tie
    torch.testing.assert_close(p[1], t64([0.75, 0.75, 0, 0, 0]), rtol=0, atol=1e-15)
    torch.testing.assert_close(p, reference_soft_topk(scores, 1.5, 0.5, max_active=2), rtol=0, atol=1e-13)
    p3 = soft_topk(scores[1:], 1.5, 1.0, max_active=3)
    torch.testing.assert_close(p3[0], t64([0.5, 0.5, 0.5, 0, 0]), rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# Shapes, dims, strides
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, dim", [((2, 3, 8), -1), ((2, 3, 8), 2), ((8, 5), 0), ((2, 8, 3), 1),
                                        ((2, 8, 3), -2), ((8,), 0), ((3, 1, 8), -1)])
@pytest.mark.parametrize("per_row", [False, True])
def test_dims_and_batch_shapes(shape, dim, per_row):
    scores = torch.randn(*shape, dtype=F64)
    lead = list(shape)
    del lead[dim]
    if per_row:
        k = 0.5 + torch.rand(lead, dtype=F64) * 6
        alpha = 0.3 + torch.rand(lead, dtype=F64)
    else:
        k, alpha = 2.5, 0.7
    p = soft_topk(scores, k, alpha, dim=dim, eps=0.02, max_active=7)
    assert p.shape == scores.shape and p.dtype == F64
    expected = reference_nd(scores, k, alpha, dim=dim, eps=0.02, max_active=7)
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(p.sum(dim), torch.as_tensor(k, dtype=F64).expand(lead), rtol=0, atol=1e-12)
    if per_row:
        r, kk, aa = leaf(scores), leaf(k), leaf(alpha)
        r2, kk2, aa2 = leaf(scores), leaf(k), leaf(alpha)
        g = torch.randn(shape, dtype=F64)
        (soft_topk(r, kk, aa, dim=dim, eps=0.02, max_active=7) * g).sum().backward()
        (reference_nd(r2, kk2, aa2, dim=dim, eps=0.02, max_active=7) * g).sum().backward()
        for got, want in ((r.grad, r2.grad), (kk.grad, kk2.grad), (aa.grad, aa2.grad)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


NONCONTIGUOUS_VIEWS = {
    "transposed": lambda base: base.t(),                  # [E, rows] viewed as [rows, E]
    "sliced": lambda base: base.t()[:, ::2],              # strided rows and experts
    "expanded": lambda base: base.t()[:1].expand(5, -1),  # stride 0 over rows
}


@pytest.mark.parametrize("view", sorted(NONCONTIGUOUS_VIEWS))
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_noncontiguous_inputs(view, dtype):
    make = NONCONTIGUOUS_VIEWS[view]
    base = torch.randn(24, 10, dtype=dtype)  # .t() -> [10, 24]
    scores = make(base)
    assert not scores.is_contiguous()
    rows = scores.shape[0]
    k = (0.5 + torch.rand(rows, dtype=F64) * 3).to(dtype)
    k_strided = torch.stack([k, k], -1)[:, 0]  # non-contiguous per-row k
    assert not k_strided.is_contiguous()
    p = soft_topk(scores, k_strided, 0.5, eps=0.01)
    p_ref = soft_topk(scores.contiguous(), k, 0.5, eps=0.01)
    torch.testing.assert_close(p, p_ref, rtol=0, atol=0)
    # Gradients through the strided view land in the base exactly as through a contiguous copy.
    g = torch.randn(scores.shape, dtype=dtype)
    b1, b2 = leaf(base), leaf(base)
    k1, k2 = leaf(k), leaf(k)
    (soft_topk(make(b1), k1, 0.5, eps=0.01) * g).sum().backward()
    (soft_topk(make(b2).contiguous(), k2, 0.5, eps=0.01) * g).sum().backward()
    torch.testing.assert_close(b1.grad, b2.grad, rtol=0, atol=0)
    torch.testing.assert_close(k1.grad, k2.grad, rtol=0, atol=0)


def test_noncontiguous_dim0_per_row_k():
    base = torch.randn(6, 8, 4, dtype=F64)
    scores = base.permute(1, 0, 2)[:, ::2]  # [8, 3, 4], experts along dim 0, non-contiguous
    k = leaf(0.5 + torch.rand(3, 4, dtype=F64) * 5)
    r = leaf(scores)
    p = soft_topk(r, k, 0.8, dim=0)
    torch.testing.assert_close(p, reference_nd(scores, k.detach(), 0.8, dim=0), rtol=0, atol=1e-12)
    torch.testing.assert_close(p.sum(0), k.detach(), rtol=0, atol=1e-12)
    p.backward(torch.randn_like(p))
    assert r.grad.shape == scores.shape and k.grad.shape == (3, 4)


# ------------------------------------------------------------------------------------------------
# Edge cases
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 0.05])
@pytest.mark.parametrize("n", [2, 8, 64])
def test_k_near_limits(n, eps):
    rows = 6
    scores = random_scores(rows, n)
    for k in (1e-6, n - 1e-6):
        p = soft_topk(scores, k, 0.5, eps=eps)
        expected = reference_soft_topk(scores, k, 0.5, eps=eps)
        torch.testing.assert_close(p, expected, rtol=1e-9, atol=1e-13)
        torch.testing.assert_close(p.sum(-1), torch.full((rows,), k, dtype=F64), rtol=1e-12, atol=1e-13)
        p32 = soft_topk(scores.float(), k, 0.5, eps=eps)
        torch.testing.assert_close(p32.double().sum(-1), torch.full((rows,), k, dtype=F64),
                                   rtol=1e-5, atol=1e-5)
        assert bool(torch.isfinite(p32).all())


@pytest.mark.parametrize("max_active", [None, 4])
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_per_row_k_exact_limits(eps, max_active):
    rows, n = 4, 8
    m = n if max_active is None else max_active
    scores = random_scores(rows, n)
    k = leaf(t64([0.0, 2.5, float(m), 1.0]))
    alpha = leaf(t64([0.5, 0.6, 0.7, 0.8]))
    r = leaf(scores)
    p = soft_topk(r, k, alpha, eps=eps, max_active=max_active)
    assert bool((p[0] == 0).all())
    cand = candidate_mask(scores, m)
    torch.testing.assert_close(p[2], cand[2].to(F64), rtol=0, atol=0)
    expected = reference_soft_topk(scores, k.detach(), alpha.detach(), eps=eps, max_active=max_active)
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-12)
    _, b = op(scores, k.detach(), alpha.detach(), eps, max_active)
    assert b[0] == math.inf and b[2] == -math.inf
    (p * torch.randn(rows, n, dtype=F64)).sum().backward()
    for t in (r.grad[0], r.grad[2], k.grad[0], k.grad[2], alpha.grad[0], alpha.grad[2]):
        assert bool((t == 0).all()), "limit rows have zero gradients"
    assert bool((r.grad[1] != 0).any()) and bool(k.grad[1] != 0)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("alpha", [1.0, 0.1])
def test_integer_k_huge_gaps(dtype, alpha):
    """The D = 0 branch of the closed form: e^{-gap/alpha} underflows."""
    scores = torch.tensor([[0.0, 200.0, 400.0, 600.0], [600.0, 0.0, 400.0, 200.0]], dtype=dtype)
    r = leaf(scores)
    k = leaf(torch.tensor(2.0, dtype=dtype))
    p = soft_topk(r, k, alpha)
    assert bool(torch.isfinite(p).all())
    expected = torch.tensor([[0.0, 0.0, 1.0, 1.0], [1.0, 0.0, 1.0, 0.0]], dtype=dtype)
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-12 if dtype == F64 else 1e-7)
    torch.testing.assert_close(p.sum(-1), torch.full((2,), 2.0, dtype=dtype), rtol=0, atol=1e-12)
    _, b = op(scores, 2.0, alpha)
    torch.testing.assert_close(b, t64([300.0, 300.0]), rtol=0, atol=1e-9 if dtype == F64 else 1e-4)
    p.backward(torch.randn(2, 4, dtype=dtype))
    assert bool(torch.isfinite(r.grad).all()) and bool(torch.isfinite(k.grad).all())
    # also with truncation
    pt = soft_topk(scores, 2.0, alpha, eps=0.01)
    torch.testing.assert_close(pt, expected, rtol=0, atol=1e-12 if dtype == F64 else 1e-7)


@pytest.mark.parametrize("eps", [0.0, 0.01])
def test_gap_overflowing_float_with_alpha_as_large(eps):
    """f32 scores +-3e38 differ by more than FLT_MAX, but (s_0 - s_1) / alpha = 1.76 for alpha =
    FLT_MAX: the row is soft, not [1, 0] (fuzzing found the overflow)."""
    big = torch.finfo(torch.float32).max
    scores = torch.tensor([[3e38, -3e38]], dtype=torch.float32)
    r = leaf(scores)
    p = soft_topk(r, 1.0, big, eps=eps)
    expected = reference_soft_topk(scores.double(), 1.0, big, eps=eps)
    assert 0.7 < float(expected[0, 0]) < 0.9
    torch.testing.assert_close(p.double(), expected, rtol=0, atol=1e-6)
    p.backward(torch.tensor([[1.0, -1.0]]))
    assert bool(torch.isfinite(r.grad).all())


@pytest.mark.parametrize("alpha", [1e-2, 1.0])
@pytest.mark.parametrize("eps", [0.0, 0.01])
def test_large_magnitude_logits(alpha, eps):
    rows, n = 8, 32
    scores = 1e4 + random_scores(rows, n)
    p = soft_topk(scores, 3.0, alpha, eps=eps)
    expected = reference_soft_topk(scores, 3.0, alpha, eps=eps)
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-10)
    s32 = scores.float()  # rounded to the float32 grid (ulp 1e-3 at 1e4)
    p32 = soft_topk(s32, 3.0, alpha, eps=eps)
    expected32 = reference_soft_topk(s32.double(), 3.0, alpha, eps=eps)
    torch.testing.assert_close(p32.double(), expected32, rtol=0, atol=1e-5)
    torch.testing.assert_close(p32.double().sum(-1), torch.full((rows,), 3.0, dtype=F64), rtol=0, atol=1e-5)
    # Negative large magnitude as well.
    torch.testing.assert_close(soft_topk(scores - 2e4, 3.0, alpha, eps=eps), p, rtol=0, atol=1e-9)


@pytest.mark.parametrize("alpha", [1e-3, 1e-2, 1.0, 1e2, 1e3])
@pytest.mark.parametrize("eps", [0.0, 0.01])
def test_alpha_range(alpha, eps):
    rows, n, k = 8, 16, 3.0
    # Well separated scores (gaps >= 0.45) so alpha -> 0 has a clean hard top-k limit.
    scores = torch.stack([torch.randperm(n).to(F64) * 0.5 + 0.05 * torch.rand(n, dtype=F64) for _ in range(rows)])
    p = soft_topk(scores, k, alpha, eps=eps)
    expected = reference_soft_topk(scores, k, alpha, eps=eps)
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-11)
    torch.testing.assert_close(p.sum(-1), torch.full((rows,), k, dtype=F64), rtol=0, atol=1e-12)
    if alpha <= 1e-2:  # hard top-k indicator
        hard = torch.zeros_like(scores).scatter_(-1, scores.topk(int(k), -1).indices, 1.0)
        torch.testing.assert_close(p, hard, rtol=0, atol=1e-8 if alpha == 1e-2 else 1e-90)
    if alpha >= 1e2:  # close to uniform k/E
        torch.testing.assert_close(p, torch.full_like(p, k / n), rtol=0, atol=0.05 * 100 / alpha)
    r = leaf(scores)
    a = leaf(t64(alpha))
    (soft_topk(r, k, a, eps=eps) * torch.randn(rows, n, dtype=F64)).sum().backward()
    assert bool(torch.isfinite(r.grad).all()) and bool(torch.isfinite(a.grad))


@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_neg_inf_scores(eps):
    rows, n = 5, 10
    scores = random_scores(rows, n)
    scores[0, 3] = -math.inf
    scores[1, :7] = -math.inf  # 3 finite scores
    scores[2, ::2] = -math.inf
    scores[4, 0] = -math.inf
    r = leaf(scores)
    k = leaf(t64([2.5, 2.0, 1.5, 4.0, 3.0]))
    p = soft_topk(r, k, 0.6, eps=eps)
    ninf = torch.isneginf(scores)
    assert bool((p[ninf] == 0).all()) and bool(torch.isfinite(p).all())
    torch.testing.assert_close(p, reference_soft_topk(scores, k.detach(), 0.6, eps=eps), rtol=0, atol=1e-12)
    torch.testing.assert_close(p.sum(-1), k.detach(), rtol=0, atol=1e-12)
    (p * torch.randn(rows, n, dtype=F64)).sum().backward()
    assert bool((r.grad[ninf] == 0).all()) and bool(torch.isfinite(r.grad).all())
    assert bool(torch.isfinite(k.grad).all())
    # A per-row k equal to the number of finite scores: p = 1 on them.
    p_full = soft_topk(scores, t64([2.5, 3.0, 1.5, 4.0, 3.0]), 0.6, eps=eps)
    torch.testing.assert_close(p_full[1], (~ninf[1]).to(F64), rtol=0, atol=0)
    # Only one finite score with a python k < 1.
    one = torch.full((1, 4), -math.inf, dtype=F64)
    one[0, 2] = 1.5
    torch.testing.assert_close(soft_topk(one, 0.4, 1.0, eps=eps), t64([[0, 0, 0.4, 0]]), rtol=0, atol=1e-15)


def _bad_row_case(kind):
    rows, n = 4, 8
    scores = random_scores(rows, n)
    k = t64([2.0, 2.5, 3.0, 1.5])
    alpha = t64([0.5, 0.5, 0.5, 0.5])
    bad = 1
    if kind == "nan":
        scores[bad, 3] = math.nan
    elif kind == "posinf":
        scores[bad, 5] = math.inf
    elif kind == "few_finite":
        scores[bad, :6] = -math.inf  # 2 finite scores, k = 2.5
    elif kind == "k_negative":
        k[bad] = -0.5
    elif kind == "k_too_big":
        k[bad] = n + 0.5
    elif kind == "alpha_zero":
        alpha[bad] = 0.0
    elif kind == "alpha_nan":
        alpha[bad] = math.nan
    return scores, k, alpha, bad


BAD_ROW_KINDS = ["nan", "posinf", "few_finite", "k_negative", "k_too_big", "alpha_zero", "alpha_nan"]


@pytest.mark.parametrize("eps", [0.0, 0.05])
@pytest.mark.parametrize("kind", BAD_ROW_KINDS)
def test_bad_row_is_nan_others_exact(kind, eps):
    scores, k, alpha, bad = _bad_row_case(kind)
    good = [i for i in range(scores.shape[0]) if i != bad]
    p = soft_topk(scores, k, alpha, eps=eps)
    assert bool(torch.isnan(p[bad]).all()), "the whole bad row is NaN"
    clean = soft_topk(scores[good], k[good], alpha[good], eps=eps)
    torch.testing.assert_close(p[good], clean, rtol=0, atol=0)
    _, b = op(scores, k, alpha, eps)
    assert math.isnan(float(b[bad])) and bool(torch.isfinite(b[good]).all())
    # Backward: the other rows' gradients are unaffected.
    g = torch.randn(scores.shape, dtype=F64)
    r1, k1 = leaf(scores), leaf(k)
    (soft_topk(r1, k1, alpha, eps=eps) * g).sum().backward()
    r2, k2 = leaf(scores[good]), leaf(k[good])
    (soft_topk(r2, k2, alpha[good], eps=eps) * g[good]).sum().backward()
    torch.testing.assert_close(r1.grad[good], r2.grad, rtol=0, atol=0)
    torch.testing.assert_close(k1.grad[good], k2.grad, rtol=0, atol=0)
    # strict=True raises, naming the row.
    with pytest.raises(ValueError, match=r"row \(?1\b"):
        soft_topk(scores, k, alpha, eps=eps, strict=True)


def test_bad_row_python_k_float32():
    """A python k larger than the finite count of one row: that row NaN (float32 too)."""
    scores = random_scores(3, 6, dtype=torch.float32)
    scores[2, 1:] = -math.inf
    p = soft_topk(scores, 1.5, 1.0)
    assert bool(torch.isnan(p[2]).all())
    torch.testing.assert_close(p[:2], soft_topk(scores[:2], 1.5, 1.0), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"row \(?2\b"):
        soft_topk(scores, 1.5, 1.0, strict=True)


def test_strict_passes_good_input():
    scores = random_scores(4, 8)
    torch.testing.assert_close(soft_topk(scores, 2.0, 0.5, strict=True), soft_topk(scores, 2.0, 0.5),
                               rtol=0, atol=0)


@pytest.mark.parametrize("per_row", [False, True])
def test_empty_batch(per_row):
    scores = leaf(torch.empty(0, 8, dtype=F64))
    k = leaf(torch.empty(0, dtype=F64) if per_row else t64(2.0))
    p = soft_topk(scores, k, 0.5, eps=0.01)
    assert p.shape == (0, 8) and p.dtype == F64
    p.sum().backward()
    assert scores.grad.shape == (0, 8)
    assert k.grad.shape == k.shape
    if not per_row:
        assert float(k.grad) == 0.0
    p3 = soft_topk(torch.empty(2, 0, 8), 2.0, 0.5)
    assert p3.shape == (2, 0, 8)


@pytest.mark.parametrize("eps", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("k", [1e-6, 0.3, 0.999999])
def test_single_expert(k, eps):
    scores = leaf(t64([[5.0], [-3.0], [0.0]]))
    kk = leaf(t64(k))
    alpha = leaf(t64(0.7))
    p = soft_topk(scores, kk, alpha, eps=eps)
    torch.testing.assert_close(p, torch.full((3, 1), k, dtype=F64), rtol=1e-12, atol=1e-15)
    p.sum().backward()
    torch.testing.assert_close(scores.grad, torch.zeros(3, 1, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(kk.grad, t64(3.0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(alpha.grad, t64(0.0), rtol=0, atol=1e-12)


def test_grad_dtype_and_shape_follow_params():
    scores = random_scores(5, 8)
    k32 = leaf(torch.full((5,), 2.0))        # float32 k with float64 scores
    a32 = leaf(torch.tensor(0.5))            # float32 scalar alpha
    soft_topk(leaf(scores), k32, a32).backward(torch.randn(5, 8, dtype=F64))
    assert k32.grad.dtype == torch.float32 and k32.grad.shape == (5,)
    assert a32.grad.dtype == torch.float32 and a32.grad.shape == ()
    # k of shape [1] (numel 1) broadcasts and gets a gradient of shape [1].
    k1 = leaf(torch.tensor([2.0], dtype=F64))
    r = leaf(scores)
    soft_topk(r, k1, 0.5).backward(torch.ones(5, 8, dtype=F64))
    assert k1.grad.shape == (1,)


def test_scalar_param_grad_is_sum_of_rows():
    rows, n = 9, 12
    scores = random_scores(rows, n)
    g = torch.randn(rows, n, dtype=F64)
    k_s, a_s = leaf(t64(3.0)), leaf(t64(0.6))
    k_r, a_r = leaf(torch.full((rows,), 3.0, dtype=F64)), leaf(torch.full((rows,), 0.6, dtype=F64))
    (soft_topk(scores, k_s, a_s, eps=0.02) * g).sum().backward()
    (soft_topk(scores, k_r, a_r, eps=0.02) * g).sum().backward()
    torch.testing.assert_close(k_s.grad, k_r.grad.sum(), rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(a_s.grad, a_r.grad.sum(), rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------

def _forward_backward(scores, k, alpha, g, eps):
    r, kk, aa = leaf(scores), leaf(k), leaf(alpha)
    p = soft_topk(r, kk, aa, eps=eps)
    p.backward(g)
    return p.detach(), r.grad, kk.grad, aa.grad


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("eps", [0.0, 0.02])
def test_bitwise_deterministic_across_runs_and_threads(dtype, eps):
    rows, n = 4096, 64
    scores = random_scores(rows, n, dtype=dtype, spread=2.0)
    k = torch.tensor(5.5, dtype=dtype)
    alpha = torch.tensor(0.4, dtype=dtype)
    g = torch.randn(rows, n, dtype=dtype)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _forward_backward(scores, k, alpha, g, eps)
        torch.set_num_threads(2)
        two = _forward_backward(scores, k, alpha, g, eps)
        again = _forward_backward(scores, k, alpha, g, eps)
    finally:
        torch.set_num_threads(old)
    for a, b, c in zip(one, two, again):
        assert torch.equal(a, b), "results depend on the thread count"
        assert torch.equal(b, c), "results differ between two runs"
    assert bool(torch.isfinite(one[2])) and bool(torch.isfinite(one[3]))
