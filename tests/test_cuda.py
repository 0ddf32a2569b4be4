"""CUDA kernels of soft_topk against the CPU kernels (which the rest of the suite checks against the
reference): forward and backward parity, the grid-stride loop over many rows, bit-identical repeat
runs (the budget gradient of a scalar k included), a side stream, and an empty batch.

The GPU runs the same per-row functions as the CPU (csrc/core/lapsum_row.h), but its exp/log differ
from the host libm by an ulp or so, so parity is to a dtype-dependent tolerance, not bit for bit;
repeat runs on the GPU, in contrast, must agree bit for bit. Skipped without a GPU or when the
extension was built without CUDA."""
import pytest
import torch

import softmoe
from conftest import random_scores

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16


def _cuda_kernels_built():
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("softmoe::soft_topk", "CUDA")
    except Exception:  # pragma: no cover - private API moved
        return False


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not _cuda_kernels_built(),
        reason="softmoe was built without CUDA kernels (rebuild with a CUDA torch and nvcc)",
    ),
]

# (atol, rtol) per storage dtype for values of order 1. bf16 stores 8 significant bits: one ulp
# below 1 is 2^-8, and CPU/GPU float results a hair apart may round to neighbouring bf16 values.
TOL = {F64: (1e-10, 1e-9), F32: (2e-5, 1e-4), BF16: (1.6e-2, 1.6e-2), F16: (2e-3, 2e-3)}

MODES = {  # name: (eps, max_active) with E = 16
    "plain": (0.0, None),
    "plain_capped": (0.0, 6),
    "truncated": (1e-2, None),
    "truncated_capped": (1e-2, 6),
}


def _params(rows, per_row_k, dtype, m, device, gen):
    """k (scalar or per row) and a scalar alpha, as leaf tensors of the math dtype on `device`."""
    math = F64 if dtype == F64 else F32
    if per_row_k:
        k = (0.3 + torch.rand(rows, dtype=F64, generator=gen) * (m - 1.0)).to(math)
    else:
        k = torch.tensor(min(2.5, m - 0.5), dtype=math)
    alpha = torch.tensor(0.7, dtype=math)
    return k.to(device), alpha.to(device)


def _run(scores, k, alpha, grad_p, eps, max_active):
    """p and the gradients for scores, k and alpha of sum(p * grad_p)."""
    scores = scores.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    alpha = alpha.detach().clone().requires_grad_(True)
    p = softmoe.soft_topk(scores, k, alpha, eps=eps, max_active=max_active)
    (p * grad_p).sum().backward()  # the gradient reaching p is exactly grad_p, in any dtype
    return p.detach(), scores.grad, k.grad, alpha.grad


