"""Expert compute ops: grouped_mm and the fused expert_ffn (matmul, activation, matmul over
expert-contiguous segments, chunked). Values against an unfused reference (torch matmuls per
segment), opcheck, float64 gradcheck, segments longer than one chunk, padding and empty segments,
determinism across runs and thread counts, and the keep_hidden=False contract."""
import pytest
import torch
from torch.nn import functional as F

from conftest import per_thread_count
from softmoe import ops

OPS = torch.ops.softmoe


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)


def reference_ffn(x, w_in, w_out, offsets, activation):
    """One plain torch matmul chain per segment; padding rows are zero."""
    y = x.new_zeros(x.shape[0], w_out.shape[2])
    bounds = offsets.tolist()
    for e in range(w_in.shape[0]):
        a, b = bounds[e], bounds[e + 1]
        if b > a:
            y[a:b] = activate(x[a:b] @ w_in[e], activation) @ w_out[e]
    return y


def make(E, P, d, h, d_out, activation, dtype=torch.float64, counts=None, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    width = 2 * h if activation == "swiglu" else h
    x = torch.randn(P, d, generator=g, dtype=torch.float64).to(dtype)
    w_in = (torch.randn(E, d, width, generator=g, dtype=torch.float64) / d**0.5).to(dtype)
    w_out = (torch.randn(E, h, d_out, generator=g, dtype=torch.float64) / max(h, 1) ** 0.5).to(dtype)
    if counts is None:
        counts = torch.multinomial(torch.ones(E), P, replacement=True, generator=g).bincount(minlength=E)
        counts[0] = 0  # an empty segment
        counts[-1] = max(int(counts[-1]) - 2, 0)  # and two padding rows
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.as_tensor(counts).cumsum(0)])
    tensors = [t.requires_grad_(requires_grad) for t in (x, w_in, w_out)]
    return (*tensors, offsets)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_values_and_gradients_match_the_unfused_reference(activation, dtype):
    x, w_in, w_out, offsets = make(4, 37, 6, 5, 7, activation, dtype)
    y = ops.expert_ffn(x, w_in, w_out, offsets, activation)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w_in, w_out), gy)
    x64, w_in64, w_out64 = (t.detach().double().requires_grad_(True) for t in (x, w_in, w_out))
    y_ref = reference_ffn(x64, w_in64, w_out64, offsets, activation)
    grads_ref = torch.autograd.grad(y_ref, (x64, w_in64, w_out64), gy.double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(y.double(), y_ref, rtol=tol, atol=tol)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * 4)
    n = int(offsets[-1])
    assert (y[n:] == 0).all() and (grads[0][n:] == 0).all()  # padding rows
    assert (grads[1][0] == 0).all() and (grads[2][0] == 0).all()  # the empty segment


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_segments_longer_than_one_chunk(activation):
    """A chunk holds about 2^21 elements of the widest buffer: with W = 2^17 columns a chunk is 16
    rows, so these segments span 2-4 chunks and the weight gradients accumulate over chunks."""
    h = 2**16 if activation == "swiglu" else 2**17
    x, w_in, w_out, offsets = make(2, 61, 2, h, 3, activation, counts=[29, 30])
    y = ops.expert_ffn(x, w_in, w_out, offsets, activation)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w_in, w_out), gy)
    y_ref = reference_ffn(x, w_in, w_out, offsets, activation)
    grads_ref = torch.autograd.grad(y_ref, (x, w_in, w_out), gy)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_gradcheck_float64(activation):
    x, w_in, w_out, offsets = make(3, 11, 4, 3, 5, activation, counts=[4, 0, 5])
    assert torch.autograd.gradcheck(lambda a, b, c: ops.expert_ffn(a, b, c, offsets, activation), (x, w_in, w_out))
    assert torch.autograd.gradcheck(lambda a, b: ops.grouped_mm(a, b, offsets), (x, w_in))


def test_only_the_requested_gradients_are_computed():
    x, w_in, w_out, offsets = make(3, 11, 4, 3, 5, "swiglu", counts=[4, 0, 5])
    full = torch.autograd.grad(ops.expert_ffn(x, w_in, w_out, offsets).sum(), (x, w_in, w_out))
    (g_w_out,) = torch.autograd.grad(ops.expert_ffn(x.detach(), w_in.detach(), w_out, offsets).sum(), (w_out,))
    assert torch.equal(g_w_out, full[2])
    (g_x,) = torch.autograd.grad(ops.expert_ffn(x, w_in.detach(), w_out.detach(), offsets).sum(), (x,))
    assert torch.equal(g_x, full[0])


