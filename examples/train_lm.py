"""Train a small byte-level SoftMoE language model on bundled English text and show how it learns
to spread its expert budget over the layers.

    python examples/train_lm.py                 # the README demo: under 4 minutes on 2 CPU cores
    python examples/train_lm.py --data my.txt --steps 3000 --out runs/mine
    python examples/train_lm.py --resume        # continue from --out/checkpoint.pt

Prints a progress bar (loss, held-out bits per byte, realised active experts), samples text at the
end, prints the learned per-layer allocation (soft k_l and realised active experts per token) and
saves a plot of the allocation over training to --out/allocation.png.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_lm import DEFAULT_DATA, LMConfig, TinyLM, batches, bits_per_byte, fixed_batches, load_bytes, make_optimizer, set_lr, split  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is installed by `make demo`
    tqdm = None


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="UTF-8 text file (.gz ok); default: bundled Python docs")
    ap.add_argument("--out", default="runs/train_lm", help="folder for checkpoint, log and plot")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--d-hidden", type=int, default=128, help="hidden width of each expert")
    ap.add_argument("--mean-k", type=float, default=1.5, help="global budget: mean soft experts per layer")
    ap.add_argument("--max-active", type=int, default=4)
    ap.add_argument("--combine", choices=["normalized", "sum"], default="normalized")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--budget-lr", type=float, default=3e-2, help="learning rate of the budget logits")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    ap.add_argument("--sample", type=int, default=300, help="bytes of text to sample at the end")
    return ap.parse_args(argv)


def save_checkpoint(path: str, model: TinyLM, optimizer, step: int, history: dict) -> None:
    # Write then rename, so a crash mid-write never destroys the last good checkpoint.
    tmp = path + ".tmp"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "history": history, "config": model.cfg.to_dict()}, tmp)
    os.replace(tmp, path)


def plot_allocation(history: dict, path: str, mean_k: float) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return False
    steps = history["step"]
    ks = list(zip(*history["k"]))
    active = list(zip(*history["active"]))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for layer, (k, a) in enumerate(zip(ks, active)):
        axes[0].plot(steps, k, label=f"layer {layer}")
        axes[1].plot(steps, a, label=f"layer {layer}")
    axes[0].axhline(mean_k, color="gray", linestyle="--", linewidth=1, label="budget mean")
    axes[0].set(title="learned soft expert count k_l", xlabel="step", ylabel="k_l")
    axes[1].set(title="realised active experts per token", xlabel="step", ylabel="mean |M|")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")

    data = load_bytes(args.data)
    train, held = split(data)
    held_batches = fixed_batches(held, count=8, batch=args.batch, context=args.context)
    cfg = LMConfig(ffn="softmoe", d_model=args.d_model, layers=args.layers, context=args.context,
                   experts=args.experts, d_hidden=args.d_hidden, mean_k=args.mean_k,
                   max_active=args.max_active, combine=args.combine)
    model = TinyLM(cfg)
    optimizer = make_optimizer(model, args.lr, args.budget_lr)
    history = {"step": [], "k": [], "active": [], "loss": [], "eval_step": [], "bpb": []}
    start = 0
    if args.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = state["step"], state["history"]
        print(f"resumed from {ckpt_path} at step {start}")

    params = sum(p.numel() for p in model.parameters())
    print(f"data: {args.data} ({len(train) / 1e6:.2f} MB train, {len(held) / 1e6:.2f} MB held out)")
    print(f"model: {cfg.layers} layers, d_model {cfg.d_model}, {cfg.experts} experts x {cfg.d_hidden} hidden, "
          f"{params / 1e6:.2f} M parameters; budget mean k = {cfg.mean_k}, max_active = {cfg.max_active}")
    bpb = float("nan")
    if start == 0:
        bpb = bits_per_byte(model, held_batches)
        print(f"held-out bits per byte before training: {bpb:.3f}")
    elif history["bpb"]:
        bpb = history["bpb"][-1]

    gen = torch.Generator().manual_seed(args.seed + start)
    stream = batches(train, args.batch, args.context, gen)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, dynamic_ncols=True) if tqdm else range(start, args.steps)
    t0 = time.time()
    for step in bar:
        set_lr(optimizer, step, args.steps, warmup=min(100, args.steps // 10 + 1))
        x, y = next(stream)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if not torch.isfinite(loss):
            print(f"\nstopping: the loss became {loss.item()} at step {step}; the last good checkpoint "
                  f"({ckpt_path}) is untouched. Lower --lr or --budget-lr and --resume.", file=sys.stderr)
            return 1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

        if step % 10 == 0 or step == args.steps - 1:
            history["step"].append(step)
            history["k"].append(model.budget.allocation().tolist())
            history["active"].append(model.active_experts())
            history["loss"].append(loss.item())
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            bpb = bits_per_byte(model, held_batches)
            history["eval_step"].append(step + 1)
            history["bpb"].append(bpb)
            save_checkpoint(ckpt_path, model, optimizer, step + 1, history)
        if tqdm:
            active = sum(model.active_experts()) / cfg.layers
            bar.set_postfix(loss=f"{loss.item():.3f}", heldout_bpb=f"{bpb:.3f}", active=f"{active:.2f}")
    elapsed = time.time() - t0

    print(f"\ntrained {args.steps - start} steps in {elapsed:.0f} s; held-out bits per byte: {bpb:.3f}")
    model.eval()
    print("\n--- sample (temperature 0.8) ---")
    sample = model.generate(b"The ", args.sample, generator=torch.Generator().manual_seed(args.seed))
    print(sample.decode("utf-8", errors="replace"))
    print("--- end of sample ---\n")

    alloc = model.budget.allocation().tolist()
    active = history["active"][-1]
    print("learned per-layer allocation (global budget: mean k = %.2f, sum = %.2f)" % (cfg.mean_k, sum(alloc)))
    print("layer | soft k_l | realised active experts per token")
    for layer, (k, a) in enumerate(zip(alloc, active)):
        print(f"{layer:5d} | {k:8.3f} | {a:6.2f}")
    plot = os.path.join(args.out, "allocation.png")
    if plot_allocation(history, plot, cfg.mean_k):
        print(f"allocation over training: {plot}")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"config": cfg.to_dict(), "steps": args.steps, "heldout_bpb": bpb, "allocation": alloc,
                   "active_per_layer": active, "seconds": elapsed, "argv": sys.argv}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