def _assert_close(actual, expected, dtype, what, scale=1.0, extra_atol=0.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(
        actual.cpu().to(expected.dtype),
        expected,
        atol=atol * scale + extra_atol,
        rtol=rtol,
        equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


def _compare_runs(dev, cpu, dtype, per_row_k):
    """dev/cpu: (p, grad scores, grad k, grad alpha) of _run on the GPU and on the CPU.

    With eps > 0 the gradient jumps at the cut (phi is eps / (1 - eps) just above it and 0 below),
    so an entry whose x lies within rounding of -c may be active on one device and not on the other.
    Such rows are rare; their gradients are left out of the row-wise comparison, and each one
    widens the tolerance of the scalar (all-row) gradients by a bound on its jump."""
    p_dev, p_cpu = dev[0].cpu(), cpu[0]
    _assert_close(p_dev, p_cpu, dtype, "p")
    same = ((p_dev != 0) == (p_cpu != 0)).reshape(p_cpu.shape[0], -1).all(-1)
    flips = int((~same).sum())
    assert flips <= max(2, p_cpu.shape[0] // 1000), f"{flips} rows have a different active set"
    rows = p_cpu.shape[0]
    _assert_close(dev[1].cpu()[same], cpu[1][same], dtype, "grad scores", scale=4.0)
    if per_row_k:
        _assert_close(dev[2].cpu()[same], cpu[2][same], dtype, "grad k", scale=4.0)
    else:  # one sum of `rows` per-row terms, by different trees on the CPU and the GPU
        _assert_close(dev[2], cpu[2], dtype, "grad k", scale=4.0 * rows**0.5, extra_atol=flips)
    _assert_close(dev[3], cpu[3], dtype, "grad alpha", scale=4.0 * rows**0.5, extra_atol=4.0 * flips)


def _case(rows, n, dtype, mode, per_row_k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    eps, max_active = MODES[mode]
    m = n if max_active is None else max_active
    scores = (torch.randn(rows, n, dtype=F64, generator=gen) * 1.5).to(dtype)
    grad_p = torch.randn(rows, n, dtype=F64, generator=gen).to(dtype)
    k, alpha = _params(rows, per_row_k, dtype, m, "cpu", gen)
    return scores, k, alpha, grad_p, eps, max_active


@pytest.mark.parametrize("per_row_k", [False, True], ids=["scalar_k", "per_row_k"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16], ids=str)
def test_forward_backward_parity(dtype, mode, per_row_k):
    rows, n = 1000, 16
    scores, k, alpha, grad_p, eps, max_active = _case(rows, n, dtype, mode, per_row_k)
    cpu = _run(scores, k, alpha, grad_p, eps, max_active)
    dev = _run(scores.cuda(), k.cuda(), alpha.cuda(), grad_p.cuda(), eps, max_active)
    assert dev[0].device.type == "cuda" and dev[1].device.type == "cuda"
    _compare_runs(dev, cpu, dtype, per_row_k)
    # exact zeros outside the candidates with a cap (both devices select the same candidates)
    if max_active is not None:
        assert int((dev[0] != 0).sum(-1).max()) <= max_active


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [F32, F64, BF16, F16], ids=str)
def test_backward_op_parity_same_inputs(dtype, mode):
    """The backward op alone, fed the CPU forward's p and threshold on both devices, so the active
    sets are identical and only the math library's rounding differs."""
    rows, n = 513, 16
    scores, k, alpha, grad_p, eps, max_active = _case(rows, n, dtype, mode, per_row_k=True, seed=1)
    m = n if max_active is None else max_active
    p, thr = torch.ops.softmoe.soft_topk(scores, k, alpha, eps, m)
    cpu = torch.ops.softmoe.soft_topk_backward(grad_p, scores, p, thr, k, alpha, eps, m)
    args = [t.cuda() for t in (grad_p, scores, p, thr, k, alpha)]
    dev = torch.ops.softmoe.soft_topk_backward(*args, eps, m)
    for name, a, b in zip(("grad scores", "grad k", "grad alpha"), dev, cpu):
        _assert_close(a, b, dtype, name, scale=4.0 * rows**0.5 if name == "grad alpha" else 4.0)
    # the threshold itself
    _, thr_dev = torch.ops.softmoe.soft_topk(*[t.cuda() for t in (scores, k, alpha)], eps, m)
    tol = 1e-10 if dtype == F64 else 1e-4
    torch.testing.assert_close(thr_dev.cpu(), thr, atol=tol, rtol=tol)


def test_special_rows_parity():
    """NaN / +inf rows, -inf scores, and per-row k at the limits 0 and m behave as on the CPU."""
    rows, n = 8, 8
    scores = random_scores(rows, n, dtype=F32)
    scores[1, 3] = float("nan")
    scores[2, 0] = float("inf")
    scores[3, :5] = float("-inf")  # 3 candidates left
    k = torch.full((rows,), 2.0)
    k[3] = 3.0   # k = m (all candidates on)
    k[4] = 0.0   # k = 0
    k[5] = 9.0   # k > m: NaN row
    grad_p = torch.randn(rows, n)
    for eps in (0.0, 1e-2):
        cpu = _run(scores, k, torch.tensor(1.0), grad_p, eps, None)
        dev = _run(scores.cuda(), k.cuda(), torch.tensor(1.0, device="cuda"), grad_p.cuda(), eps, None)
        _compare_runs(dev, cpu, F32, per_row_k=True)
        assert torch.isnan(dev[0][[1, 2, 5]]).all()
        assert torch.equal(dev[0][4].cpu(), torch.zeros(n))
        assert torch.equal((dev[0][3] != 0).cpu(), scores[3] > float("-inf"))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_many_rows_grid_stride(dtype):
    """More rows than kernel threads (65536), so each thread loops over several rows."""
    rows, n = 100_000, 64
    gen = torch.Generator().manual_seed(2)
    scores = (torch.randn(rows, n, generator=gen) * 2.0).to(dtype)
    grad_p = torch.randn(rows, n, generator=gen).to(dtype)
    k = torch.tensor(2.0)
    alpha = torch.tensor(0.5)
    for eps, cap in ((0.0, None), (1e-2, 8)):
        cpu = _run(scores, k, alpha, grad_p, eps, cap)
        dev = _run(scores.cuda(), k.cuda(), alpha.cuda(), grad_p.cuda(), eps, cap)
        _compare_runs(dev, cpu, dtype, per_row_k=False)
        # every row was processed, the last ones included
        sums = dev[0].float().sum(-1)
        atol = 0.05 if dtype == BF16 else 1e-4
        torch.testing.assert_close(sums, torch.full_like(sums, 2.0), atol=atol, rtol=0)
        assert not torch.isnan(dev[0]).any()


@pytest.mark.parametrize("dtype", [F32, F64], ids=str)
def test_repeat_runs_bit_identical(dtype):
    """Same inputs, same bits: p, grad scores and the budget gradient of a scalar k / alpha (a
    reduction over all rows) are identical run to run on the GPU."""
    rows, n = 70_001, 32  # more rows than threads, and 35 chunks in the k/alpha reduction
    gen = torch.Generator().manual_seed(3)
    scores = (torch.randn(rows, n, generator=gen, dtype=F64) * 1.5).to(dtype).cuda()
    grad_p = torch.randn(rows, n, generator=gen, dtype=F64).to(dtype).cuda()
    k = torch.tensor(3.0, dtype=dtype, device="cuda")
    alpha = torch.tensor(0.6, dtype=dtype, device="cuda")
    for eps, cap in ((0.0, None), (1e-2, 8)):
        first = _run(scores, k, alpha, grad_p, eps, cap)
        for _ in range(3):
            again = _run(scores, k, alpha, grad_p, eps, cap)
            for what, a, b in zip(("p", "grad scores", "grad k", "grad alpha"), again, first):
                assert torch.equal(a, b), f"{what} differs between runs (eps={eps}, max_active={cap})"


def test_side_stream():
    """The kernels run on the caller's current stream: results on a side stream equal those on the
    default stream, and work queued behind the side stream sees them."""
    rows, n = 4096, 64
    scores, k, alpha, grad_p, eps, cap = _case(rows, n, F32, "truncated_capped", per_row_k=False, seed=4)
    scores, k, alpha, grad_p = (t.cuda() for t in (scores, k, alpha, grad_p))
    ref = _run(scores, k, alpha, grad_p, eps, cap)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = _run(scores, k, alpha, grad_p, eps, cap)
        # consumed on the same stream, before any synchronisation with the default stream
        total = out[0].sum(-1)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for what, a, b in zip(("p", "grad scores", "grad k", "grad alpha"), out, ref):
        assert torch.equal(a, b), f"{what} differs on a side stream"
    torch.testing.assert_close(total, torch.full_like(total, float(k)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8)])
def test_empty_batch(shape):
    scores = torch.randn(shape, device="cuda", requires_grad=True)
    k = torch.tensor(2.0, device="cuda", requires_grad=True)
    alpha = torch.tensor(1.0, device="cuda", requires_grad=True)
    p = softmoe.soft_topk(scores, k, alpha, eps=1e-2, max_active=4)
    assert p.shape == scores.shape and p.device.type == "cuda"
    p.sum().backward()
    assert scores.grad.shape == scores.shape
    assert float(k.grad) == 0.0 and float(alpha.grad) == 0.0
    # per-row k with no rows
    k_rows = torch.empty(shape[:-1], device="cuda", requires_grad=True)
    p = softmoe.soft_topk(scores, k_rows, 1.0)
    p.sum().backward()
    assert k_rows.grad.shape == k_rows.shape
