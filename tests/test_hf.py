"""softmoe.hf on tiny randomly initialised transformers models built from configs (no downloads):
convert (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; the routers' gates of DeepSeek-V3, gpt-oss, Llama 4,
PhiMoE, MiniMax) and upcycle (Llama, Qwen2, GPT-2): the experts and router kept, forward,
router-logit recording, generate with and without KV cache, backward to router / budget /
experts, save_pretrained -> softmoe.hf.from_pretrained with identical logits, a few fine-tuning
steps on the bundled text, the budget invariant, fine-tuning the routing alone, PEFT LoRA on the
experts, gradient checkpointing, torch.compile, and argument errors. Losslessness across every
architecture: tests/test_hf_architectures.py."""
import copy
import importlib
import sys

import pytest
import torch
from torch.nn import functional as F

transformers = pytest.importorskip("transformers")

import softmoe  # noqa: E402
import softmoe.hf as H  # noqa: E402
from softmoe import tiny_lm  # noqa: E402
from test_hf_architectures import SMALL, _quiet, _spread_routers, tiny_config  # noqa: E402

VOCAB = 256  # byte-level: the bundled text's bytes are the token ids
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, tie_word_embeddings=False)


def moe_config(arch):
    if arch == "mixtral":
        return transformers.MixtralConfig(**COMMON, intermediate_size=48, num_hidden_layers=2, num_local_experts=4,
                                          num_experts_per_tok=2)
    if arch == "qwen2_moe":  # layer 1 stays dense (mlp_only_layers): only layers 0 and 2 are converted
        return transformers.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=40, num_hidden_layers=3, num_experts=4,
                                           num_experts_per_tok=2, mlp_only_layers=[1])
    if arch == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**COMMON, head_dim=8, intermediate_size=48, moe_intermediate_size=32,
                                           num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    if arch == "olmoe":
        return transformers.OlmoeConfig(**COMMON, intermediate_size=32, num_hidden_layers=2, num_experts=8,
                                        num_experts_per_tok=2)
    raise KeyError(arch)


def dense_config(arch):
    if arch == "llama":
        return transformers.LlamaConfig(**COMMON, intermediate_size=64, num_hidden_layers=2)
    if arch == "qwen2":
        return transformers.Qwen2Config(**COMMON, intermediate_size=64, num_hidden_layers=2)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    raise KeyError(arch)


MOE = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]
DENSE = ["llama", "qwen2", "gpt2"]
ALL = [("convert", a) for a in MOE] + [("upcycle", a) for a in DENSE]
IDS = [a for _, a in ALL]
BLOCKS = {"mixtral": "MixtralSparseMoeBlock", "qwen2_moe": "Qwen2MoeSparseMoeBlock", "qwen3_moe": "Qwen3MoeSparseMoeBlock",
          "olmoe": "OlmoeSparseMoeBlock"}
CONVERTED_LAYERS = {"mixtral": 2, "qwen2_moe": 2, "qwen3_moe": 2, "olmoe": 2, "llama": 2, "qwen2": 2, "gpt2": 2}


def build(method, arch, seed=0, **routing):
    """(original model, SoftMoE model) from the same random weights."""
    torch.manual_seed(seed)
    cfg = moe_config(arch) if method == "convert" else dense_config(arch)
    original = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.load_state_dict(original.state_dict())
    if method == "convert":
        H.convert(model, mean_k=routing.pop("mean_k", 2.0), **routing)
    else:
        H.upcycle(model, num_experts=routing.pop("num_experts", 4), mean_k=routing.pop("mean_k", 2.0), **routing)
    return original, model


def tokens(batch=2, length=12, seed=0, vocab=VOCAB):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is fastest, and several spin badly on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def text():
    train, held_out = tiny_lm.split(tiny_lm.load_bytes()[:400_000])
    return train, held_out


# ---- structure: experts, router, shared experts kept ------------------------------------------


