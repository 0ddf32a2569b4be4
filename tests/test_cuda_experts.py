"""The CUDA path beyond soft top-k parity (test_cuda.py): the grouped expert compute against the CPU's,
its fixed launch count and absence of host syncs, float32 accumulation of 16-bit weight gradients,
device checks of every op, the dispatch ops on side streams and on grids that need their
grid-stride loops, a plan of more than 1,024 scan tiles, a layer step captured in a CUDA graph
(by hand and through torch.compile(mode="reduce-overhead")), and the soft top-k backward's device
guard and launch shape. Skipped without a GPU or a CUDA build; benchmarks/gpu/run_all.sh runs them."""
import ctypes

import pytest
import torch

import softmoe
from softmoe import _C, ops

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        torch.cuda.is_available() and not torch._C._dispatch_has_kernel_for_dispatch_key("softmoe::grouped_mm", "CUDA"),
        reason="softmoe was built without CUDA kernels (rebuild with a CUDA torch and nvcc)",
    ),
]

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
TOL = {F64: 1e-10, F32: 1e-4, BF16: 5e-2}


@pytest.fixture(params=["auto", "softmoe"])
def impl(request, monkeypatch):
    """auto: torch's grouped GEMM where it applies (bfloat16 on sm_90 / sm_100), softmoe's kernels
    elsewhere; softmoe: softmoe's kernels always (SOFTMOE_TORCH_GROUPED_MM=0)."""
    if request.param == "softmoe":
        monkeypatch.setenv("SOFTMOE_TORCH_GROUPED_MM", "0")
    return request.param


