"""Budgets in realised active experts: ``SoftMoELayer(active=...)`` steers its soft count so that
the experts it computes follow its target, and ``GlobalBudget(mean_active=...)`` shares one target
among layers by gradient. The count is checked on a small regression task (it fails when the
steering is off: then the truncation band decides the count, as it does for a soft-count budget)."""
import copy
import statistics

import pytest
import torch

from softmoe import GlobalBudget, SoftMoELayer
from softmoe.tiny_lm import LMConfig, TinyLM

D, E = 16, 8


def task(seed=0, tokens=128):
    """Inputs and targets of a fixed random nonlinear map: routing matters, and no token is special."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, D, generator=g)
    w = torch.randn(D, D, generator=g) / D**0.5
    return x, torch.tanh(x @ w) * 2


def stack(layers=3, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    return [SoftMoELayer(D, 16, E, **kw).to(dtype) for _ in range(layers)]


def forward(moe, x):
    h = x
    for layer in moe:
        h = h + layer(h)
    return h


def train(moe, budget, x, y, steps=200, lr=1e-2):
    """Adam on the task loss plus the layers' load-balancing losses; returns per step the realised
    active experts per token of each layer and the budget's shares (None without a budget)."""
    params = [p for layer in moe for p in layer.parameters()] + (list(budget.parameters()) if budget else [])
    opt = torch.optim.Adam(params, lr=lr)
    counts, shares = [], []
    for _ in range(steps):
        loss = (forward(moe, x) - y).square().mean() + sum(layer.aux_loss for layer in moe)
        opt.zero_grad()
        loss.backward()
        opt.step()
        counts.append([float(layer.last_stats["active_per_token"]) for layer in moe])
        shares.append(budget.allocation().tolist() if budget else [float(layer.target_active) for layer in moe])
    return counts, shares


def tail_mean(rows, fraction=0.1):
    tail = rows[-max(1, int(len(rows) * fraction)):]
    return [statistics.fmean(col) for col in zip(*tail)]


def test_realised_count_follows_the_budget_per_layer():
    x, y = task()
    moe = stack(active=1.5, max_active=4, count_gain=0.2)  # a faster step than the default: fewer steps
    budget = GlobalBudget(moe, mean_active=1.5)
    counts, shares = train(moe, budget, x, y)
    realised, assigned = tail_mean(counts), tail_mean(shares)
    for layer, (r, a) in enumerate(zip(realised, assigned)):
        assert abs(r - a) <= 0.1, f"layer {layer}: realised {r:.3f} vs share {a:.3f}"
    assert abs(statistics.fmean(realised) - 1.5) <= 0.05
    assert abs(sum(assigned) - 3 * 1.5) < 1e-4


def test_without_steering_the_band_decides_the_count():
    """The same stack with the steering off (count_gain 0) or with a soft-count budget realises far
    more than 1.5 experts: what the test above checks is the steering's doing."""
    x, y = task()
    off = stack(active=1.5, max_active=4, count_gain=0.0)
    counts, _ = train(off, GlobalBudget(off, mean_active=1.5), x, y, steps=100)
    assert min(tail_mean(counts)) > 1.8
    soft = stack(k=1.5, max_active=4)
    counts, _ = train(soft, GlobalBudget(soft, mean_k=1.5), x, y, steps=100)
    assert min(tail_mean(counts)) >= 2.0  # k > 1 and every weight <= 1: at least 2 experts per token


@pytest.mark.parametrize("target", [1.4, 2.5])
def test_a_lone_layer_follows_its_target_in_training_and_inference(target):
    x, y = task(seed=1)
    moe = stack(layers=1, active=target, max_active=4, count_gain=0.2)
    counts, _ = train(moe, None, x, y, steps=150)
    assert abs(tail_mean(counts)[0] - target) <= 0.1
    layer = moe[0]
    layer.eval()
    steering = layer.log_k_ratio.clone()
    with torch.no_grad():
        layer(x)
    assert torch.equal(layer.log_k_ratio, steering), "inference must not move the steering"
    assert abs(float(layer.last_stats["active_per_token"]) - target) <= 0.1