@pytest.mark.parametrize("arch", MOE)
def test_convert_keeps_experts_router_and_shared_experts(arch):
    original, model = build("convert", arch)
    blocks = [(n, m) for n, m in original.named_modules() if type(m).__name__ == BLOCKS[arch]]
    converted = H.layers(model)
    assert len(converted) == len(blocks) == CONVERTED_LAYERS[arch]
    assert model.config.softmoe["layers"] == [n for n, _ in blocks]
    x = torch.randn(5, model.config.hidden_size)
    for (name, block), layer in zip(blocks, converted):
        assert model.get_submodule(name) is layer and isinstance(layer, softmoe.SoftMoELayer)
        torch.testing.assert_close(layer.router.weight, block.gate.weight, rtol=0, atol=0)
        ex = block.experts
        torch.testing.assert_close(layer.experts.w_in, ex.gate_up_proj.transpose(1, 2), rtol=0, atol=0)
        torch.testing.assert_close(layer.experts.w_out, ex.down_proj.transpose(1, 2), rtol=0, atol=0)
        # Every expert computes what the model's expert computed (SiLU-gated, gate rows first).
        want = []
        for e in range(ex.num_experts):
            gate, up = F.linear(x, ex.gate_up_proj[e]).chunk(2, dim=-1)
            want.append(F.linear(ex.act_fn(gate) * up, ex.down_proj[e]))
        torch.testing.assert_close(layer.experts.forward_all(x), torch.stack(want), rtol=1e-5, atol=1e-6)
        if arch == "qwen2_moe":
            assert layer.shared_expert is not None and layer.shared_expert_gate is not None
            torch.testing.assert_close(layer.shared_expert.up_proj.weight, block.shared_expert.up_proj.weight)
    if arch == "qwen2_moe":  # the dense layer is untouched
        assert type(model.model.layers[1].mlp).__name__ == "Qwen2MoeMLP"
    b = H.budget(model)
    assert b is model.softmoe_budget and b.num_layers == len(converted)
    assert "softmoe_budget.theta" in dict(model.named_parameters())


def test_qwen2_moe_block_adds_the_gated_shared_expert():
    _, model = build("convert", "qwen2_moe")
    layer = H.layers(model)[0]
    x = torch.randn(2, 3, model.config.hidden_size)
    routed = softmoe.SoftMoELayer.forward(layer, x)
    shared = torch.sigmoid(layer.shared_expert_gate(x)) * layer.shared_expert(x)
    torch.testing.assert_close(layer(x), routed + shared)


@pytest.mark.parametrize("arch", DENSE)
def test_upcycle_starts_as_the_dense_model(arch):
    original, model = build("upcycle", arch)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-5)
    layer = H.layers(model)[0]
    assert layer.num_experts == 4 and all(torch.equal(layer.experts.w_in[0], layer.experts.w_in[e]) for e in range(4))
    if arch == "gpt2":  # Conv1D weights [in, out] with biases, gelu_new
        mlp = original.transformer.h[0].mlp
        assert isinstance(layer.experts, H.HFExperts) and layer.experts.act == "gelu_new"
        torch.testing.assert_close(layer.experts.w_in[2], mlp.c_fc.weight, rtol=0, atol=0)
        torch.testing.assert_close(layer.experts.b_out[2], mlp.c_proj.bias, rtol=0, atol=0)
    # noise breaks the symmetry between the copies
    torch.manual_seed(1)
    _, noisy = build("upcycle", arch, noise=0.01)
    w = H.layers(noisy)[0].experts.w_in
    assert not torch.equal(w[0], w[1])
    assert (w[0] - w[1]).abs().max() < 0.2 * w[0].abs().max()


# ---- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("method,arch", ALL, ids=IDS)
def test_forward_generate_backward(method, arch):
    _, model = build(method, arch)
    ids = tokens()
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 12, VOCAB) and torch.isfinite(out.loss)
    out.loss.backward()
    layer = H.layers(model)[-1]
    for name, grad in (("router", layer.router.weight.grad), ("experts.w_in", layer.experts.w_in.grad),
                       ("experts.w_out", layer.experts.w_out.grad), ("budget theta", model.softmoe_budget.theta.grad)):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert not layer.k_logit.requires_grad  # k comes from the budget
    # Greedy generation: the KV cache changes nothing (routing is per token).
    model.eval()
    prompt = ids[:1, :6]
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (1, 14)
    assert torch.equal(cached, uncached)
    # stats after a forward
    rows = H.stats(model)
    assert len(rows) == CONVERTED_LAYERS[arch]
    for r in rows:
        assert 1.0 <= r["active"] <= layer.max_active and len(r["tokens_per_expert"]) == layer.num_experts


