"""Finite-difference gradient checks of softmoe.soft_topk, and torch.library.opcheck of both ops."""
import math

import pytest
import torch

import softmoe
from conftest import random_scores

F64 = torch.float64

# (eps, max_active as a fraction of E or None): plain, truncated, truncated + cap
VARIANTS = [(0.0, None), (0.05, None), (0.05, "half")]


def _params(rows, m, k_mode, alpha_mode):
    k_rows = 0.2 + torch.rand(rows, dtype=F64) * (m - 0.4)
    a_rows = 0.5 + 0.5 * torch.rand(rows, dtype=F64)
    k = k_rows if k_mode == "per_row" else k_rows[0].clone()
    alpha = a_rows if alpha_mode == "per_row" else a_rows[0].clone()
    return k.requires_grad_(True), alpha.requires_grad_(True)


MODES = [("scalar", "scalar"), ("per_row", "per_row"), ("scalar", "per_row"), ("per_row", "scalar")]
# Mixed k/alpha modes only at small E (the large-E cases are the slow ones).
GRADCHECK_CASES = [(n, eps, cap, km, am) for n in (1, 2, 3, 8, 64, 256) for eps, cap in VARIANTS
                   for km, am in (MODES if n <= 8 else MODES[:2])]


@pytest.mark.parametrize("n, eps, cap, k_mode, alpha_mode", GRADCHECK_CASES)
def test_gradcheck(n, eps, cap, k_mode, alpha_mode):
    rows = 1 if n == 256 else 2 if n == 64 else 3
    m = None if cap is None else max(1, n // 2)
    scores = random_scores(rows, n).requires_grad_(True)
    k, alpha = _params(rows, n if m is None else m, k_mode, alpha_mode)

    def fn(s, kk, aa):
        return softmoe.soft_topk(s, kk, aa, eps=eps, max_active=m)

    assert torch.autograd.gradcheck(fn, (scores, k, alpha), eps=1e-6, atol=1e-7, rtol=1e-5, nondet_tol=0.0)


@pytest.mark.parametrize("dim", [0, 1])
def test_gradcheck_dim_and_batch(dim):
    scores = torch.randn(2, 6, 5, dtype=F64).movedim(-1, dim).requires_grad_(True)  # non-contiguous
    lead = list(scores.shape)
    del lead[dim]
    k = (0.5 + torch.rand(lead, dtype=F64) * 3).requires_grad_(True)
    alpha = torch.tensor(0.7, dtype=F64, requires_grad=True)

    def fn(s, kk, aa):
        return softmoe.soft_topk(s, kk, aa, dim=dim, eps=0.02)

    assert torch.autograd.gradcheck(fn, (scores, k, alpha), eps=1e-6, atol=1e-7, rtol=1e-5, nondet_tol=0.0)


def test_gradcheck_float_k_alpha():
    """Python-number k/alpha: only scores get a gradient."""
    scores = random_scores(3, 8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: softmoe.soft_topk(s, 2.5, 0.6, eps=0.01), (scores,),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_neg_inf_scores():
    scores = random_scores(2, 8)
    scores[0, 2] = -math.inf
    scores[1, 5:] = -math.inf
    scores.requires_grad_(True)
    k = torch.tensor([2.5, 1.5], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, kk: softmoe.soft_topk(s, kk, 0.7), (scores, k),
                                    eps=1e-6, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# opcheck
# ------------------------------------------------------------------------------------------------

def _op_samples(requires_grad):
    samples = []
    for dtype in (torch.float32, F64, torch.bfloat16):
        for per_row in (False, True):
            for eps, m in ((0.0, 8), (0.05, 8), (0.05, 5)):
                scores = random_scores(3, 8, dtype=dtype).requires_grad_(requires_grad)
                math_dtype = F64 if dtype == F64 else torch.float32
                if per_row:
                    k = torch.tensor([1.5, 2.0, 3.5], dtype=math_dtype)
                    alpha = torch.tensor([0.5, 0.8, 1.0], dtype=math_dtype)
                else:
                    k = torch.tensor(2.5, dtype=math_dtype)
                    alpha = torch.tensor(0.6, dtype=math_dtype)
                samples.append((scores, k.requires_grad_(requires_grad), alpha.requires_grad_(requires_grad), eps, m))
    # leading batch shape, 1-d scores
    samples.append((torch.randn(2, 3, 6, dtype=F64).requires_grad_(requires_grad),
                    torch.full((2, 3), 2.0, dtype=F64).requires_grad_(requires_grad),
                    torch.tensor(0.5, dtype=F64), 0.0, 6))
    samples.append((torch.randn(7).requires_grad_(requires_grad), torch.tensor(3.0), torch.tensor(1.0), 0.1, 7))
    return samples


N_SAMPLES = len(_op_samples(False))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("idx", range(N_SAMPLES))
def test_opcheck_soft_topk(idx, requires_grad):
    sample = _op_samples(requires_grad)[idx]
    torch.library.opcheck(torch.ops.softmoe.soft_topk.default, sample)


@pytest.mark.parametrize("idx", range(N_SAMPLES))
def test_opcheck_soft_topk_backward(idx):
    scores, k, alpha, eps, m = _op_samples(False)[idx]
    p, threshold = torch.ops.softmoe.soft_topk(scores, k, alpha, eps, m)
    grad_p = torch.randn(scores.shape, dtype=scores.dtype)
    torch.library.opcheck(torch.ops.softmoe.soft_topk_backward.default,
                          (grad_p, scores, p, threshold, k, alpha, eps, m))


def test_backward_op_matches_autograd():
    """soft_topk_backward called directly gives what autograd gives (and the documented shapes)."""
    scores = random_scores(4, 8)
    k = torch.tensor(2.5, dtype=F64)
    alpha = torch.tensor([0.5, 0.6, 0.7, 0.8], dtype=F64)
    p, thr = torch.ops.softmoe.soft_topk(scores, k, alpha, 0.05, 6)
    g = torch.randn(4, 8, dtype=F64)
    gs, gk, ga = torch.ops.softmoe.soft_topk_backward(g, scores, p, thr, k, alpha, 0.05, 6)
    assert gs.shape == scores.shape and gk.shape == k.shape and ga.shape == alpha.shape
    r, kk, aa = scores.clone().requires_grad_(), k.clone().requires_grad_(), alpha.clone().requires_grad_()
    torch.ops.softmoe.soft_topk(r, kk, aa, 0.05, 6)[0].backward(g)
    torch.testing.assert_close(gs, r.grad, rtol=0, atol=0)
    torch.testing.assert_close(gk, kk.grad, rtol=0, atol=0)
    torch.testing.assert_close(ga, aa.grad, rtol=0, atol=0)
