"""The workload that tests/memcheck/run.py runs under a memory checker: a short training loop of
two SoftMoE layers under a GlobalBudget, inference, and every compiled op (forward and backward)
directly, including the dtypes, the truncation of over-full rows and the error paths that raise
from inside the extension (a scratch buffer that is not freed before an exception is a leak).

Sizes are small because valgrind runs it ~50x slower, but tokens are above the CPU grain of the
row ops (2048 rows at E = 8) and the 256-token dispatch chunks, so the multi-chunk paths run too.
It checks its results loosely (finite, the right sums): a checker run is only worth something if
the workload really took the paths it claims to.

    python3 tests/memcheck/loop.py        # plain run, ~5 s
"""
import sys

import torch

import softmoe
from softmoe import GlobalBudget, SoftMoELayer
from softmoe.baselines import TopKMoE

TOKENS = 2304  # > 2048 rows (soft_topk grain at E = 8) and 9 dispatch chunks of 256
D_MODEL, D_HIDDEN, EXPERTS = 16, 32, 8


def check(cond: bool, what: str) -> None:
    if not cond:
        raise AssertionError(f"memcheck loop: {what}")


def expect_error(fn, what: str) -> None:
    try:
        fn()
    except (RuntimeError, ValueError, TypeError, IndexError):
        return
    raise AssertionError(f"memcheck loop: expected an error from {what}")


def training_loop() -> None:
    layers = torch.nn.ModuleList([SoftMoELayer(D_MODEL, D_HIDDEN, EXPERTS, k=2.0, eps=1e-2) for _ in range(2)])
    budget = GlobalBudget(layers, mean_k=2.0)
    head = torch.nn.Linear(D_MODEL, D_MODEL)
    params = list(layers.parameters()) + list(budget.parameters()) + list(head.parameters())
    opt = torch.optim.Adam(params, lr=1e-2)
    x = torch.randn(TOKENS, D_MODEL)
    target = torch.randn(TOKENS, D_MODEL)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        h = x
        for layer in layers:
            h = h + layer(h)
        loss = torch.nn.functional.mse_loss(head(h), target)
        loss.backward()
        check(torch.isfinite(loss).item(), "training loss is not finite")
        check(budget.theta.grad is not None and torch.isfinite(budget.theta.grad).all().item(),
              "the budget got no finite gradient")
        opt.step()
    with torch.inference_mode():
        y = layers[0].inference(x.reshape(48, 48, D_MODEL))
    check(y.shape == (48, 48, D_MODEL) and torch.isfinite(y).all().item(), "inference output")
    # the same op chain on the baseline (k = top_k, no soft top-k)
    topk = TopKMoE(D_MODEL, D_HIDDEN, EXPERTS, top_k=2)
    xg = x.clone().requires_grad_(True)
    (topk(xg).sum() + topk.aux_loss).backward()
    check(xg.grad is not None and torch.isfinite(xg.grad).all().item(), "TopKMoE gradient")


def soft_topk_ops() -> None:
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        scores = torch.randn(TOKENS, EXPERTS, dtype=torch.float32).to(dtype).requires_grad_(True)
        for eps, max_active in ((1e-2, 4), (0.0, EXPERTS), (0.0, 3)):
            k = torch.full((TOKENS,), 2.5, dtype=torch.float32, requires_grad=True)  # one k per row
            alpha = torch.tensor(0.7, requires_grad=True)  # shared alpha: the reduced-gradient path
            p = softmoe.soft_topk(scores, k, alpha, eps=eps, max_active=max_active)
            (p.float() * torch.linspace(-1, 1, EXPERTS)).sum().backward()
            sums = p.float().sum(-1)
            tol = 0.05 if dtype in (torch.bfloat16, torch.float16) else 1e-3
            check(bool(((sums - 2.5).abs() < tol).all()), f"soft_topk sums ({dtype}, eps={eps})")
            check(torch.isfinite(k.grad).all().item() and torch.isfinite(alpha.grad).all().item(),
                  f"soft_topk k/alpha gradients ({dtype}, eps={eps})")
            scores.grad = None
        # experts along dim 0 with a strided input, and an all-inf row (never selected -> NaN row)
        s = torch.randn(EXPERTS, 64, dtype=torch.float32).to(dtype)
        s[:, 3] = float("-inf")
        softmoe.soft_topk(s, 2.0, 1.0, dim=0, eps=1e-2, max_active=3)
        softmoe.soft_topk(torch.randn(0, EXPERTS).to(dtype), 2.0)  # zero rows
    expect_error(lambda: softmoe.soft_topk(torch.randn(4, EXPERTS), 2.0, eps=0.7), "soft_topk eps=0.7")
    expect_error(lambda: torch.ops.softmoe.soft_topk(torch.randn(4, EXPERTS), torch.ones(3), torch.ones(()), 0.0, 4),
                 "soft_topk with a k of the wrong shape")
    expect_error(lambda: softmoe.soft_topk(torch.randn(4, EXPERTS), torch.full((4,), 9.0), strict=True),
                 "soft_topk strict with k out of range")