@pytest.mark.parametrize("method,arch", ALL, ids=IDS)
def test_save_and_from_pretrained_give_identical_logits(method, arch, tmp_path):
    _, model = build(method, arch)
    with torch.no_grad():  # a budget that is not the uniform start, so it is really loaded
        model.softmoe_budget.theta.copy_(torch.linspace(-0.5, 0.5, model.softmoe_budget.num_layers))
    ids = tokens()
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = H.from_pretrained(str(tmp_path))
    assert type(loaded) is type(model)
    assert loaded.config.softmoe == model.config.softmoe
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys()
    for key in sd:
        assert torch.equal(sd[key], sd2[key]), key
    torch.testing.assert_close(H.allocation(loaded), H.allocation(model), rtol=0, atol=0)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if n.endswith("k_logit"))
    assert loaded.softmoe_budget.theta.requires_grad


def test_from_pretrained_of_a_plain_checkpoint_and_a_changed_routing_config_fail(tmp_path):
    original, model = build("convert", "mixtral")
    original.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no SoftMoE routing configuration"):
        H.from_pretrained(str(tmp_path / "plain"))
    layer = H.layers(model)[0]
    state = layer.state_dict()
    _, other = build("convert", "mixtral", eps=0.05)
    with pytest.raises(ValueError, match="saved routing configuration differs.*eps"):
        H.layers(other)[0].load_state_dict(state)