def op_samples():
    out = []
    for activation in ("swiglu", "gelu"):
        for dtype in (torch.float32, torch.float64):
            for rg in (False, True):
                x, w_in, w_out, offsets = make(3, 10, 4, 3, 5, activation, dtype, counts=[4, 0, 5], requires_grad=rg)
                keep = rg
                out.append((OPS.expert_ffn.default, (x, w_in, w_out, offsets, activation, keep)))
                y, hidden = OPS.expert_ffn(x.detach(), w_in.detach(), w_out.detach(), offsets, activation, True)
                for mask in ([True, True, True], [False, True, False]):
                    out.append((OPS.expert_ffn_backward.default,
                                (torch.randn_like(y), x.detach(), hidden, w_in.detach(), w_out.detach(), offsets,
                                 activation, mask)))
                out.append((OPS.grouped_mm.default, (x, w_in, offsets)))
                out.append((OPS.grouped_mm_weight_grad.default, (x.detach(), torch.randn(10, w_in.shape[2], dtype=dtype),
                                                                 offsets, 3)))
    return out


@pytest.mark.parametrize("op,args", op_samples(), ids=lambda v: getattr(v, "__name__", None) or "")
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_inference_keeps_no_hidden_and_matches_training():
    x, w_in, w_out, offsets = make(3, 12, 4, 3, 5, "swiglu", counts=[4, 3, 5])
    with torch.no_grad():
        y_inf = ops.expert_ffn(x, w_in, w_out, offsets)
        _, hidden = OPS.expert_ffn(x, w_in, w_out, offsets, "swiglu", False)
    assert hidden.shape == (0, w_in.shape[2])
    assert torch.equal(y_inf, ops.expert_ffn(x, w_in, w_out, offsets))


def test_backward_without_the_hidden_is_a_clear_error():
    x, w_in, w_out, offsets = make(2, 6, 3, 2, 3, "swiglu", counts=[3, 3])
    y, _ = OPS.expert_ffn(x, w_in, w_out, offsets, "swiglu", False)
    with pytest.raises(RuntimeError, match="keep_hidden=False"):
        y.sum().backward()


@pytest.mark.parametrize("counts", [None, [3, 1, 500, 2], [1500, 1, 0, 7]], ids=["random", "short", "skewed"])
def test_deterministic_runs_and_threads(counts):
    """Bit-identical run to run and for 1, 2 or 3 threads: block boundaries and the weight-gradient
    accumulation order depend only on the shapes and segments. Short segments make weight gradients
    [d, W] whose reduction is long relative to their size (the products MKL splits over its threads),
    a skewed one an expert with most of the rows."""
    if counts is None:
        x, w_in, w_out, offsets = make(4, 300, 32, 48, 32, "swiglu", torch.float32, seed=3)
    else:
        x, w_in, w_out, offsets = make(4, sum(counts), 16, 8, 16, "swiglu", torch.float32, counts=counts, seed=4)

    def run():
        y = ops.expert_ffn(x, w_in, w_out, offsets)
        return (y, *torch.autograd.grad(y, (x, w_in, w_out), torch.ones_like(y)))

    one, two, again, three = per_thread_count(run, (1, 2, 2, 3))
    for i, (a, b, c, d) in enumerate(zip(one, two, again, three)):
        assert torch.equal(a, b) and torch.equal(b, c) and torch.equal(c, d), f"tensor {i}"


def test_large_outputs_are_ordinary_tensors():
    """Outputs of 8 MB and more come from the huge-page allocator: they must behave like any CPU
    tensor (values, resize, in-place ops, pickling via torch.save)."""
    import io

    x, w_in, w_out, offsets = make(2, 4096, 16, 128, 512, "swiglu", torch.float32, counts=[2048, 2048],
                                   requires_grad=False)
    y = ops.expert_ffn(x, w_in, w_out, offsets)
    assert y.numel() * y.element_size() >= 8 << 20
    torch.testing.assert_close(y, reference_ffn(x, w_in, w_out, offsets, "swiglu"), rtol=1e-4, atol=1e-4)
    y.add_(1.0)
    y.resize_(8192, 512)  # grows: the storage reallocates through the same allocator
    y[4096:] = 2.0
    buf = io.BytesIO()
    torch.save(y, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), y)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(activation, dtype):
    """The op is the same chunk loop of ATen calls on either device."""
    x, w_in, w_out, offsets = make(4, 300, 32, 48, 32, activation, dtype, seed=5)
    y = ops.expert_ffn(x, w_in, w_out, offsets, activation)
    grads = torch.autograd.grad(y, (x, w_in, w_out), torch.ones_like(y))
    xc, w_in_c, w_out_c = (t.detach().cuda().requires_grad_(True) for t in (x, w_in, w_out))
    yc = ops.expert_ffn(xc, w_in_c, w_out_c, offsets.cuda(), activation)
    grads_c = torch.autograd.grad(yc, (xc, w_in_c, w_out_c), torch.ones_like(yc))
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(yc.cpu(), y, rtol=tol, atol=tol)
    for got, want in zip(grads_c, grads):
        torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol * 10)


