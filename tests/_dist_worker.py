"""One rank of a tests/test_parallel.py scenario: ``python _dist_worker.py SCENARIO RANK WORLD STORE``.

Every rank joins a gloo group over loopback (a FileStore rendezvous, no ports), runs the scenario
and its assertions, and exits 0; an assertion or error exits non-zero with the traceback. The
single-process references are computed on every rank from the same seeds (the sizes are tiny).
"""
import datetime
import os
import sys
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import softmoe
from softmoe import parallel

D_MODEL, D_HIDDEN = 16, 12


def check_close(name, got, want, rtol=1e-9, atol=1e-11):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs reference {tuple(want.shape)}"
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        err = (got - want).abs().max().item()
        raise AssertionError(f"{name}: differs from the single-process reference (max abs error {err:.3e})")


def token_chunks(world, base=9):
    """Unequal token counts per rank (variable split sizes): rank r holds base + 2 r tokens."""
    sizes = [base + 2 * r for r in range(world)]
    starts = [sum(sizes[:r]) for r in range(world)]
    return sizes, starts


def make_layer(seed, num_experts, group=None, **kw):
    torch.manual_seed(seed)
    layer = softmoe.SoftMoELayer(D_MODEL, D_HIDDEN, num_experts, k=1.5, max_active=3, expert_group=group, **kw)
    return layer.double()