# ---- router logits ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", MOE)
def test_output_router_logits_records_raw_logits(arch):
    _, model = build("convert", arch)
    inputs = []
    for layer in H.layers(model):
        layer.register_forward_pre_hook(lambda mod, args: inputs.append((mod, args[0])))
    ids = tokens()
    out = model(ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == len(inputs) == CONVERTED_LAYERS[arch]
    for logits, (layer, x) in zip(out.router_logits, inputs):
        assert logits.shape == (ids.numel(), layer.num_experts)
        torch.testing.assert_close(logits, F.linear(x.reshape(-1, x.shape[-1]), layer.router.weight))
    assert torch.isfinite(out.aux_loss)  # the model's own load-balancing loss on the raw logits
    assert model(ids).router_logits is None


def test_router_logits_recorded_when_hooks_were_installed_before_conversion():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(moe_config("mixtral"))
    ids = tokens()
    before = model(ids, output_router_logits=True, output_hidden_states=True)  # installs the hooks
    H.convert(model)
    after = model(ids, output_router_logits=True, output_hidden_states=True)
    assert len(after.router_logits) == len(before.router_logits) == 2
    assert len(after.hidden_states) == len(before.hidden_states)


# ---- training and the budget --------------------------------------------------------------------


@pytest.mark.parametrize("method,arch", ALL, ids=IDS)
def test_a_few_finetuning_steps_lower_the_loss_on_bundled_text(method, arch, text):
    train, held_out = text
    _, model = build(method, arch)
    (eval_x, eval_y), = tiny_lm.fixed_batches(held_out, 1, 8, 32)

    def held_out_loss():
        model.eval()
        with torch.no_grad():
            logits = model(eval_x).logits
        model.train()
        return F.cross_entropy(logits.reshape(-1, VOCAB), eval_y.reshape(-1)).item()

    before = held_out_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = tiny_lm.batches(train, 8, 32, torch.Generator().manual_seed(0))
    for _ in range(12):
        x, y = next(data)
        loss = F.cross_entropy(model(x).logits.reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss()
    assert after < before - 0.3, (before, after)
    k = H.allocation(model)
    assert abs(k.sum().item() - len(k) * 2.0) < 1e-4  # the budget holds after training
    assert not torch.equal(model.softmoe_budget.theta.detach(), torch.zeros_like(k))  # and it moved


def test_budget_sums_and_stats():
    _, model = build("convert", "olmoe", mean_k=2.5, max_active=5)
    b = model.softmoe_budget
    with torch.no_grad():
        b.theta.copy_(torch.tensor([2.0, -1.0]))
    k = H.allocation(model)
    assert abs(k.sum().item() - 2 * 2.5) < 1e-5 and k[0] > k[1]
    assert all(b.low < v < b.high for v in k.tolist())
    assert [float(layer.k.detach()) for layer in H.layers(model)] == pytest.approx(k.tolist())
    assert all(r["active"] is None for r in H.stats(model))  # no forward yet
    model(tokens())
    rows = H.stats(model)
    assert [r["name"] for r in rows] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert [r["k"] for r in rows] == pytest.approx(k.tolist())
    assert all(sum(r["tokens_per_expert"]) == pytest.approx(r["active"] * 24) for r in rows)
    table = H.format_stats(model)
    assert "model.layers.1.mlp" in table and "sum k_l = 5.0000" in table


def test_fixed_k_without_budget():
    _, model = build("convert", "qwen3_moe", mean_k=1.5, learn_k=False, combine="sum", alpha=0.5)
    assert H.budget(model) is None and model.config.softmoe["learn_k"] is False
    assert H.allocation(model).tolist() == pytest.approx([1.5, 1.5])
    layer = H.layers(model)[0]
    assert layer.combine == "sum" and float(layer.alpha) == pytest.approx(0.5)
    model(tokens())


def test_bfloat16_keeps_budget_and_k_in_float32(tmp_path):
    _, model = build("convert", "mixtral")
    model.save_pretrained(tmp_path)
    model.to(torch.bfloat16)
    loaded = H.from_pretrained(str(tmp_path), dtype=torch.bfloat16)
    for m in (model, loaded):
        assert m.softmoe_budget.theta.dtype == torch.float32
        assert H.layers(m)[0].k_logit.dtype == torch.float32
        assert H.layers(m)[0].router.weight.dtype == torch.bfloat16
        ids = tokens()
        out = m(ids, labels=ids)
        assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
        out.loss.backward()
        assert torch.isfinite(m.softmoe_budget.theta.grad).all()


# ---- pretrained gates: save / load, router logits, dtypes -------------------------------------------


GATED = ["deepseek_v3", "gpt_oss", "llama4_text", "phimoe", "minimax"]


def gated_pair(model_type):
    """(original, converted) tiny model of another family, routers spread as trained ones are."""
    _quiet()
    config = tiny_config(model_type)
    torch.manual_seed(0)
    original = transformers.AutoModelForCausalLM.from_config(config).eval()
    _spread_routers(original, tokens(length=16, vocab=SMALL['vocab_size']))
    return original, H.convert(copy.deepcopy(original))


@pytest.mark.parametrize("model_type", GATED)
def test_gated_families_round_trip_and_record_router_logits(model_type, tmp_path):
    original, model = gated_pair(model_type)
    layer = H.layers(model)[0]
    assert layer.combine == "gate" and layer.gate is not None
    ids = tokens(vocab=SMALL['vocab_size'])
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(want, original(ids).logits, rtol=1e-4, atol=1e-5)
        out = model(ids, output_router_logits=True)
    # every converted router is recorded (MiniMax's recorder also wants the module name mlp.gate)
    assert len(out.router_logits) == len(H.layers(model))
    assert all(t.shape == (ids.numel(), layer.num_experts) for t in out.router_logits)
    model.save_pretrained(tmp_path)
    loaded = H.from_pretrained(str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)
    if layer.gate.bias is not None:  # the selection bias travels with the checkpoint
        torch.testing.assert_close(H.layers(loaded)[0].gate.bias, layer.gate.bias, rtol=0, atol=0)


def test_deepseek_gate_in_bfloat16_keeps_its_selection_bias_float32():
    _, model = gated_pair("deepseek_v3")
    model.to(torch.bfloat16)
    layer = H.layers(model)[0]
    assert layer.gate.bias.dtype == torch.float32 and layer.router.weight.dtype == torch.bfloat16
    ids = tokens(vocab=SMALL['vocab_size'])
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)


def test_lossless_without_a_budget():
    """learn_k=False keeps each layer's k just below the top-k as well: the same function."""
    original, _ = gated_pair("mixtral")
    model = H.convert(copy.deepcopy(original), learn_k=False)
    assert H.budget(model) is None and all(float(layer.k) < 2.0 for layer in H.layers(model))
    ids = tokens(vocab=SMALL['vocab_size'])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-5)


