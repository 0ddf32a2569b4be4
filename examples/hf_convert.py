"""Convert a pretrained Hugging Face MoE model to SoftMoE routing: the same model at step 0, then
fine-tuned under an expert budget below its top-k, generate, save, reload.

    pip install 'softmoe[hf]'                   # transformers (tested: 5.23.0)
    python examples/hf_convert.py --threads 2   # about 4 minutes on 2 CPU cores, 2 once pretrained
    python examples/hf_convert.py --mean-k 1.5 --steps 200

No download: stage 1 trains a small MixtralForCausalLM (8 experts, top-2, 4 layers, bytes as
tokens) from a config on the bundled text and saves it to OUT/pretrained; later runs reuse it
(--retrain to train it again). With a real checkpoint the conversion is the same lines:

    model = AutoModelForCausalLM.from_pretrained("mistralai/Mixtral-8x7B-v0.1")
    softmoe.hf.convert(model, mean_k=1.0)        # or convert(model): the same model, lossless
    ...; model.save_pretrained(out); model = softmoe.hf.from_pretrained(out)

Stages: (1) pretrain or reuse the top-2 Mixtral; (2) convert it with the defaults and check that
the held-out loss is the original's; (3) convert it under a budget of --mean-k experts per token
and layer (default 1.0, half of top-2) and fine-tune --steps steps, next to the original top-2
model fine-tuned the same steps (--no-baseline skips it); print held-out bits per byte and the
realised active experts per layer before and after, the learned allocation, a sample; save with
save_pretrained and reload with softmoe.hf.from_pretrained (identical logits).
"""
import argparse
import copy
import math
import os
import sys
import time

import torch
from torch.nn import functional as F

from softmoe.tiny_lm import DEFAULT_DATA, batches, fixed_batches, load_bytes, set_lr, split

try:
    import transformers
except ImportError:  # pragma: no cover
    sys.exit("examples/hf_convert.py needs transformers: pip install 'softmoe[hf]'")
try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm comes with transformers
    tqdm = None

import softmoe.hf  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/hf_convert", help="folder for the pretrained and the converted checkpoints")
    ap.add_argument("--pretrain-steps", type=int, default=300, help="steps of the stand-in pretraining (stage 1)")
    ap.add_argument("--retrain", action="store_true", help="pretrain again even if OUT/pretrained exists")
    ap.add_argument("--steps", type=int, default=100, help="fine-tuning steps under the budget")
    ap.add_argument("--mean-k", type=float, default=1.0, help="expert budget: mean soft experts per token and layer")
    ap.add_argument("--no-baseline", action="store_true", help="skip fine-tuning the original top-2 model for reference")
    ap.add_argument("--data", default=DEFAULT_DATA, help="UTF-8 text file (.gz ok); default: bundled Python docs")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3, help="fine-tuning learning rate (pretraining: 3x)")
    ap.add_argument("--budget-lr", type=float, default=3e-2, help="learning rate of the budget logits")
    ap.add_argument("--sample", type=int, default=200, help="bytes to generate at the end")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (0: torch's default); 1 is fastest for this small model on a shared machine")
    return ap.parse_args(argv)


def tiny_mixtral(context: int) -> "transformers.MixtralForCausalLM":
    """The stand-in for a pretrained model: 4 layers, hidden 128, 8 experts, top-2, bytes as tokens."""
    config = transformers.MixtralConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=max(context, 512),
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0, router_aux_loss_coef=0.01,
    )
    return transformers.MixtralForCausalLM(config)


def held_out_bits(model, data) -> float:
    """Held-out bits per byte (bytes are the tokens)."""
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for x, y in data:
            total += F.cross_entropy(model(x).logits.reshape(-1, 256), y.reshape(-1)).item()
    model.train(was_training)
    return total / len(data) / math.log(2)