def test_active_one_routes_every_token_to_exactly_one_expert():
    x, y = task()
    layer = SoftMoELayer(D, 16, E, active=1)
    assert layer.max_active == 1
    train([layer], None, x, y, steps=5)
    for mode in (layer.train, layer.eval):
        mode()
        _, p = layer.route(x)
        assert torch.equal((p > 0).sum(-1), torch.ones(x.shape[0], dtype=torch.long))
        out = layer(x)
        assert float(layer.last_stats["active_per_token"]) == 1.0 and out.isfinite().all()


def test_budget_gradient_matches_finite_differences_float64():
    x, y = task()
    moe = stack(active=1.5, max_active=4, dtype=torch.float64)
    budget = GlobalBudget(moe, mean_active=1.5).double()
    for layer in moe:
        layer.eval()  # the steering is frozen, so the loss is a function of theta alone
    x, y = x.double(), y.double()
    with torch.no_grad():
        budget.theta.copy_(torch.tensor([0.3, -0.2, 0.1]))

    def loss():
        return (forward(moe, x) - y).square().mean()

    (g,) = torch.autograd.grad(loss(), budget.theta)
    assert g.abs().sum() > 0
    h = 1e-6
    for j in range(3):
        with torch.no_grad():
            budget.theta[j] += h
            up = loss()
            budget.theta[j] -= 2 * h
            down = loss()
            budget.theta[j] += h
        torch.testing.assert_close(g[j], (up - down) / (2 * h), rtol=1e-4, atol=1e-10)


def test_training_is_deterministic():
    x, y = task()
    runs = []
    for _ in range(2):
        moe = stack(active=1.5, max_active=4)
        budget = GlobalBudget(moe, mean_active=1.5)
        counts, _ = train(moe, budget, x, y, steps=20)
        runs.append((counts, [layer.log_k_ratio.clone() for layer in moe], budget.theta.detach().clone(),
                     forward(moe, x).detach()))
    (c0, s0, t0, o0), (c1, s1, t1, o1) = runs
    assert c0 == c1 and all(torch.equal(a, b) for a, b in zip(s0, s1))
    assert torch.equal(t0, t1) and torch.equal(o0, o1)


def test_compiled_forward_steers_like_eager():
    x, _ = task()
    eager = stack(layers=1, active=1.5, max_active=4)[0]
    compiled_layer = copy.deepcopy(eager)
    compiled = torch.compile(compiled_layer, backend="aot_eager", fullgraph=True)
    for _ in range(3):
        out_eager = eager(x)
        out_compiled = compiled(x)
        torch.testing.assert_close(out_compiled, out_eager)
        torch.testing.assert_close(compiled_layer.log_k_ratio, eager.log_k_ratio)
    assert not torch.equal(eager.log_k_ratio, torch.tensor(0.5).log()), "the steering never moved"


def test_state_dict_round_trip_and_mode_mismatch():
    x, y = task()
    moe = stack(layers=1, active=1.5, max_active=4)
    train(moe, None, x, y, steps=10)
    state = moe[0].state_dict()
    assert "log_k_ratio" in state and "k_logit" not in state
    fresh = SoftMoELayer(D, 16, E, active=1.5, max_active=4)
    fresh.load_state_dict(state)
    fresh.eval()
    moe[0].eval()
    assert torch.equal(fresh(x), moe[0](x))
    with pytest.raises(ValueError, match="active: saved 1.5 vs this layer 2.0"):
        SoftMoELayer(D, 16, E, active=2.0, max_active=4).load_state_dict(state)
    with pytest.raises(ValueError, match="active: saved 1.5 vs this layer None"):
        SoftMoELayer(D, 16, E, k=1.5, max_active=4).load_state_dict(state)


