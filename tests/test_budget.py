"""GlobalBudget: the sum constraint and the ranges hold by construction, the budget gradient
matches finite differences of the loss, and the budget behaves as a module should."""
import copy

import pytest
import torch

import softmoe
from softmoe import GlobalBudget, SoftMoELayer


def make_stack(layers=3, d=8, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    moe = [SoftMoELayer(d, 6, 6, max_active=4, **kw).to(dtype) for _ in range(layers)]
    return moe


def run_stack(moe, x):
    # residual stack, so every layer's k matters for the loss
    h = x
    for layer in moe:
        h = h + layer(h)
    return h.square().mean()


def test_sum_and_ranges_hold_during_training():
    moe = make_stack(dtype=torch.float32)
    budget = GlobalBudget(moe, mean_k=1.7, k_min=1.0)
    params = [p for layer in moe for p in layer.parameters() if p.requires_grad] + list(budget.parameters())
    opt = torch.optim.SGD(params, lr=5.0)  # large steps push the allocation hard
    x = torch.randn(40, 8)
    for _ in range(30):
        opt.zero_grad()
        run_stack(moe, x).backward()
        opt.step()
        alloc = budget.allocation().detach()
        assert abs(alloc.sum().item() - 3 * 1.7) < 1e-5
        assert (alloc > budget.low).all() and (alloc < budget.high).all()
        for i, layer in enumerate(moe):
            assert torch.equal(layer.k.detach(), alloc[i])
    assert not torch.allclose(budget.allocation(), torch.full((3,), 1.7)), "the allocation never moved"


def test_extreme_logits_stay_inside_the_range():
    moe = make_stack(dtype=torch.float32)
    budget = GlobalBudget(moe, mean_k=2.0, k_min=1.0)
    with torch.no_grad():
        budget.theta.copy_(torch.tensor([50.0, -50.0, 0.0]))
    alloc = budget.allocation()
    assert abs(alloc.sum().item() - 6.0) < 1e-5
    assert (alloc >= budget.low).all() and (alloc <= budget.high).all()


def _loss_at(moe, budget, alloc, x):
    saved = budget.allocation
    budget.allocation = lambda: alloc  # the loss as a function of the allocation itself
    try:
        return run_stack(moe, x)
    finally:
        budget.allocation = saved


def test_budget_gradient_matches_finite_differences():
    moe = make_stack()
    budget = GlobalBudget(moe, mean_k=1.8).double()
    x = torch.randn(30, 8, dtype=torch.float64)
    base = budget.allocation().detach().double().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_loss_at(moe, budget, base, x), base)
    h = 1e-6
    for layer in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[layer] = h
        with torch.no_grad():
            fd = (_loss_at(moe, budget, base + step, x) - _loss_at(moe, budget, base - step, x)) / (2 * h)
        torch.testing.assert_close(grad[layer], fd, rtol=1e-5, atol=1e-9)
    # and through the budget logits: autograd on theta equals finite differences on theta
    loss = run_stack(moe, x)
    (g_theta,) = torch.autograd.grad(loss, budget.theta)
    for j in range(3):
        with torch.no_grad():
            budget.theta[j] += h
            up = run_stack(moe, x)
            budget.theta[j] -= 2 * h
            down = run_stack(moe, x)
            budget.theta[j] += h
        torch.testing.assert_close(g_theta[j], (up - down) / (2 * h), rtol=1e-5, atol=1e-9)


def test_moving_budget_between_two_layers_changes_the_loss_as_predicted():
    moe = make_stack(seed=3)
    budget = GlobalBudget(moe, mean_k=1.8)
    x = torch.randn(30, 8, dtype=torch.float64)
    base = budget.allocation().detach().double().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_loss_at(moe, budget, base, x), base)
    h = 1e-4
    move = torch.tensor([h, -h, 0.0], dtype=torch.float64)  # the total budget is unchanged
    with torch.no_grad():
        actual = _loss_at(moe, budget, base + move, x) - _loss_at(moe, budget, base, x)
    predicted = h * (grad[0] - grad[1])
    assert predicted.abs() > 1e-8, "degenerate case: the two layers have equal gradients"
    torch.testing.assert_close(actual, predicted, rtol=1e-2, atol=1e-10)


