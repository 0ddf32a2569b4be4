"""Swap SoftMoE routing into a Hugging Face Mixtral-style model, fine-tune it, generate, save, reload.

    pip install 'softmoe[hf]'                   # transformers (tested: 5.23.0)
    python examples/hf_convert.py               # about 2 minutes on 2 CPU cores
    python examples/hf_convert.py --steps 50 --out runs/hf_small

No download: the "pretrained" model is a small MixtralForCausalLM built from a config (byte-level,
vocabulary 256) with random weights. With a real checkpoint the conversion is the same three lines:

    model = AutoModelForCausalLM.from_pretrained("mistralai/Mixtral-8x7B-v0.1")
    softmoe.hf.convert(model, mean_k=2.0)
    ...; model.save_pretrained(out); model = softmoe.hf.from_pretrained(out)

The script converts every MoE block (the model's experts, router weights kept), fine-tunes on the
bundled text with a progress bar, prints the learned per-layer allocation of the expert budget
(soft k_l and realised active experts per token), samples text, saves the model with
save_pretrained and reloads it with softmoe.hf.from_pretrained (identical logits).
"""
import argparse
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
    ap.add_argument("--steps", type=int, default=200, help="fine-tuning steps")
    ap.add_argument("--out", default="runs/hf_convert", help="folder for save_pretrained")
    ap.add_argument("--data", default=DEFAULT_DATA, help="UTF-8 text file (.gz ok); default: bundled Python docs")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--mean-k", type=float, default=2.0, help="mean soft experts per token and layer (budget)")
    ap.add_argument("--alpha", type=float, default=0.2,
                    help="LapSum temperature in units of router logits (the random router's logits are small)")
    ap.add_argument("--lr", type=float, default=3e-3)
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
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    return transformers.MixtralForCausalLM(config)


def held_out_bits(model, data) -> float:
    """Held-out bits per byte (bytes are the tokens)."""
    model.eval()
    total = 0.0
    with torch.no_grad():
        for x, y in data:
            total += F.cross_entropy(model(x).logits.reshape(-1, 256), y.reshape(-1)).item()
    model.train()
    return total / len(data) / math.log(2)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, held_out = split(load_bytes(args.data))
    evals = fixed_batches(held_out, 4, 8, args.context)

    model = tiny_mixtral(args.context)
    softmoe.hf.convert(model, mean_k=args.mean_k, alpha=args.alpha)  # <- the conversion
    print(f"converted {type(model).__name__}: {len(softmoe.hf.layers(model))} MoE blocks -> SoftMoE routing "
          f"(mean_k {args.mean_k}, transformers {transformers.__version__})")

    budget = list(softmoe.hf.budget(model).parameters())
    rest = [p for p in model.parameters() if p.requires_grad and all(p is not b for b in budget)]
    opt = torch.optim.AdamW([
        {"params": rest, "base_lr": args.lr},
        {"params": budget, "base_lr": args.budget_lr, "weight_decay": 0.0},
    ], lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    data = batches(train, args.batch, args.context, torch.Generator().manual_seed(args.seed))
    print(f"held-out bits per byte before fine-tuning: {held_out_bits(model, evals):.3f}")

    model.train()
    start = time.time()
    steps = range(args.steps)
    bar = tqdm(steps, desc="fine-tune", dynamic_ncols=True) if tqdm is not None else steps
    for step in bar:
        set_lr(opt, step, args.steps, warmup=max(1, args.steps // 20))
        x, y = next(data)
        loss = F.cross_entropy(model(x).logits.reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if tqdm is not None and (step % 10 == 0 or step == args.steps - 1):
            active = [r["active"] for r in softmoe.hf.stats(model)]
            bar.set_postfix(loss=f"{loss.item():.3f}", active=" ".join(f"{a:.2f}" for a in active))
    print(f"fine-tuned {args.steps} steps in {time.time() - start:.0f} s; "
          f"held-out bits per byte: {held_out_bits(model, evals):.3f}")

    print("\nlearned per-layer allocation (soft k_l, realised active experts per token at the last batch):")
    model(evals[0][0])
    print(softmoe.hf.format_stats(model))

    model.eval()
    prompt = torch.tensor([list(b"The Python ")])
    with torch.no_grad():
        sample = model.generate(prompt, max_new_tokens=args.sample, do_sample=True, temperature=0.8, top_k=40)
    print("\n--- sample (KV-cached generation) ---")
    print(bytes(sample[0].tolist()).decode("utf-8", errors="replace"))
    print("---")

    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out)
    reloaded = softmoe.hf.from_pretrained(args.out)
    with torch.no_grad():
        diff = (reloaded(evals[0][0]).logits - model(evals[0][0]).logits).abs().max().item()
    print(f"\nsaved to {args.out} and reloaded with softmoe.hf.from_pretrained: max |logits difference| = {diff:g}")
    return 0 if diff == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
