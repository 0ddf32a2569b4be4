"""Baselines on the same experts code: TopKMoE (Switch / Mixtral routing, load-balancing loss,
router z-loss) against the naive per-token reference of tests/reference.py, and SlotSoftMoE
(Puigcerver et al.): shape, non-causality (and its warning), dispatch/combine normalisation, a
naive slot reference and float64 gradcheck.
"""
import math

import pytest
import torch

from softmoe.baselines import SlotSoftMoE, TopKMoE

from reference import reference_expert, reference_topk_losses, reference_topk_moe


@pytest.fixture
def single_thread():
    """One torch thread for gradcheck's thousands of tiny op calls (a 2-thread parallel region can
    wait a whole scheduler time slice on a loaded 2-core machine). Restores the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_x(shape, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# ---- TopKMoE --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(9, 6), (2, 5, 6)], ids=["T-d", "B-S-d"])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_matches_reference(dtype, top_k, normalize, activation, shape, single_thread):
    torch.manual_seed(top_k)
    moe = TopKMoE(6, 5, 4, top_k=top_k, activation=activation, normalize=normalize, dtype=dtype)
    x = make_x(shape, dtype, seed=3)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.double(), reference_topk_moe(moe, x), **tol)
    lb, z = reference_topk_losses(moe, x)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(moe.last_losses["load_balancing"].double(), lb, **tol)
    torch.testing.assert_close(moe.last_losses["router_z"].double(), z, **tol)
    torch.testing.assert_close(
        moe.aux_loss.double(), moe.lb_coef * lb + moe.z_coef * z, **tol
    )


@pytest.mark.parametrize("top_k,normalize", [(1, False), (2, True), (2, False)])
def test_topk_gradients_match_reference(top_k, normalize):
    """float64: gradients of x, router and experts equal those of the naive reference."""
    torch.manual_seed(4)
    moe = TopKMoE(6, 5, 5, top_k=top_k, normalize=normalize).double()
    x = make_x((11, 6), torch.float64, seed=5).requires_grad_(True)
    g = make_x((11, 6), torch.float64, seed=6)
    params = [x] + list(moe.parameters())
    got = torch.autograd.grad((moe(x) * g).sum(), params)
    want = torch.autograd.grad((reference_topk_moe(moe, x) * g).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("top_k", [1, 2])
def test_topk_gradients_reach_router_and_experts(top_k):
    """The task loss reaches the experts and (through the gate weights) the router; the aux loss
    reaches the router. Switch-style top-1 uses the unnormalised gate (normalize=False): with
    normalize=True a single renormalised weight is exactly 1 and carries no router gradient."""
    torch.manual_seed(2)
    moe = TopKMoE(8, 6, 4, top_k=top_k, normalize=top_k > 1)
    x = make_x((32, 8), seed=7)
    moe(x).square().sum().backward()
    assert (moe.router.weight.grad != 0).any()
    assert (moe.experts.w_in.grad != 0).any() and (moe.experts.w_out.grad != 0).any()
    moe.zero_grad()
    moe(x)
    moe.aux_loss.backward()
    assert (moe.router.weight.grad != 0).any()
    assert moe.experts.w_in.grad is None or (moe.experts.w_in.grad == 0).all()


def test_topk_load_balancing_hand_computed():
    """E = 3, top_k = 1, 4 tokens with hand-set router logits."""
    moe = TopKMoE(3, 2, 3, top_k=1, lb_coef=0.5, z_coef=0.25).double()
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 1.0, -1.0], [0.0, 0.0, 0.5]], dtype=torch.float64)
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(3, dtype=torch.float64))
    moe(logits)  # x = logits, router = identity
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    # argmax: expert 0, 1, 0, 2 -> f = (2/4, 1/4, 1/4)
    f = [0.5, 0.25, 0.25]
    P = [sum(p[e] for p in probs) / 4 for e in range(3)]
    lb = 3 * sum(fe * pe for fe, pe in zip(f, P))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 4
    assert moe.last_losses["load_balancing"].item() == pytest.approx(lb, rel=1e-14)
    assert moe.last_losses["router_z"].item() == pytest.approx(z, rel=1e-14)
    assert moe.aux_loss.item() == pytest.approx(0.5 * lb + 0.25 * z, rel=1e-14)


@pytest.mark.parametrize("top_k", [1, 2])
def test_topk_load_balancing_is_one_when_balanced(top_k):
    """Perfectly balanced routing built by hand: E = 4, router = c * identity, token i is
    e_i (+ 0.5 e_{i+1} for top-2). Every expert gets the same share of the routed pairs, and by the
    cyclic symmetry every expert has the same mean probability, so the loss is exactly 1."""
    E = 4
    moe = TopKMoE(E, 3, E, top_k=top_k).double()
    with torch.no_grad():
        moe.router.weight.copy_(3.0 * torch.eye(E, dtype=torch.float64))
    x = torch.eye(E, dtype=torch.float64)
    if top_k == 2:
        x = x + 0.5 * torch.roll(torch.eye(E, dtype=torch.float64), 1, dims=1)
    x = torch.cat([x, x])  # 8 tokens, each expert chosen by 2 (top-1) / 4 (top-2) of them
    moe(x)
    assert moe.last_losses["load_balancing"].item() == pytest.approx(1.0, abs=1e-14)
    # and it is > 1 when every token goes to one expert
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[:, 0] = torch.tensor([5.0, 4.0, 0.0, 0.0], dtype=torch.float64)
    moe(torch.ones(8, E, dtype=torch.float64))
    assert moe.last_losses["load_balancing"].item() > 1.5


def test_topk_z_loss_formula():
    torch.manual_seed(5)
    moe = TopKMoE(8, 4, 6)
    x = make_x((3, 7, 8), seed=8)
    moe(x)
    logits = (x.reshape(-1, 8) @ moe.router.weight.T).float()
    want = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(moe.last_losses["router_z"], want, rtol=1e-6, atol=0)


def test_topk_errors():
    with pytest.raises(ValueError, match="top_k"):
        TopKMoE(4, 4, 3, top_k=4)
    with pytest.raises(ValueError, match="top_k"):
        TopKMoE(4, 4, 3, top_k=0)
    with pytest.raises(ValueError, match="num_experts"):
        TopKMoE(4, 4, 0)
    with pytest.raises(ValueError, match="d_model = 4"):
        TopKMoE(4, 4, 3)(torch.randn(2, 5))


# ---- SlotSoftMoE ----------------------------------------------------------------------------------


def reference_slot_moe(moe, x):
    """Slot Soft MoE by its definition, loop over sequences, slots and tokens (float64)."""
    B, N, d = x.shape
    S = moe.num_experts * moe.slots_per_expert
    out = torch.zeros(B, N, d, dtype=torch.float64)
    for b in range(B):
        logits = x[b].double() @ moe.slot_embed.double()  # [N, S]
        dispatch = torch.softmax(logits, dim=0)  # over tokens
        combine = torch.softmax(logits, dim=1)  # over slots
        slot_out = []
        for s in range(S):
            slot_in = sum(dispatch[n, s] * x[b, n].double() for n in range(N))
            slot_out.append(reference_expert(moe.experts, s // moe.slots_per_expert, slot_in))
        for n in range(N):
            out[b, n] = sum(combine[n, s] * slot_out[s] for s in range(S))
    return out


@pytest.mark.parametrize("slots_per_expert", [1, 2])
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_slot_shape_and_reference(slots_per_expert, activation):
    torch.manual_seed(3)
    moe = SlotSoftMoE(6, 5, 3, slots_per_expert=slots_per_expert, activation=activation).double()
    x = make_x((2, 7, 6), torch.float64, seed=9)
    y = moe(x)
    assert y.shape == (2, 7, 6) and y.dtype == torch.float64
    torch.testing.assert_close(y, reference_slot_moe(moe, x), rtol=1e-12, atol=1e-12)
    y32 = moe.float()(x.float())
    assert y32.shape == (2, 7, 6) and y32.dtype == torch.float32


def test_slot_dispatch_and_combine_sum_to_one():
    """Recomputed from the module's slot embeddings: each slot's dispatch weights sum to 1 over the
    tokens of its sequence, each token's combine weights sum to 1 over the slots."""
    torch.manual_seed(1)
    moe = SlotSoftMoE(8, 4, 4, slots_per_expert=2)
    x = make_x((3, 10, 8), seed=2)
    logits = x @ moe.slot_embed
    dispatch = torch.softmax(logits, dim=1)
    combine = torch.softmax(logits, dim=2)
    assert logits.shape == (3, 10, 8)
    torch.testing.assert_close(dispatch.sum(1), torch.ones(3, 8))
    torch.testing.assert_close(combine.sum(2), torch.ones(3, 10))
    assert (dispatch > 0).all() and (combine > 0).all()  # dense: every token feeds every slot
    # consequence: a constant sequence gives every slot that constant as input, so every token's
    # output is the combine-average of the experts applied to it
    c = make_x((1, 1, 8), seed=3).expand(1, 5, 8).contiguous()
    y = moe(c)
    torch.testing.assert_close(y[0, 0], y[0, 4], rtol=1e-6, atol=1e-7)