# ---- affordable fine-tuning ---------------------------------------------------------------------


def _train(model, steps, params, ids, lr=1e-2):
    opt = torch.optim.AdamW(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_train_routing_only_freezes_everything_else():
    _, model = gated_pair("mixtral")
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = H.train_routing_only(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n, p in model.named_parameters() if any(p is q for q in params)}
    assert names == {"softmoe_budget.theta"} | {f"model.layers.{i}.mlp.router.weight" for i in range(2)}
    losses = _train(model, 6, params, tokens(length=24, vocab=SMALL['vocab_size']))
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in names), n  # the routing moved, nothing else did
    assert all(p.grad is None for n, p in model.named_parameters() if n not in names)
    # with learn_alpha the temperature is part of the routing too; without a budget, each k
    original, _ = gated_pair("qwen3_moe")
    alpha_model = H.convert(copy.deepcopy(original), learn_alpha=True, learn_k=False)
    got = {n for n, p in alpha_model.named_parameters() if any(p is q for q in H.routing_parameters(alpha_model))}
    assert got == {f"model.layers.{i}.mlp.{x}" for i in range(2) for x in ("router.weight", "log_alpha")}
    with pytest.raises(ValueError, match="train_routing_only: .* has no SoftMoE layers"):
        H.train_routing_only(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="routing_parameters: model must be a torch.nn.Module"):
        H.routing_parameters("model")


def test_peft_lora_on_the_experts_trains_saves_and_reloads(tmp_path):
    peft = pytest.importorskip("peft")
    _, model = gated_pair("mixtral")
    model.save_pretrained(tmp_path / "base")
    ids = tokens(length=24, vocab=SMALL['vocab_size'])
    with torch.no_grad():
        base_logits = model(ids).logits
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=[], target_parameters=["experts.w_in", "experts.w_out"])
    lora = peft.get_peft_model(model, config)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable) and len(trainable) == 2 * 2 * 2  # A, B x w_in, w_out x layers
    with torch.no_grad():  # LoRA starts at zero: the converted model unchanged
        torch.testing.assert_close(lora(ids).logits, base_logits, rtol=0, atol=0)
    lora.train()
    losses = _train(lora, 4, [p for p in lora.parameters() if p.requires_grad], ids)
    assert losses[-1] < losses[0]
    lora.eval()
    with torch.no_grad():
        tuned = lora(ids).logits
    assert not torch.equal(tuned, base_logits)
    lora.save_pretrained(tmp_path / "lora")
    reloaded = peft.PeftModel.from_pretrained(H.from_pretrained(str(tmp_path / "base")), str(tmp_path / "lora")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, tuned, rtol=0, atol=0)
        merged = reloaded.merge_and_unload()  # LoRA folded into the [E, in, out] expert weights
        torch.testing.assert_close(merged(ids).logits, tuned, rtol=1e-5, atol=1e-5)
    assert isinstance(H.layers(merged)[0].experts, H.HFExperts)


def test_gradient_checkpointing_gives_the_same_gradients():
    _, model = gated_pair("deepseek_v3")
    model.train()
    ids = tokens(length=24, vocab=SMALL['vocab_size'])

    def grads(m):
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
        return {n: p.grad for n, p in m.named_parameters() if p.grad is not None}

    plain = grads(model)
    checkpointed = copy.deepcopy(model)
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing
    got = grads(checkpointed)
    assert got.keys() == plain.keys() and "softmoe_budget.theta" in got
    for n in plain:
        torch.testing.assert_close(got[n], plain[n], rtol=0, atol=0, msg=n)