def dispatch_ops() -> None:
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        M = 3
        p = torch.rand(TOKENS, EXPERTS, dtype=dtype)
        p[p < 0.6] = 0  # ~3.2 active per row: many rows exceed M and are truncated
        p[::7] = 0  # tokens routed nowhere
        plan = softmoe.dispatch_plan(p, M)
        n = int(plan.offsets[-1])
        check(0 < n <= TOKENS * M and int((plan.pair_token >= 0).sum()) == n, f"dispatch_plan pairs ({dtype})")
        x = torch.randn(TOKENS, D_MODEL, dtype=dtype, requires_grad=True)
        w_in = torch.randn(EXPERTS, D_MODEL, D_HIDDEN, dtype=dtype, requires_grad=True)
        w_out = torch.randn(EXPERTS, D_HIDDEN, D_MODEL, dtype=dtype, requires_grad=True)
        # the full plan (T * M slots, as compiled code uses) and the trimmed one (N routed slots, eager)
        for use in (plan, plan.trim()):
            pw = p.clone().requires_grad_(True)
            xs = softmoe.gather_rows(x, use)
            check(xs.shape[0] == use.pair_token.shape[0], f"gather_rows rows ({dtype})")
            ys = softmoe.grouped_mm(torch.relu(softmoe.grouped_mm(xs, w_in, use.offsets)), w_out, use.offsets)
            y = softmoe.combine_rows(ys, pw, use)
            y.float().square().sum().backward()
            for name, t in (("x", x), ("w_in", w_in), ("w_out", w_out), ("p", pw)):
                check(t.grad is not None and torch.isfinite(t.grad.float()).all().item(), f"{name} gradient ({dtype})")
        # leading dimensions flattened by the wrappers
        plan3 = softmoe.dispatch_plan(p.reshape(48, 48, EXPERTS), M)
        softmoe.combine_rows(softmoe.gather_rows(x.detach().reshape(48, 48, D_MODEL), plan3), p.reshape(48, 48, EXPERTS), plan3)
    empty = softmoe.dispatch_plan(torch.zeros(0, EXPERTS), 2)
    softmoe.gather_rows(torch.zeros(0, D_MODEL), empty)
    # nothing routed: the trimmed plan has no slots at all (empty ys and pair_expert)
    none = softmoe.dispatch_plan(torch.zeros(16, EXPERTS), 2).trim()
    xn = torch.randn(16, D_MODEL, requires_grad=True)
    yn = softmoe.combine_rows(softmoe.gather_rows(xn, none), torch.zeros(16, EXPERTS), none)
    yn.sum().backward()
    check(none.pair_token.numel() == 0 and bool((yn == 0).all()), "combine of an empty trimmed plan")
    # index errors are found inside the C core after its scratch is allocated
    p = torch.rand(64, EXPERTS)
    plan = softmoe.dispatch_plan(p, 2)
    bad_token = plan.pair_token.clone()
    bad_token[0] = 10**6
    bad_pairs = plan.token_pairs.clone()
    bad_pairs[5, 0] = 10**6
    x = torch.randn(64, D_MODEL)
    ys = torch.randn(128, D_MODEL)
    expect_error(lambda: torch.ops.softmoe.gather_rows(x, bad_token, plan.token_pairs), "gather_rows bad pair_token")
    expect_error(lambda: torch.ops.softmoe.gather_rows_backward(ys, bad_pairs), "gather_rows_backward bad token_pairs")
    expect_error(lambda: torch.ops.softmoe.combine_rows(ys, p, plan.pair_token, plan.pair_expert, bad_pairs),
                 "combine_rows bad token_pairs")
    expect_error(lambda: softmoe.grouped_mm(ys, torch.randn(EXPERTS, D_MODEL, 4), torch.tensor([0, 200] + [200] * 7)),
                 "grouped_mm offsets beyond the rows")
    expect_error(lambda: softmoe.expert_ffn(ys, torch.randn(EXPERTS, D_MODEL, 8), torch.randn(EXPERTS, 4, 3),
                                            torch.tensor([0, 200] + [200] * 7)), "expert_ffn offsets beyond the rows")


def expert_ffn_ops() -> None:
    """The fused expert FFN in both activations, with and without the kept pre-activation, and an
    output of 8 MB or more (the huge-page allocator), through forward and backward."""
    for activation, width in (("swiglu", 2 * D_HIDDEN), ("gelu", D_HIDDEN)):
        offsets = torch.tensor([0, 5, 5, 40, 41, 90, 90, 90, 120])  # empty segments, 8 padding rows
        x = torch.randn(128, D_MODEL, requires_grad=True)
        w_in = torch.randn(EXPERTS, D_MODEL, width, requires_grad=True)
        w_out = torch.randn(EXPERTS, D_HIDDEN, D_MODEL, requires_grad=True)
        y = softmoe.expert_ffn(x, w_in, w_out, offsets, activation)
        y.square().sum().backward()
        check(bool((y[120:] == 0).all()) and torch.isfinite(x.grad).all().item(), f"expert_ffn {activation}")
        with torch.no_grad():
            check(torch.equal(softmoe.expert_ffn(x, w_in, w_out, offsets, activation), y), f"expert_ffn no_grad {activation}")
    big = softmoe.expert_ffn(torch.randn(4096, 8), torch.randn(2, 8, 16), torch.randn(2, 8, 512), torch.tensor([0, 2048, 4096]))
    big.resize_(8192, 512)
    big[4096:] = 1.0
    check(big.shape == (8192, 512) and bool((big[4096:] == 1).all()), "huge-page output resized")


def main() -> int:
    torch.manual_seed(0)
    # two threads: the CPU ops split rows and dispatch chunks across at::parallel_for workers
    torch.set_num_threads(2)
    training_loop()
    soft_topk_ops()
    dispatch_ops()
    expert_ffn_ops()
    print(f"memcheck loop: ok (softmoe._C from {softmoe._C.__file__})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