def test_slot_warns_when_causal():
    with pytest.warns(UserWarning, match="not causal"):
        SlotSoftMoE(4, 4, 2, causal=True)


def test_slot_is_not_causal():
    """Changing only the last token changes the output at the first position."""
    torch.manual_seed(0)
    moe = SlotSoftMoE(6, 5, 3)
    x = make_x((1, 8, 6), seed=4)
    y = moe(x)
    x2 = x.clone()
    x2[0, -1] += 1.0
    y2 = moe(x2)
    assert not torch.allclose(y[0, 0], y2[0, 0], rtol=1e-4, atol=1e-6)
    # and sequences of a batch do not mix
    xb = torch.cat([x, make_x((1, 8, 6), seed=5)])
    torch.testing.assert_close(moe(xb)[:1], y, rtol=1e-6, atol=1e-7)


def test_slot_gradcheck(single_thread):
    torch.manual_seed(6)
    moe = SlotSoftMoE(4, 3, 2, slots_per_expert=2).double()
    names = [n for n, _ in moe.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in moe.named_parameters()]
    x = make_x((2, 3, 4), torch.float64, seed=7).requires_grad_(True)

    def fn(x, *ps):
        return torch.func.functional_call(moe, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, [x] + params, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_slot_errors():
    with pytest.raises(ValueError, match="batch, seq"):
        SlotSoftMoE(4, 4, 2)(torch.randn(5, 4))
    with pytest.raises(ValueError, match="slots_per_expert"):
        SlotSoftMoE(4, 4, 2, slots_per_expert=0)