# ---- ops.matmul: the router's product, and the one under every expert product -------------------

# (M, K, N): small outputs with long reductions (MKL splits those over its threads), tiles that
# divide and that do not, a reduction split into blocks, and the empty edges.
MATMUL_SHAPES = [(8, 1024, 64), (64, 1024, 96), (16, 4096, 16), (1, 8192, 1), (300, 700, 1100), (513, 64, 9),
                 (3, 5000, 7), (0, 4, 3), (4, 0, 3), (4, 3, 0)]


def _matmul_operands(M, K, N, dtype, seed=0, transpose_a=False):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(K, M, generator=g, dtype=torch.float64).t() if transpose_a else torch.randn(M, K, generator=g, dtype=torch.float64)
    b = torch.randn(K, N, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype)


@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_matmul_matches_float64_mm(shape, dtype):
    for transpose_a in (False, True):
        a, b = _matmul_operands(*shape, dtype, transpose_a=transpose_a)
        got = ops.matmul(a, b)
        want = a.double() @ b.double()
        assert got.dtype == dtype and got.shape == want.shape
        # elementwise: the rounding of the output plus a sqrt(K)-grown accumulation error, both
        # relative to |a| @ |b| (the size of the terms)
        unit = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}[dtype]
        bound = unit * (2 * shape[1] ** 0.5 + 1) * (a.double().abs() @ b.double().abs())
        assert ((got.double() - want).abs() <= bound).all()