def _offsets(rows_per_expert, device="cuda"):
    counts = torch.tensor(rows_per_expert, dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(device)


def _ffn_operands(experts, rows, d, h, dtype, act="swiglu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = 2 * h if act == "swiglu" else h
    x = torch.randn(rows, d, generator=gen, dtype=F64).to(dtype)
    w_in = (torch.randn(experts, d, width, generator=gen, dtype=F64) / d ** 0.5).to(dtype)
    w_out = (torch.randn(experts, h, d, generator=gen, dtype=F64) / h ** 0.5).to(dtype)
    return x, w_in, w_out


def _segments(experts, rows, seed=0):
    """Segment lengths with empty experts and a few padding rows left over."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 2 * rows // experts + 1, (experts,), generator=gen)
    lengths[:: max(1, experts // 3)] = 0
    while int(lengths.sum()) > rows - 3:
        lengths = lengths // 2
    return lengths.tolist()


def _close(a, b, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(a.cpu().double(), b.cpu().double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [F32, F64, BF16])
@pytest.mark.parametrize("experts", [1, 8, 64])
@pytest.mark.parametrize("act", ["swiglu", "gelu"])
def test_expert_ffn_matches_cpu(dtype, experts, act, impl):
    rows = 300
    x, w_in, w_out = _ffn_operands(experts, rows, 24, 40, dtype, act)
    offsets = _offsets(_segments(experts, rows), "cpu")
    results = {}
    for device in ("cpu", "cuda"):
        xs, wi, wo = (t.to(device).requires_grad_(True) for t in (x, w_in, w_out))
        y = softmoe.expert_ffn(xs, wi, wo, offsets.to(device), act)
        grad = torch.linspace(-1, 1, y.numel(), dtype=F64).reshape(y.shape).to(device=device, dtype=dtype)
        y.backward(grad)
        results[device] = (y, xs.grad, wi.grad, wo.grad)
    for a, b in zip(results["cpu"], results["cuda"]):
        _close(a, b, dtype)
    end = int(offsets[-1])
    assert (results["cuda"][0][end:] == 0).all() and (results["cuda"][1][end:] == 0).all()  # padding rows


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_grouped_mm_and_weight_grad_match_cpu(dtype, impl):
    experts, rows = 16, 500
    x, w, _ = _ffn_operands(experts, rows, 32, 24, dtype, "gelu")
    offsets = _offsets(_segments(experts, rows, seed=3), "cpu")
    out = {}
    for device in ("cpu", "cuda"):
        xs, ws = x.to(device).requires_grad_(True), w.to(device).requires_grad_(True)
        y = softmoe.grouped_mm(xs, ws, offsets.to(device))
        y.backward(torch.ones_like(y))
        out[device] = (y, xs.grad, ws.grad)
    for a, b in zip(out["cpu"], out["cuda"]):
        _close(a, b, dtype)


def test_transposed_and_strided_operands():
    x, w, _ = _ffn_operands(4, 200, 16, 12, F32, "gelu")
    offsets = _offsets([50, 0, 100, 40])
    xt = x.t().contiguous().t().cuda()  # column-major x
    wt = w.transpose(1, 2).contiguous().transpose(1, 2).cuda()
    expected = softmoe.grouped_mm(x.cuda(), w.cuda(), offsets)
    torch.testing.assert_close(softmoe.grouped_mm(xt, wt, offsets), expected, atol=1e-5, rtol=1e-5)


def test_invalid_offsets_give_defined_output_without_sync(impl):
    # The GPU does not read offsets on the host (no sync), so it cannot raise for bad ones: they are
    # clamped to valid bounds, every output row written once.
    x, w, _ = _ffn_operands(3, 64, 8, 8, BF16, "gelu")
    bad = torch.tensor([5, 40, 20, 1000], dtype=torch.int64, device="cuda")  # offsets[0] != 0, decreasing, > rows
    y = softmoe.grouped_mm(x.cuda(), w.cuda(), bad)
    expected = softmoe.grouped_mm(x.cuda(), w.cuda(), torch.tensor([0, 40, 40, 64], device="cuda"))
    torch.testing.assert_close(y, expected)


def _kernel_count(fn):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def test_launches_do_not_grow_with_experts(impl):
    counts = {}
    for experts in (4, 64, 256):
        x, w_in, w_out = _ffn_operands(experts, 2048, 32, 16, BF16)
        args = [t.cuda().requires_grad_(True) for t in (x, w_in, w_out)]
        offsets = _offsets([2048 // experts] * experts)

        def step():
            softmoe.expert_ffn(*args, offsets).sum().backward()

        counts[experts] = _kernel_count(step)
    assert len(set(counts.values())) == 1, counts


def test_layer_step_launches_do_not_grow_with_experts():
    counts = {}
    for experts in (8, 64):
        torch.manual_seed(0)
        layer = softmoe.SoftMoELayer(64, 32, experts, k=2.0, max_active=4, device="cuda")
        x = torch.randn(512, 64, device="cuda", requires_grad=True)
        counts[experts] = _kernel_count(lambda: layer(x).sum().backward())
    assert counts[8] == counts[64], counts


def test_expert_compute_never_syncs(impl):
    x, w_in, w_out = (t.cuda().requires_grad_(True) for t in _ffn_operands(8, 256, 16, 16, BF16))
    offsets = _offsets([32] * 8)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = softmoe.expert_ffn(x, w_in, w_out, offsets)
        y.sum().backward()
        softmoe.grouped_mm(x, w_out.transpose(1, 2), offsets).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_bf16_weight_gradient_accumulates_in_float32(impl):
    # one expert of 16,384 rows: a 16-bit running sum over chunks would lose most of the bits that
    # the float32 accumulation keeps (error ~ a bf16 ulp of the result, not ~ rows * ulp)
    rows = 16384
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(rows, 8, generator=gen, dtype=F64)
    g = torch.rand(rows, 8, generator=gen, dtype=F64)
    exact = x.t() @ g
    grad_w = torch.ops.softmoe.grouped_mm_weight_grad(x.to(BF16).cuda(), g.to(BF16).cuda(), _offsets([rows]), 1)[0]
    rounded = x.to(BF16).double().t() @ g.to(BF16).double()
    rel = ((grad_w.double().cpu() - rounded) / rounded).abs().max().item()
    assert rel <= 2 ** -8, rel  # one rounding to bf16 at the end
    assert ((grad_w.double().cpu() - exact) / exact).abs().max().item() < 0.02


def _mixed_device_calls():
    cpu, dev = "cpu", "cuda"
    x = torch.randn(8, 4, device=dev)
    p = softmoe.soft_topk(torch.randn(8, 6, device=dev), 2.0, eps=1e-2, max_active=3)
    plan = softmoe.dispatch_plan(p, 3)
    offs = _offsets([4, 4])
    w = torch.randn(2, 4, 4, device=dev)
    w_in, w_out = torch.randn(2, 4, 8, device=dev), torch.randn(2, 4, 4, device=dev)
    hidden = torch.zeros(8, 8, device=dev)
    scores = torch.randn(8, 6, device=dev)
    pp, th = torch.ops.softmoe.soft_topk(scores, torch.tensor(2.0, device=dev), torch.tensor(1.0, device=dev), 0.01, 3)
    k1, a1 = torch.tensor(2.0, device=dev), torch.tensor(1.0, device=dev)
    xs = ops.gather_rows(torch.randn(8, 4, device=dev), plan)
    return {
        "soft_topk_backward grad_p": lambda: torch.ops.softmoe.soft_topk_backward(
            torch.ones(8, 6, device=cpu), scores, pp, th, k1, a1, 0.01, 3),
        "soft_topk_backward threshold": lambda: torch.ops.softmoe.soft_topk_backward(
            torch.ones_like(scores), scores, pp, th.cpu(), k1, a1, 0.01, 3),
        "soft_topk k": lambda: torch.ops.softmoe.soft_topk(scores, k1.cpu(), a1, 0.01, 3),
        "gather_rows token_pairs": lambda: torch.ops.softmoe.gather_rows(x, plan.pair_token, plan.token_pairs.cpu()),
        "gather_rows_backward": lambda: torch.ops.softmoe.gather_rows_backward(xs, plan.token_pairs.cpu()),
        "combine_rows p": lambda: torch.ops.softmoe.combine_rows(xs, p.cpu(), *plan[1:]),
        "combine_rows_backward grad_y": lambda: torch.ops.softmoe.combine_rows_backward(
            torch.ones(8, 4), xs, p, *plan[1:]),
        "matmul": lambda: torch.ops.softmoe.matmul(x, torch.randn(4, 4)),
        "grouped_mm offsets": lambda: torch.ops.softmoe.grouped_mm(x, w, offs.cpu()),
        "grouped_mm_weight_grad grad_y": lambda: torch.ops.softmoe.grouped_mm_weight_grad(x, x.cpu(), offs, 2),
        "grouped_mm_weight_grad offsets": lambda: torch.ops.softmoe.grouped_mm_weight_grad(x, x, offs.cpu(), 2),
        "expert_ffn w_out": lambda: torch.ops.softmoe.expert_ffn(x, w_in, w_out.cpu(), offs, "swiglu", True),
        "expert_ffn_backward hidden": lambda: torch.ops.softmoe.expert_ffn_backward(
            x, x, hidden.cpu(), w_in, w_out, offs, "swiglu", [True, True, True]),
        "expert_ffn_backward grad_y": lambda: torch.ops.softmoe.expert_ffn_backward(
            x.cpu(), x, hidden, w_in, w_out, offs, "swiglu", [True, True, True]),
    }


MIXED_DEVICE_CASES = [
    "soft_topk_backward grad_p", "soft_topk_backward threshold", "soft_topk k", "gather_rows token_pairs",
    "gather_rows_backward", "combine_rows p", "combine_rows_backward grad_y", "matmul", "grouped_mm offsets",
    "grouped_mm_weight_grad grad_y", "grouped_mm_weight_grad offsets", "expert_ffn w_out",
    "expert_ffn_backward hidden", "expert_ffn_backward grad_y",
]


def test_mixed_device_cases_are_all_listed():
    assert sorted(_mixed_device_calls()) == sorted(MIXED_DEVICE_CASES)


@pytest.mark.parametrize("case", MIXED_DEVICE_CASES)
def test_mixed_devices_raise(case):
    with pytest.raises(RuntimeError, match="device"):
        _mixed_device_calls()[case]()


def test_dispatch_ops_on_a_side_stream():
    torch.manual_seed(0)
    p = softmoe.soft_topk(torch.randn(3000, 16, device="cuda"), 2.0, eps=1e-2, max_active=4)
    x = torch.randn(3000, 32, device="cuda")

    def run():
        plan = softmoe.dispatch_plan(p, 4)
        xs = ops.gather_rows(x, plan)
        return plan, xs, ops.combine_rows(xs * 2, p, plan)

    expected = run()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run()
    torch.cuda.current_stream().wait_stream(side)
    for a, b in zip(expected[0], got[0]):
        assert torch.equal(a, b)
    assert torch.equal(expected[1], got[1]) and torch.equal(expected[2], got[2])


def test_gather_and_combine_grids_need_their_grid_stride_loops():
    # 2-D kernels: 8 rows per block and at most 65,535 blocks, so > 524,280 slots loop
    tokens, experts, m = 300_000, 4, 2
    p = torch.zeros(tokens, experts, device="cuda")
    p[:, 0], p[:, 3] = 0.25, 0.75
    x = torch.randn(tokens, 4, device="cuda")
    plan = softmoe.dispatch_plan(p, m)
    assert plan.pair_token.numel() == 600_000
    xs = ops.gather_rows(x, plan)
    assert torch.equal(xs[: tokens], x) and torch.equal(xs[tokens:], x)
    torch.testing.assert_close(ops.combine_rows(xs, p, plan), x)
    cpu_plan = softmoe.dispatch_plan(p.cpu(), m)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(plan, cpu_plan))


def test_plan_of_more_than_1024_scan_tiles():
    # the scan runs over E * ceil(T / 32) counters in tiles of 4,096: 2,048 experts and 70,000 tokens
    # make 1,094 tiles (> 1,024, the threads of the block that scans the tile sums)
    tokens, experts = 70_000, 2048
    gen = torch.Generator(device="cuda").manual_seed(0)
    p = (torch.rand(tokens, experts, device="cuda", generator=gen) > 0.999).float()
    plan = softmoe.dispatch_plan(p, 4)
    cpu_plan = softmoe.dispatch_plan(p.cpu(), 4)
    for a, b in zip(plan, cpu_plan):
        assert torch.equal(a.cpu(), b)


def _layer_and_input():
    torch.manual_seed(0)
    layer = softmoe.SoftMoELayer(32, 16, 8, k=2.0, max_active=4, device="cuda")
    x = torch.randn(256, 32, device="cuda", requires_grad=True)
    return layer, x


def test_layer_step_in_a_cuda_graph():
    layer, x = _layer_and_input()
    y_eager = layer(x)
    y_eager.sum().backward()
    eager = (y_eager.detach().clone(), x.grad.clone(), layer.experts.w_in.grad.clone())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch's docs ask
        for _ in range(2):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    x.grad = None
    layer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
        y.sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    # the graph keeps the untrimmed plan's padding rows (no host read while capturing): same result
    torch.testing.assert_close(y, eager[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, eager[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.experts.w_in.grad, eager[2], atol=1e-5, rtol=1e-5)


def test_layer_step_under_reduce_overhead_compile():
    layer, x = _layer_and_input()
    expected = layer(x).detach()
    step = torch.compile(lambda t: layer(t), mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        y = step(x)
        y.sum().backward()
    torch.testing.assert_close(y.detach(), expected, atol=1e-5, rtol=1e-5)


def test_soft_topk_backward_on_a_side_stream_with_scalar_k():
    torch.manual_seed(0)
    scores = torch.randn(5000, 64, device="cuda")
    grad = torch.randn_like(scores)

    def run():
        s = scores.clone().requires_grad_(True)
        k = torch.tensor(3.0, device="cuda", requires_grad=True)
        p = softmoe.soft_topk(s, k, 0.5, eps=1e-2, max_active=8)
        gs, gk = torch.autograd.grad(p, (s, k), grad)
        return p.detach(), gs, gk

    expected = run()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_soft_topk_backward_on_another_device_than_the_current_one():
    torch.manual_seed(0)
    scores = torch.randn(4096, 32)
    grad = torch.randn_like(scores)
    results = {}
    for device in ("cuda:0", "cuda:1"):
        with torch.cuda.device(0):  # the current device stays 0
            s = scores.to(device).requires_grad_(True)
            k = torch.tensor(2.0, device=device, requires_grad=True)
            p = softmoe.soft_topk(s, k, 1.0, eps=1e-2, max_active=4)
            results[device] = [t.cpu() for t in torch.autograd.grad(p, (s, k), grad.to(device))]
    for a, b in zip(results["cuda:0"], results["cuda:1"]):
        assert torch.equal(a, b)


def test_soft_topk_launch_reaches_every_multiprocessor_at_4096_rows():
    lib = ctypes.CDLL(_C.__file__)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    threads, block = ctypes.c_int64(), ctypes.c_int()
    lib.smoe_cuda_topk_shape(ctypes.c_int64(4096), ctypes.c_size_t(2080), ctypes.c_int(sms), ctypes.byref(threads),
                             ctypes.byref(block))
    assert -(-threads.value // block.value) >= min(sms, 4096 // 32)


def test_soft_topk_workspace_is_bounded():
    # 200,000 rows of E = 256, float64, max_active = 256: 7,168 B of scratch per row; one thread per
    # row would take 1.4 GB, the launch shape caps the workspace at 64 MiB
    scores = torch.randn(200_000, 256, device="cuda", dtype=F64)
    k, alpha = torch.tensor(2.0, device="cuda", dtype=F64), torch.tensor(1.0, device="cuda", dtype=F64)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    p, threshold = torch.ops.softmoe.soft_topk(scores, k, alpha, 0.0, 256)
    torch.cuda.synchronize()
    outputs = p.numel() * 8 + threshold.numel() * 8
    assert torch.cuda.max_memory_allocated() - before <= outputs + (64 << 20) + (1 << 20)
    torch.testing.assert_close(p.sum(-1), torch.full((200_000,), 2.0, device="cuda", dtype=F64))