def test_torch_compile_of_a_converted_model():
    import torch._dynamo

    _, model = gated_pair("mixtral")
    model.train()
    ids = tokens(length=24, vocab=SMALL['vocab_size'])
    model.zero_grad()
    eager = model(ids, labels=ids).loss
    eager.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="aot_eager")
        loss = compiled(ids, labels=ids).loss
        loss.backward()
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
    for n, g in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-5, atol=1e-6, msg=n)


# ---- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mean_k,routing", [(4, {}), (4.5, {}), (0.0, {}), (-1.0, {}), (1.0, {"k_min": 1.0}),
                                            (3.0, {"max_active": 3}), (1.5, {"k_min": 2.0}),
                                            (float("nan"), {})])
def test_mean_k_out_of_range(mean_k, routing):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(moe_config("mixtral"))  # 4 experts
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"softmoe.hf.convert: .*mean_k"):
        H.convert(model, mean_k=mean_k, **routing)
    assert getattr(model.config, "softmoe", None) is None and not H.layers(model)  # untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_arguments():
    torch.manual_seed(0)
    moe = transformers.AutoModelForCausalLM.from_config(moe_config("mixtral"))
    dense = transformers.AutoModelForCausalLM.from_config(dense_config("gpt2"))
    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel.*'gpt2'.*not a supported MoE.*upcycle"):
        H.convert(dense)
    with pytest.raises(NotImplementedError, match="MixtralForCausalLM.*not a supported dense.*convert"):
        H.upcycle(moe, 4)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=4, intermediate_size=37))
    with pytest.raises(NotImplementedError, match="BertModel"):
        H.upcycle(bert, 4)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        H.convert(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="unexpected routing argument.*temperature"):
        H.convert(moe, temperature=2.0)
    with pytest.raises(TypeError, match="mean_k"):
        H.convert(moe, mean_k="2")
    with pytest.raises(ValueError, match="combine"):
        H.convert(moe, combine="mean")
    with pytest.raises(ValueError, match="max_active"):
        H.convert(moe, mean_k=2.0, max_active=9)
    with pytest.raises(ValueError, match="num_experts must be an int >= 2"):
        H.upcycle(dense, 1)
    with pytest.raises(ValueError, match="noise"):
        H.upcycle(dense, 4, noise=-0.1)
    with pytest.raises(ValueError, match="upcycle: .*mean_k"):
        H.upcycle(dense, 4, mean_k=4.0)
    H.convert(moe)
    with pytest.raises(ValueError, match="already has SoftMoE routing"):
        H.convert(moe)


def test_missing_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    monkeypatch.delitem(sys.modules, "softmoe.hf")
    with pytest.raises(ImportError, match=r"softmoe\[hf\]"):
        importlib.import_module("softmoe.hf")


def test_example_script_runs(tmp_path, capsys):
    import hf_convert

    args = ["--pretrain-steps", "3", "--steps", "2", "--sample", "8", "--batch", "2", "--context", "32", "--out", str(tmp_path)]
    assert hf_convert.main(args + ["--no-baseline"]) == 0
    out = capsys.readouterr().out
    assert "pretrained a top-2 Mixtral for 3 steps" in out
    lossless = next(line for line in out.splitlines() if line.startswith("converted with the defaults"))
    original = next(line for line in out.splitlines() if line.startswith("original top-2 Mixtral: held-out"))
    assert original.split("held-out ")[1].split()[0] == lossless.split("held-out ")[1].split()[0]  # the same loss
    assert "converted, budget, step 2" in out and "original top-2, step 2" not in out
    assert "learned per-layer allocation" in out and "--- sample" in out
    assert "max |logits difference| = 0" in out
    assert (tmp_path / "pretrained" / "config.json").exists() and (tmp_path / "converted" / "config.json").exists()
    assert hf_convert.main(args + ["--steps", "1"]) == 0  # reuses the pretrained model, fine-tunes the baseline too
    out = capsys.readouterr().out
    assert "reusing the pretrained top-2 Mixtral" in out and "original top-2, step 1" in out