def all_sum(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


# ---- scenarios ---------------------------------------------------------------------------------


def ep_forward_backward(rank, world, num_experts, activation, combine):
    """Expert-parallel forward and backward equal the single-process layer on the same weights."""
    ref = make_layer(3, num_experts, activation=activation, combine=combine)
    ep = make_layer(3, num_experts, group=dist.group.WORLD, activation=activation, combine=combine)
    count = num_experts // world
    assert ep.experts.w_in.shape[0] == count and ep.expert_shard.first == rank * count
    # the sharded experts are a module with GroupedExperts' forward(xs, offsets) contract
    assert isinstance(ep.experts, parallel.ShardedExperts) and isinstance(ep.experts, softmoe.GroupedExperts)
    assert ep.experts.shard is ep.expert_shard
    # Same seed -> the shard holds exactly the reference's experts (no state dict needed).
    check_close("w_in shard at construction", ep.experts.w_in, ref.experts.w_in[rank * count : (rank + 1) * count], 0, 0)
    check_close("router at construction", ep.router.weight, ref.router.weight, 0, 0)

    sizes, starts = token_chunks(world)
    g = torch.Generator().manual_seed(11)
    x_all = torch.randn(sum(sizes), D_MODEL, generator=g, dtype=torch.float64)
    grad_all = torch.randn(sum(sizes), D_MODEL, generator=g, dtype=torch.float64)
    lo, hi = starts[rank], starts[rank] + sizes[rank]

    x_ref = x_all.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    (y_ref * grad_all).sum().backward()

    x = x_all[lo:hi].clone().requires_grad_(True)
    parallel.reset_comm_stats()
    y = ep(x)
    forward_stats = parallel.comm_stats()
    (y * grad_all[lo:hi]).sum().backward()

    check_close("forward output", y, y_ref[lo:hi])
    check_close("input gradient", x.grad, x_ref.grad[lo:hi])
    # Replicated parameters: each rank holds the gradient of its own tokens; their sum is the
    # single-process gradient (DDP's average then divides both sides by W).
    check_close("router gradient (sum over ranks)", all_sum(ep.router.weight.grad), ref.router.weight.grad)
    check_close("k_logit gradient (sum over ranks)", all_sum(ep.k_logit.grad), ref.k_logit.grad)
    # Expert parameters already hold every rank's contribution.
    sl = slice(rank * count, (rank + 1) * count)
    check_close("expert w_in gradient", ep.experts.w_in.grad, ref.experts.w_in.grad[sl])
    check_close("expert w_out gradient", ep.experts.w_out.grad, ref.experts.w_out.grad[sl])

    # Only active (token, expert) pairs travel: this rank sends its routed pairs N_r and returns the
    # rows of every rank's pairs routed to its experts.
    with torch.no_grad():
        active = ep.route(x.detach())[1] != 0
    routed_here = int(active.sum())
    routed_to_me = int(all_sum(active.sum(0))[sl].sum())
    assert forward_stats["exchanges"] == 2, forward_stats
    assert forward_stats["rows_sent"] == routed_here + routed_to_me, (forward_stats, routed_here, routed_to_me)
    assert forward_stats["bytes_sent"] == forward_stats["rows_sent"] * D_MODEL * 8
    assert all_sum(torch.tensor(routed_here)) < sum(sizes) * ep.max_active, \
        "the test input must leave some tokens below max_active"
    stats = parallel.comm_stats()
    assert stats["exchanges"] == 4 and stats["rows_sent"] == 2 * forward_stats["rows_sent"], stats

    # Checkpoints: gathering the shards gives the single-process state dict; loading it back into a
    # fresh sharded layer built from another seed restores this rank's slice.
    full = parallel.full_state_dict(ep)
    for key, value in ref.state_dict().items():
        if isinstance(value, torch.Tensor):
            check_close(f"full_state_dict[{key}]", full[key], value, 0, 0)
    other = make_layer(4, num_experts, group=dist.group.WORLD, activation=activation, combine=combine)
    parallel.load_full_state_dict(other, ref.state_dict())
    check_close("loaded shard", other.experts.w_out, ep.experts.w_out, 0, 0)
    try:
        other.load_state_dict(ref.state_dict())
    except ValueError as exc:
        assert "expert_shard" in str(exc), exc
    else:
        raise AssertionError("loading a full state dict into a sharded layer must fail")

    # Inference mode takes the same path without autograd.
    check_close("inference", ep.inference(x.detach()), y_ref[lo:hi])


def scenario_ep2(rank, world):
    ep_forward_backward(rank, world, num_experts=4, activation="swiglu", combine="normalized")
    # A 1-D DeviceMesh, or one named dimension of a mesh, works like its process group.
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    x = torch.randn(7, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    want = make_layer(3, 4, group=dist.group.WORLD)(x)
    check_close("1-D DeviceMesh", make_layer(3, 4, group=mesh)(x), want, 0, 0)
    check_close("(DeviceMesh, dim)", make_layer(3, 4, group=(mesh, "ep"))(x), want, 0, 0)
    expect_error(ValueError, ["'tp'"], lambda: make_layer(3, 4, group=(mesh, "tp")))
    # Built on the meta device (no full expert weights allocated), then loaded from a full checkpoint.
    lazy = make_layer(9, 4, group=dist.group.WORLD, device="meta").to_empty(device="cpu")
    parallel.load_full_state_dict(lazy, make_layer(3, 4).state_dict())
    check_close("meta-built layer loaded from a full checkpoint", lazy(x), want, 0, 0)


def all_to_all_twice_differentiable(rank, world):
    """The exchange is linear and its backward is the reverse exchange, itself differentiable: with
    y = A x and g = A^T v taken with create_graph=True, d<g, w>/dv = A w."""
    in_splits = [1 + 2 * rank + r for r in range(world)]  # rows sent to rank r
    out_splits = [1 + 2 * r + rank for r in range(world)]  # rows rank r sends here
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(sum(in_splits), 3, dtype=torch.float64, generator=gen, requires_grad=True)
    y = parallel._AllToAll.apply(x, out_splits, in_splits, dist.group.WORLD, rank)
    v = torch.randn(y.shape, dtype=torch.float64, generator=gen, requires_grad=True)
    (g,) = torch.autograd.grad(y, x, v, create_graph=True)
    assert g.requires_grad, "the exchange's backward is not differentiable"
    w = torch.randn(g.shape, dtype=torch.float64, generator=gen)
    (grad_v,) = torch.autograd.grad(g, v, w)
    check_close("second-order gradient through the exchange", grad_v,
                parallel._AllToAll.apply(w, out_splits, in_splits, dist.group.WORLD, rank), 0, 0)


def scenario_ep4(rank, world):
    all_to_all_twice_differentiable(rank, world)
    ep_forward_backward(rank, world, num_experts=8, activation="gelu", combine="sum")  # 2 experts per rank
    ep_forward_backward(rank, world, num_experts=4, activation="swiglu", combine="normalized")  # 1 per rank


def scenario_empty_rank(rank, world):
    """The experts of ranks >= 1 get no token at all: forward, backward and an optimizer step work
    and match the single-process layer (their experts get zero gradients, not None)."""
    num_experts = 2 * world

    def forced(layer):
        # Tokens have feature 0 = +4: experts 0 and 1 score +20, all others -20 -> exact zeros.
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[:2, 0] = 5.0
            layer.router.weight[0, 1] = 0.5  # break the tie between experts 0 and 1
            layer.router.weight[2:, 0] = -5.0
        return layer

    ref = forced(make_layer(5, num_experts))
    ep = forced(make_layer(5, num_experts, group=dist.group.WORLD))
    sizes, starts = token_chunks(world, base=6)
    g = torch.Generator().manual_seed(12)
    x_all = torch.randn(sum(sizes), D_MODEL, generator=g, dtype=torch.float64)
    x_all[:, 0] = 4.0
    lo, hi = starts[rank], starts[rank] + sizes[rank]
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = torch.optim.AdamW(ep.parameters(), lr=1e-2)
    for step in range(2):
        y_ref = ref(x_all)
        y_ref.square().mean().backward()
        y = ep(x_all[lo:hi])
        # mean over the global batch: each rank's sum divided by the global count
        (y.square().sum() / (y_ref.numel())).backward()
        per_expert = all_sum(ep.last_stats["tokens_per_expert"])
        assert per_expert[2:].sum() == 0 and per_expert[:2].sum() > 0, per_expert
        check_close(f"step {step} output", y, y_ref[lo:hi])
        if rank >= 1:
            assert ep.experts.w_in.grad is not None and ep.experts.w_in.grad.abs().sum() == 0
        for p in (ep.router.weight, ep.k_logit):
            dist.all_reduce(p.grad)
        check_close(f"step {step} router gradient", ep.router.weight.grad, ref.router.weight.grad)
        sl = slice(rank * 2, rank * 2 + 2)
        check_close(f"step {step} expert gradient", ep.experts.w_out.grad, ref.experts.w_out.grad[sl])
        opt_ref.step(), opt.step()
        opt_ref.zero_grad(), opt.zero_grad()
    check_close("trained experts", ep.experts.w_in, ref.experts.w_in[rank * 2 : rank * 2 + 2])


class SmallModel(nn.Module):
    """Linear -> 2 residual SoftMoE layers under a GlobalBudget -> Linear."""

    def __init__(self, num_experts, group=None):
        super().__init__()
        self.inp = nn.Linear(D_MODEL, D_MODEL)
        self.norms = nn.ModuleList(nn.LayerNorm(D_MODEL) for _ in range(2))
        self.moe = nn.ModuleList(
            softmoe.SoftMoELayer(D_MODEL, D_HIDDEN, num_experts, k=1.5, max_active=3, expert_group=group)
            for _ in range(2)
        )
        self.out = nn.Linear(D_MODEL, D_MODEL)
        self.budget = softmoe.GlobalBudget(self.moe, mean_k=1.5)

    def forward(self, x):
        h = self.inp(x)
        for norm, layer in zip(self.norms, self.moe):
            h = h + layer(norm(h))
        return self.out(h)


MAX_NORM = 0.1


def train_equivalence(rank, world, wrapper, expert_parallel, steps=3):
    """W ranks, each on its share of the global batch, under DDP / FSDP2 (with or without expert
    parallelism), end with the parameters (budget included) of single-process training on the global
    batch; gradient clipping is active."""
    num_experts = 2 * world
    torch.manual_seed(21)
    ref = SmallModel(num_experts).double()
    torch.manual_seed(21)
    model = SmallModel(num_experts, group=dist.group.WORLD if expert_parallel else None).double()
    if wrapper == "ddp":
        wrapped = parallel.wrap_ddp(model)
    else:
        wrapped = parallel.wrap_fsdp(model)
    # Adam divides by sqrt(v) + eps: with the default eps = 1e-8 an entry whose gradient is ~1e-12
    # turns a 1e-18 rounding difference into a 1e-9 step difference; eps = 1e-6 keeps the comparison
    # at rounding level without hiding real differences (those are >= 1e-4 here).
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=2e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.1)
    per_rank = 3
    g = torch.Generator().manual_seed(31)
    clipped = 0
    for step in range(steps):
        x = torch.randn(world * per_rank, 5, D_MODEL, generator=g, dtype=torch.float64)
        target = torch.randn(world * per_rank, 5, D_MODEL, generator=g, dtype=torch.float64)
        F.mse_loss(ref(x), target).backward()
        norm_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)
        clipped += bool(norm_ref > MAX_NORM)
        opt_ref.step()
        opt_ref.zero_grad()

        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        F.mse_loss(wrapped(x[mine]), target[mine]).backward()
        norm = parallel.clip_grad_norm_(model, MAX_NORM)
        check_close(f"step {step} gradient norm", norm.double(), norm_ref.double(), rtol=1e-12)
        opt.step()
        opt.zero_grad()
    assert clipped >= 1, "the test must exercise gradient clipping"
    full = parallel.full_state_dict(model)
    for key, value in ref.state_dict().items():
        if isinstance(value, torch.Tensor):
            check_close(f"{wrapper} ep={expert_parallel} after {steps} steps: {key}", full[key], value, rtol=1e-8, atol=1e-11)
    assert "budget.theta" in full and full["budget.theta"].abs().sum() > 0, "the budget must have trained"