@pytest.mark.parametrize("shape", [s for s in MATMUL_SHAPES if 0 not in s], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_bit_identical_across_thread_counts(shape, dtype):
    a, b = _matmul_operands(*shape, dtype, seed=1, transpose_a=True)
    results = per_thread_count(lambda: ops.matmul(a, b), (1, 2, 3, 1))
    for n, r in zip((2, 3, 1), results[1:]):
        assert torch.equal(r, results[0]), f"{n} threads vs 1"


def test_matmul_gradcheck_and_opcheck():
    a, b = _matmul_operands(5, 7, 3, torch.float64)
    a.requires_grad_(True)
    b.requires_grad_(True)
    assert torch.autograd.gradcheck(ops.matmul, (a, b))
    assert torch.autograd.gradgradcheck(ops.matmul, (a, b))
    for dtype in (torch.float32, torch.float64):
        for M, K, N in ((5, 7, 3), (2, 1100, 3)):
            x, w = _matmul_operands(M, K, N, dtype)
            torch.library.opcheck(OPS.matmul.default, (x.requires_grad_(True), w.requires_grad_(True)))
            torch.library.opcheck(OPS.matmul.default, (x.detach().t().contiguous().t(), w.detach()))


def test_matmul_rejects_bad_operands():
    a, b = torch.zeros(2, 3), torch.zeros(3, 4)
    with pytest.raises(TypeError, match="matmul: b must be a torch.Tensor, got list"):
        ops.matmul(a, [[0.0]])
    with pytest.raises(RuntimeError, match="softmoe: matmul: a and b must be 2-D"):
        ops.matmul(a, b[0])
    with pytest.raises(RuntimeError, match="softmoe: matmul: a has 3 columns but b has 4 rows"):
        ops.matmul(a, b.t())
    with pytest.raises(TypeError, match="softmoe: matmul: a and b must have one dtype"):
        ops.matmul(a, b.double())
    with pytest.raises(TypeError, match="softmoe: matmul: a and b must be floating point"):
        ops.matmul(a.long(), b.long())
    with pytest.raises(RuntimeError, match="all tensor arguments must be on one device"):
        ops.matmul(a, b.to("meta"))


def test_weight_gradients_split_over_blocks_are_exact_and_thread_independent():
    """A wide expert (W = 2^16 columns, so 32-row chunks) with a long segment: its weight gradient is
    summed over several row blocks (run side by side, then added in block order) while the other
    experts take one block each. Values against the unfused reference; bits across thread counts."""
    h = 2**15
    x, w_in, w_out, offsets = make(4, 193, 4, h, 4, "swiglu", torch.float32, counts=[150, 3, 0, 40], seed=6)
    y = ops.expert_ffn(x, w_in, w_out, offsets)
    gy = torch.randn_like(y)
    runs = per_thread_count(lambda: torch.autograd.grad(ops.expert_ffn(x, w_in, w_out, offsets), (x, w_in, w_out), gy),
                            (1, 2, 3))
    for run in runs[1:]:
        for u, v in zip(runs[0], run):
            assert torch.equal(u, v)
    x64, w_in64, w_out64 = (t.detach().double().requires_grad_(True) for t in (x, w_in, w_out))
    want = torch.autograd.grad(reference_ffn(x64, w_in64, w_out64, offsets, "swiglu"), (x64, w_in64, w_out64), gy.double())
    for got, ref in zip(runs[0], want):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    # grouped_mm's weight gradient is summed over the same blocks
    g = torch.randn(x.shape[0], 2 * h, generator=torch.Generator().manual_seed(7))
    (gw,) = torch.autograd.grad(ops.grouped_mm(x.detach(), w_in, offsets), (w_in,), g)
    bounds = offsets.tolist()
    for e in range(4):
        seg = slice(bounds[e], bounds[e + 1])
        torch.testing.assert_close(gw[e].double(), x64[seg].detach().t() @ g[seg].double(), rtol=1e-5, atol=1e-4)


def test_bf16_weight_gradients_are_summed_over_chunks_in_float32():
    """bf16 weights, one long segment of positive terms cut into 16 chunks (W = 2^17 columns: 16-row
    chunks) and 4 blocks: each weight-gradient element is a sum of 256 positive products. Four
    roundings to bf16 (u = 2^-8) stand between it and the float32 reference: the hidden, the
    activation, each chunk's product, the final sum; they partly cancel. Measured: 1.39 * 2^-8; a
    running sum kept in bf16 (one more rounding per chunk, as before; emulated with torch's bf16
    addmm_) gives 2.7 * 2^-8. The bound 2 * 2^-8 separates the two on these fixed inputs (the
    worst case of the four roundings, 4 * 2^-8, would not)."""
    h = 2**17
    x, w_in, w_out, offsets = make(1, 256, 2, h, 3, "gelu", counts=[256], requires_grad=False)
    x, w_in, w_out = (t.abs().bfloat16().requires_grad_(True) for t in (x, w_in, w_out))
    y = ops.expert_ffn(x, w_in, w_out, offsets, "gelu")
    gy = torch.rand(y.shape, generator=torch.Generator().manual_seed(1)).bfloat16()
    _, g_w_in, g_w_out = torch.autograd.grad(y, (x, w_in, w_out), gy)
    del y
    x32, w_in32, w_out32 = (t.detach().float().requires_grad_(True) for t in (x, w_in, w_out))
    ref = torch.autograd.grad(reference_ffn(x32, w_in32, w_out32, offsets, "gelu"), (w_in32, w_out32), gy.float())
    for got, want in zip((g_w_in, g_w_out), ref):
        assert got.dtype == torch.bfloat16
        assert ((got.float() - want).abs() / want.abs()).max() <= 2 * 2.0**-8


def test_bf16_grouped_weight_gradient_blocks_are_added_in_float32():
    """grouped_mm's weight gradient in bf16 over one segment cut into 4 row blocks (N = 2^16
    columns: 32-row chunks, 256 rows), positive terms: each block's product is rounded to bf16
    once (u = 2^-8 of the block's share) and the float32 sum of the blocks once more, so the
    relative error is at most 2 * 2^-8 (measured 1.82 * 2^-8; adding the blocks in bf16, as before,
    gave 2.59 * 2^-8, emulated with torch's bf16 matmuls; one bf16 matmul of all rows: 1.0 * 2^-8)."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(256, 3, generator=g).bfloat16()
    grad_y = torch.rand(256, 2**16, generator=g).bfloat16()
    grad_w = OPS.grouped_mm_weight_grad(x, grad_y, torch.tensor([0, 256]), 1)
    assert grad_w.dtype == torch.bfloat16
    want = x.float().t() @ grad_y.float()
    assert ((grad_w[0].float() - want).abs() / want).max() <= 2 * 2.0**-8