def test_bad_arguments_name_the_rule():
    with pytest.raises(ValueError, match="give k .* or active, not both"):
        SoftMoELayer(D, 16, E, k=1.5, active=1.5)
    with pytest.raises(ValueError, match=r"active must satisfy 1 <= active < max_active \(= 4\)"):
        SoftMoELayer(D, 16, E, active=4.0, max_active=4)
    with pytest.raises(ValueError, match="active must satisfy"):
        SoftMoELayer(D, 16, E, active=0.5)
    with pytest.raises(ValueError, match="count_gain must be a finite number >= 0"):
        SoftMoELayer(D, 16, E, active=1.5, count_gain=-1.0)
    with pytest.raises(ValueError, match="exactly one of mean_k"):
        GlobalBudget(stack(active=1.5, max_active=4), mean_k=1.5, mean_active=1.5)
    with pytest.raises(ValueError, match=r"layers\[0\] was built with a soft count k; a budget in mean_active"):
        GlobalBudget(stack(k=1.5, max_active=4), mean_active=1.5)
    with pytest.raises(ValueError, match=r"layers\[0\] was built with active=1.5; a budget in mean_k"):
        GlobalBudget(stack(active=1.5, max_active=4), mean_k=1.5)
    with pytest.raises(ValueError, match=r"mean_active must satisfy active_min \(= 1.0\) < mean_active < max_active - 0.25 \(= 3.75"):
        GlobalBudget(stack(active=3.9, max_active=4), mean_active=3.9)


def test_no_silent_override_of_a_chosen_value():
    with pytest.raises(ValueError, match=r"layers\[1\] was built with active=2.0, but every layer starts at "
                                         r"mean_active=1.5"):
        GlobalBudget([SoftMoELayer(D, 16, E, active=1.5, max_active=4),
                      SoftMoELayer(D, 16, E, active=2.0, max_active=4)], mean_active=1.5)
    with pytest.raises(ValueError, match=r"layers\[0\] was built with k=2.5, but every layer starts at mean_k=1.5"):
        GlobalBudget([SoftMoELayer(D, 16, E, k=2.5, max_active=4)], mean_k=1.5)
    # a layer built without k takes the budget's mean; one built with the mean is fine
    GlobalBudget([SoftMoELayer(D, 16, E, max_active=4), SoftMoELayer(D, 16, E, k=1.5, max_active=4)], mean_k=1.5)


def test_budget_state_is_float32_reachable_and_never_dead():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        moe = stack(active=1.5, max_active=4)
        budget = GlobalBudget(moe, mean_active=1.5)
    finally:
        torch.set_default_dtype(previous)
    assert budget.theta.dtype == torch.float32  # by construction, whatever the default dtype
    holder = torch.nn.ModuleDict({"layers": torch.nn.ModuleList(moe)})
    holder.budget = budget
    holder.to(torch.bfloat16)
    assert budget.theta.dtype == torch.float32 and all(layer.log_k_ratio.dtype == torch.float32 for layer in moe)
    assert all(layer.budget is budget and layer.budget_index == i for i, layer in enumerate(moe))

    soft = stack(max_active=4)
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList(soft)})
    model.budget = GlobalBudget(soft, mean_k=1.5)
    params = list(model.parameters())
    assert any(p is model.budget.theta for p in params)
    assert not any(p is layer.k_logit for layer in soft for p in params), "k_logit under a budget is a buffer"
    assert all(not layer.k_logit.requires_grad for layer in soft)


def test_tiny_lm_holds_its_budget():
    model = TinyLM(LMConfig(d_model=32, layers=2, heads=4, context=16, d_hidden=32, mean_active=1.5))
    assert model.budget.unit == "mean_active"
    state = model.state_dict()
    assert "budget.theta" in state and sum(1 for key in state if key.endswith("theta")) == 1
    assert any(p is model.budget.theta for p in model.parameters())
    model(torch.randint(0, 256, (2, 16)))
    assert model.aux_loss().requires_grad  # the layers' load-balancing losses


def test_a_layer_copies_after_a_forward():
    """aux_loss holds the forward's graph: deepcopy and pickling still work and start from zero."""
    import pickle

    layer = SoftMoELayer(D, 16, E, active=1.5, max_active=4)
    layer(task()[0]).sum().backward()
    assert layer.aux_loss.requires_grad
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert float(clone.aux_loss) == 0.0 and torch.equal(clone.log_k_ratio, layer.log_k_ratio)