def scenario_ddp(rank, world):
    train_equivalence(rank, world, "ddp", expert_parallel=False)
    train_equivalence(rank, world, "ddp", expert_parallel=True)


def scenario_fsdp(rank, world):
    train_equivalence(rank, world, "fsdp", expert_parallel=False)
    train_equivalence(rank, world, "fsdp", expert_parallel=True)


def expect_error(kind, needles, fn):
    try:
        fn()
    except kind as exc:
        for needle in needles:
            assert needle in str(exc), f"error message lacks {needle!r}: {exc}"
        return exc
    raise AssertionError(f"expected {kind.__name__} mentioning {needles}")


def scenario_mismatch(rank, world):
    """Mismatched configurations fail on every rank with a clear error, never a hang."""
    group = dist.group.WORLD
    # num_experts differs (both divisible by W): checked before the divisibility rule
    expect_error(ValueError, ["num_experts", "rank 0: 4", "rank 1: 8"],
                 lambda: softmoe.SoftMoELayer(D_MODEL, D_HIDDEN, 4 if rank == 0 else 8, k=1.5, expert_group=group))
    expect_error(ValueError, ["d_hidden"],
                 lambda: softmoe.SoftMoELayer(D_MODEL, 8 + rank, 4, k=1.5, expert_group=group))
    expect_error(ValueError, ["divisible", "num_experts (= 3)"],
                 lambda: softmoe.SoftMoELayer(D_MODEL, D_HIDDEN, 3, k=1.5, expert_group=group))
    expect_error(TypeError, ["expert_group"], lambda: softmoe.SoftMoELayer(D_MODEL, D_HIDDEN, 4, expert_group=3))
    # Different dtypes at forward time: every rank raises instead of exchanging garbage.
    layer = softmoe.SoftMoELayer(D_MODEL, D_HIDDEN, 4, k=1.5, expert_group=group)
    if rank == 1:
        layer.double()
    x = torch.randn(5, D_MODEL, dtype=layer.router.weight.dtype)
    expect_error(RuntimeError, ["dtype", "same order"], lambda: layer(x))
    # Only one rank runs forward with gradients, so only one would run the backward exchanges.
    layer = softmoe.SoftMoELayer(D_MODEL, D_HIDDEN, 4, k=1.5, expert_group=group)
    with torch.set_grad_enabled(rank == 0):
        expect_error(RuntimeError, ["requires_grad"], lambda: layer(torch.randn(5, D_MODEL)))
    # A rank that skips a forward: the other fails at the process group's timeout with a clear error.
    layer = softmoe.SoftMoELayer(D_MODEL, D_HIDDEN, 4, k=1.5, expert_group=group)
    if rank == 0:
        start = time.monotonic()
        expect_error(RuntimeError, ["same number of times"], lambda: layer(torch.randn(5, D_MODEL)))
        assert time.monotonic() - start < 30, "the timeout must end the wait"
    else:
        time.sleep(TIMEOUT_S + 3)  # stay alive so that rank 0 sees a timeout, not a closed peer


TIMEOUT_S = 20


def main():
    scenario, rank, world, store = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    timeout = 4 if scenario == "mismatch" else TIMEOUT_S
    globals()["TIMEOUT_S"] = timeout
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        globals()[f"scenario_{scenario}"](rank, world)
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        os._exit(1)  # skip destroy_process_group: peers may be gone or stuck
    if scenario != "mismatch":
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