def realised_active(model, x) -> list[float]:
    """Mean active experts per token of each converted layer on ``x`` (a held-out batch)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(x)
    model.train(was_training)
    return [r["active"] for r in softmoe.hf.stats(model)]


def train(model, args, steps: int, lr: float, desc: str, budget_params=(), aux_loss: bool = False) -> float:
    """AdamW with warm-up and cosine decay on random windows of the training text; returns seconds."""
    budget_ids = {id(p) for p in budget_params}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in budget_ids]
    groups = [{"params": rest, "base_lr": lr}]
    if budget_ids:
        groups.append({"params": list(budget_params), "base_lr": args.budget_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    data = batches(args.train, args.batch, args.context, torch.Generator().manual_seed(args.seed + 1))
    model.train()
    start = time.time()
    bar = tqdm(range(steps), desc=desc, dynamic_ncols=True) if tqdm is not None else range(steps)
    for step in bar:
        set_lr(opt, step, steps, warmup=max(1, steps // 20))
        x, y = next(data)
        out = model(x, output_router_logits=aux_loss)
        loss = F.cross_entropy(out.logits.reshape(-1, 256), y.reshape(-1))
        if aux_loss:  # Mixtral's load balancing, as it was pretrained
            loss = loss + model.config.router_aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if tqdm is not None and (step % 10 == 0 or step == steps - 1):
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return time.time() - start


def pretrained(args) -> "transformers.MixtralForCausalLM":
    path = os.path.join(args.out, "pretrained")
    if os.path.isfile(os.path.join(path, "config.json")) and not args.retrain:
        print(f"reusing the pretrained top-2 Mixtral in {path} (--retrain to train it again)")
        return transformers.MixtralForCausalLM.from_pretrained(path).eval()
    torch.manual_seed(args.seed)
    model = tiny_mixtral(args.context)
    seconds = train(model, args, args.pretrain_steps, 3 * args.lr, "pretrain top-2", aux_loss=True)
    model.save_pretrained(path)
    print(f"pretrained a top-2 Mixtral for {args.pretrain_steps} steps in {seconds:.0f} s, saved to {path}")
    return model


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    args.train, held_out = split(load_bytes(args.data))
    evals = fixed_batches(held_out, 4, 8, args.context)

    # (1) the "pretrained" model
    original = pretrained(args)
    top_k = original.config.num_experts_per_tok
    before = held_out_bits(original, evals)
    print(f"original top-{top_k} Mixtral: held-out {before:.4f} bits per byte")

    # (2) lossless conversion
    lossless = softmoe.hf.convert(copy.deepcopy(original))
    with torch.no_grad():
        gap = (lossless(evals[0][0]).logits - original(evals[0][0]).logits).abs().max().item()
    converted_bits = held_out_bits(lossless, evals)
    print(f"converted with the defaults (k = top-{top_k}, sharp soft top-k, the model's gate): held-out "
          f"{converted_bits:.4f} bits per byte, max |logit difference| {gap:.1e}, active experts per "
          f"layer {' '.join(f'{a:.2f}' for a in realised_active(lossless, evals[0][0]))}")
    if abs(converted_bits - before) > 1e-4:
        print("the converted model is not the original: its held-out loss differs")
        return 1

    # (3) a budget below the top-k, fine-tuned
    model = softmoe.hf.convert(copy.deepcopy(original), mean_k=args.mean_k)  # <- the conversion under a budget
    start_bits, start_active = held_out_bits(model, evals), realised_active(model, evals[0][0])
    budget = list(softmoe.hf.budget(model).parameters())
    seconds = train(model, args, args.steps, args.lr, f"fine-tune, budget {args.mean_k:g}", budget_params=budget)
    after_bits, after_active = held_out_bits(model, evals), realised_active(model, evals[0][0])
    baseline = None
    if not args.no_baseline:
        reference = copy.deepcopy(original)
        train(reference, args, args.steps, args.lr, f"fine-tune top-{top_k}")
        baseline = held_out_bits(reference, evals)

    print(f"\nbudget mean_k = {args.mean_k:g} (soft experts per token and layer; the model had top-{top_k}), fine-tuned "
          f"{args.steps} steps in {seconds:.0f} s:")
    print(f"{'':34} {'held-out bits/byte':>18}  active experts per layer (mean)")
    rows = [(f"original top-{top_k}", before, [float(top_k)] * len(start_active)),
            ("converted, budget, step 0", start_bits, start_active),
            (f"converted, budget, step {args.steps}", after_bits, after_active)]
    if baseline is not None:
        rows.append((f"original top-{top_k}, step {args.steps}", baseline, [float(top_k)] * len(start_active)))
    for name, bits, active in rows:
        print(f"{name:34} {bits:18.4f}  {' '.join(f'{a:.2f}' for a in active)} ({sum(active) / len(active):.2f})")

    print("\nlearned per-layer allocation (soft k_l, realised active experts per token on a held-out batch):")
    print(softmoe.hf.format_stats(model))

    prompt = torch.tensor([list(b"The Python ")])
    with torch.no_grad():
        sample = model.generate(prompt, max_new_tokens=args.sample, do_sample=True, temperature=0.8, top_k=40)
    print("\n--- sample (KV-cached generation) ---")
    print(bytes(sample[0].tolist()).decode("utf-8", errors="replace"))
    print("---")

    path = os.path.join(args.out, "converted")
    model.save_pretrained(path)
    reloaded = softmoe.hf.from_pretrained(path)
    with torch.no_grad():
        diff = (reloaded(evals[0][0]).logits - model(evals[0][0]).logits).abs().max().item()
    print(f"\nsaved to {path} and reloaded with softmoe.hf.from_pretrained: max |logits difference| = {diff:g}")
    return 0 if diff == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