def test_state_dict_round_trip_and_optimizers():
    moe = make_stack(dtype=torch.float32)
    holder = torch.nn.ModuleDict({"layers": torch.nn.ModuleList(moe)})
    holder.budget = GlobalBudget(moe, mean_k=1.6)
    x = torch.randn(20, 8)
    for opt_cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        opt = opt_cls(holder.parameters(), lr=1e-1)
        opt.zero_grad()
        run_stack(moe, x).backward()
        opt.step()
    state = holder.state_dict()
    assert "budget.theta" in state
    assert sum(1 for key in state if key.startswith("budget.")) == 1, "the budget must not duplicate the layers"

    fresh_layers = make_stack(dtype=torch.float32, seed=9)
    fresh = torch.nn.ModuleDict({"layers": torch.nn.ModuleList(fresh_layers)})
    fresh.budget = GlobalBudget(fresh_layers, mean_k=1.6)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.budget.allocation(), holder.budget.allocation(), rtol=0, atol=0)
    assert torch.equal(run_stack(fresh_layers, x), run_stack(moe, x))


def test_deepcopy_keeps_the_layers_tied_to_the_copy():
    moe = make_stack(dtype=torch.float32)
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList(moe)})
    model.budget = GlobalBudget(moe, mean_k=1.6)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.budget.theta.copy_(torch.tensor([1.0, 0.0, -1.0]))
    assert torch.equal(clone.layers[0].k, clone.budget.allocation()[0])
    assert torch.equal(model.layers[0].k, model.budget.allocation()[0])
    assert not torch.equal(model.layers[0].k, clone.layers[0].k)


def test_compiles_with_the_budget():
    moe = make_stack(dtype=torch.float32)
    budget = GlobalBudget(moe, mean_k=1.6)
    x = torch.randn(20, 8)
    compiled = torch.compile(lambda inp: run_stack(moe, inp), backend="aot_eager", fullgraph=True)
    loss = compiled(x)
    (g,) = torch.autograd.grad(loss, budget.theta)
    (g_eager,) = torch.autograd.grad(run_stack(moe, x), budget.theta)
    torch.testing.assert_close(loss, run_stack(moe, x))
    torch.testing.assert_close(g, g_eager)


def test_bad_arguments():
    moe = make_stack(dtype=torch.float32)
    with pytest.raises(ValueError, match="GlobalBudget: layers"):
        GlobalBudget([], mean_k=1.5)
    with pytest.raises(TypeError, match=r"GlobalBudget: layers\[1\]"):
        GlobalBudget([moe[0], torch.nn.Linear(2, 2)], mean_k=1.5)
    with pytest.raises(ValueError, match="GlobalBudget: mean_k"):
        GlobalBudget(moe, mean_k=3.5)
    with pytest.raises(ValueError, match="GlobalBudget: mean_k"):
        GlobalBudget(moe, mean_k=1.0, k_min=1.0)
    with pytest.raises(ValueError, match="GlobalBudget: k_min"):
        GlobalBudget(moe, mean_k=1.5, k_min=0.0)
    with pytest.raises(TypeError, match="GlobalBudget: mean_k"):
        GlobalBudget(moe, mean_k="2")
    GlobalBudget(moe, mean_k=1.5)
    with pytest.raises(ValueError, match="already attached"):
        GlobalBudget(moe, mean_k=1.5)


def test_layer_k_gradient_is_the_budget_path():
    """The soft top-k backward reduces the per-token k gradients to one value per layer; through the
    budget that value reaches theta, and the frozen per-layer k_logit gets none."""
    moe = make_stack(dtype=torch.float32)
    budget = GlobalBudget(moe, mean_k=1.6)
    run_stack(moe, torch.randn(20, 8)).backward()
    assert budget.theta.grad is not None and budget.theta.grad.abs().sum() > 0
    assert all(layer.k_logit.grad is None and not layer.k_logit.requires_grad for layer in moe)
    assert isinstance(softmoe.GlobalBudget, type)
