"""Train a small byte-level SoftMoE language model on bundled English text and show how it learns
to spread its expert budget over the layers. The budget is the realised mean number of active
experts per token (default 1.5, against a top-2 MoE's 2): each layer steers its soft count so that
the experts it actually computes follow its learned share.

    python examples/train_lm.py                 # the README demo: under 4 minutes on 2 CPU cores
    python examples/train_lm.py --data my.txt --steps 3000 --out runs/mine
    python examples/train_lm.py --resume        # continue from --out/checkpoint.pt
    python examples/train_lm.py --nproc 2 --steps 20   # expert parallelism over 2 processes

With --nproc N > 1 the script relaunches itself with torchrun (torch.distributed.run --standalone):
the experts of every layer are split over the N processes (expert parallelism, softmoe/parallel.py)
and every process trains on batch/N rows of each global batch, so the run follows the single-process
one up to float rounding (gloo on CPU, NCCL on GPUs: one GPU per process). It can also be started by
torchrun directly: torchrun --nproc_per_node 4 examples/train_lm.py (docs/distributed.md).

Prints a progress bar (loss, held-out bits per byte, realised active experts), samples text at the
end, prints the learned per-layer allocation (share a_l, soft count k_l and realised active experts
per token, next to a top-2 MoE's 2 per token) and
saves a plot of the allocation over training to --out/allocation.png.
"""
import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
from torch.nn import functional as F

from softmoe import parallel
from softmoe.tiny_lm import DEFAULT_DATA, LMConfig, TinyLM, batches, bits_per_byte, fixed_batches, load_bytes, make_optimizer, set_lr, split

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover - tqdm is installed by `make demo`
    tqdm = None


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="UTF-8 text file (.gz ok); default: bundled Python docs")
    ap.add_argument("--out", default=None,
                    help="folder for checkpoint, log and plot (default: runs/train_lm, or runs/train_lm_<N>proc "
                         "for N > 1 processes, so that a parallel run never overwrites the demo's)")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--d-hidden", type=int, default=128, help="hidden width of each expert")
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument("--mean-active", type=float, default=None,
                        help="global budget: realised mean active experts per token and layer (default 1.5)")
    budget.add_argument("--mean-k", type=float, default=None,
                        help="instead, a budget in mean soft count (sum of routing weights) per layer")
    ap.add_argument("--max-active", type=int, default=4)
    ap.add_argument("--combine", choices=["normalized", "sum"], default="normalized")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--budget-lr", type=float, default=3e-2, help="learning rate of the budget logits")
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    ap.add_argument("--sample", type=int, default=300, help="bytes of text to sample at the end")
    ap.add_argument("--nproc", type=int, default=1,
                    help="processes for expert parallelism (relaunches with torchrun; experts must divide)")
    ap.add_argument("--dist-timeout", type=float, default=300.0,
                    help="seconds a collective may wait for the other processes before failing")
    args = ap.parse_args(argv)
    if args.nproc < 1:
        ap.error(f"--nproc must be >= 1, got {args.nproc}")
    if args.out is None:
        args.out = default_out(max(args.nproc, int(os.environ.get("WORLD_SIZE", "1"))))
    return args


def default_out(processes: int) -> str:
    """--out's default: the single-process demo's folder, or one per process count (a torchrun
    launch, direct or through --nproc, sees WORLD_SIZE)."""
    return "runs/train_lm" if processes == 1 else f"runs/train_lm_{processes}proc"


class Distributed:
    """This process's place in an expert-parallel run started by torchrun (WORLD_SIZE > 1)."""

    def __init__(self, timeout_s: float) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank = int(os.environ["RANK"])
        self.world = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            self.device = torch.device("cuda", local_rank)
            backend = "nccl"
        else:
            self.device = torch.device("cpu")
            backend = "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        self.group = dist.group.WORLD

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        value = value.detach().clone()
        self.dist.all_reduce(value)
        return value / self.world

    def close(self) -> None:
        # Every rank waits for the others before tearing gloo down: rank 0 still samples and prints
        # after training, and a rank that destroyed its group and exited meanwhile was seen to abort
        # in gloo's teardown ("terminate called without an active exception", one CI run in many).
        self.dist.barrier()
        self.dist.destroy_process_group()


def launch(nproc: int, argv) -> int:
    """Relaunches this script on nproc local processes with torchrun's standalone rendezvous."""
    from torch.distributed.run import main as torchrun

    argv = sys.argv[1:] if argv is None else list(argv)
    # torchrun's own parser would take --nproc for an abbreviation of its --nproc-per-node; the
    # relaunched processes learn their number from WORLD_SIZE instead.
    kept = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            kept.append(arg)
    if not torch.cuda.is_available():
        # One machine: keep gloo on the loopback interface even where the host name resolves to an
        # address the processes cannot reach each other on.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if sys.platform.startswith("linux") else "lo0")
    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", os.path.abspath(__file__), *kept])
    except Exception as exc:  # torchrun raises ChildFailedError with every failed rank's error
        print(f"expert-parallel run failed: {exc}", file=sys.stderr)
        return 1
    return 0


def held_out_bpb(model: TinyLM, data: list, ctx: "Distributed") -> float:
    """bits_per_byte with each process evaluating its share of every held-out batch."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    with torch.no_grad():
        for x, y in data:
            rows = slice(ctx.rank * len(x) // ctx.world, (ctx.rank + 1) * len(x) // ctx.world)
            logits = model(x[rows].to(ctx.device))
            total += F.cross_entropy(logits.flatten(0, 1), y[rows].to(ctx.device).flatten(), reduction="sum").double()
    model.train(was_training)
    ctx.dist.all_reduce(total)
    return total.item() / sum(y.numel() for _, y in data) / math.log(2)


def save_checkpoint(path: str, model: TinyLM, optimizer, step: int, history: dict, ctx: "Distributed | None" = None) -> None:
    if ctx is not None:
        # The single-process layout (all experts gathered; a collective), loadable without --nproc;
        # the optimizer state is sharded like the experts and is not saved.
        state = parallel.full_state_dict(model)
        if ctx.rank != 0:
            return
        model_state, optimizer_state = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in state.items()}, None
    else:
        model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    # Write then rename, so a crash mid-write never destroys the last good checkpoint.
    tmp = path + ".tmp"
    torch.save({"model": model_state, "optimizer": optimizer_state, "step": step,
                "history": history, "config": model.cfg.to_dict()}, tmp)
    os.replace(tmp, path)


def plot_allocation(history: dict, path: str, mean: float, unit: str) -> bool:
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
    axes[0].axhline(mean, color="gray", linestyle="--", linewidth=1, label="budget mean")
    axes[0].set(title=f"learned share of the budget ({unit})", xlabel="step", ylabel="share")
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
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if args.nproc > 1 and launched == 1:
        for name, value in (("--batch", args.batch), ("--experts", args.experts)):
            if value % args.nproc:
                print(f"{name} {value} must be divisible by --nproc {args.nproc}", file=sys.stderr)
                return 2
        return launch(args.nproc, argv)
    ctx = None
    if launched > 1:
        if args.nproc not in (1, launched):
            print(f"--nproc {args.nproc} disagrees with torchrun's WORLD_SIZE {launched}", file=sys.stderr)
            return 2
        ctx = Distributed(args.dist_timeout)
        try:
            return train(args, ctx)
        finally:
            ctx.close()
    return train(args, None)


def train(args: argparse.Namespace, ctx: "Distributed | None") -> int:
    main_rank = ctx is None or ctx.rank == 0
    say = print if main_rank else (lambda *a, **k: None)
    device = ctx.device if ctx is not None else torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if ctx is not None:
        if args.batch % ctx.world:
            say(f"--batch {args.batch} must be divisible by the {ctx.world} processes", file=sys.stderr)
            return 2
        if args.experts % ctx.world:
            say(f"--experts {args.experts} must be divisible by the {ctx.world} processes", file=sys.stderr)
            return 2
        if args.resume:
            # The expert-parallel optimizer state is sharded with the experts and is not checkpointed.
            say("--resume is not supported with --nproc > 1; resume without --nproc from the checkpoint "
                "(it holds the full model)", file=sys.stderr)
            return 2

    data = load_bytes(args.data)
    train_data, held = split(data)
    held_batches = fixed_batches(held, count=8, batch=args.batch, context=args.context)
    mean_active = None if args.mean_k is not None else (args.mean_active if args.mean_active is not None else 1.5)
    cfg = LMConfig(ffn="softmoe", d_model=args.d_model, layers=args.layers, context=args.context,
                   experts=args.experts, d_hidden=args.d_hidden, mean_active=mean_active, mean_k=args.mean_k,
                   max_active=args.max_active, combine=args.combine)
    budget_text = (f"mean active experts per token = {cfg.mean_active}" if cfg.mean_active is not None
                   else f"mean soft count k = {cfg.mean_k}")
    model = TinyLM(cfg, expert_group=ctx.group if ctx is not None else None).to(device)
    optimizer = make_optimizer(model, args.lr, args.budget_lr)
    # "k": the budget's shares (active targets a_l, or soft counts k_l for --mean-k); "soft_count": k_l
    history = {"step": [], "k": [], "soft_count": [], "active": [], "loss": [], "eval_step": [], "bpb": []}
    start = 0
    if args.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        if state["optimizer"] is not None:
            optimizer.load_state_dict(state["optimizer"])
        else:
            print("the checkpoint has no optimizer state (written by an expert-parallel run): fresh optimizer")
        start, history = state["step"], state["history"]
        print(f"resumed from {ckpt_path} at step {start}")
    train_model = model if ctx is None else parallel.wrap_ddp(
        model, device_ids=[device.index] if device.type == "cuda" else None)

    def evaluate() -> float:
        return bits_per_byte(model, held_batches) if ctx is None else held_out_bpb(model, held_batches, ctx)

    world = 1 if ctx is None else ctx.world
    experts = {id(p) for p in parallel.expert_parameters(model)}
    params = sum(p.numel() * (world if id(p) in experts else 1) for p in model.parameters())
    say(f"data: {args.data} ({len(train_data) / 1e6:.2f} MB train, {len(held) / 1e6:.2f} MB held out)")
    say(f"model: {cfg.layers} layers, d_model {cfg.d_model}, {cfg.experts} experts x {cfg.d_hidden} hidden, "
        f"{params / 1e6:.2f} M parameters; budget: {budget_text}, max_active = {cfg.max_active}")
    if ctx is not None:
        say(f"expert parallel: {world} processes ({'NCCL' if device.type == 'cuda' else 'gloo'}), "
            f"{cfg.experts // world} experts per layer each, {args.batch // world} of the {args.batch} rows "
            "of every batch each")
    bpb = float("nan")
    if start == 0:
        bpb = evaluate()
        say(f"held-out bits per byte before training: {bpb:.3f}")
    elif history["bpb"]:
        bpb = history["bpb"][-1]

    gen = torch.Generator().manual_seed(args.seed + start)
    stream = batches(train_data, args.batch, args.context, gen)
    steps = range(start, args.steps)
    bar = tqdm(steps, initial=start, total=args.steps, dynamic_ncols=True) if tqdm and main_rank else steps
    rows = slice(None) if ctx is None else slice(ctx.rank * args.batch // world, (ctx.rank + 1) * args.batch // world)
    sent = {"bytes_sent": 0, "bytes_sent_remote": 0, "count_bytes_sent": 0}
    t0 = time.time()
    for step in bar:
        set_lr(optimizer, step, args.steps, warmup=min(100, args.steps // 10 + 1))
        x, y = next(stream)
        x, y = x[rows].to(device), y[rows].to(device)
        before = parallel.comm_stats()
        loss = F.cross_entropy(train_model(x).flatten(0, 1), y.flatten())
        # Every process must take the same branch, so the check uses the mean loss of all of them.
        global_loss = loss if ctx is None else ctx.mean(loss)
        loss = loss + model.aux_loss()  # the layers' load-balancing losses
        if not torch.isfinite(global_loss):
            say(f"\nstopping: the loss became {global_loss.item()} at step {step}; the last good checkpoint "
                f"({ckpt_path}) is untouched. Lower --lr or --budget-lr and --resume.", file=sys.stderr)
            return 1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if ctx is None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        else:
            parallel.clip_grad_norm_(model, 1.0)
        optimizer.step()
        after = parallel.comm_stats()
        for key in sent:
            sent[key] += after[key] - before[key]

        if step % 10 == 0 or step == args.steps - 1:
            active = model.active_experts()
            if ctx is not None:
                active = ctx.mean(torch.tensor(active, device=device)).tolist()
            history["step"].append(step)
            history["k"].append(model.budget.allocation().tolist())
            history.setdefault("soft_count", []).append([float(layer.k.detach()) for layer in model.moe_layers()])
            history["active"].append(active)
            history["loss"].append(global_loss.item())
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            bpb = evaluate()
            history["eval_step"].append(step + 1)
            history["bpb"].append(bpb)
            save_checkpoint(ckpt_path, model, optimizer, step + 1, history, ctx)
        if tqdm and main_rank:
            active = sum(model.active_experts()) / cfg.layers
            bar.set_postfix(loss=f"{global_loss.item():.3f}", heldout_bpb=f"{bpb:.3f}", active=f"{active:.2f}")
    elapsed = time.time() - t0

    say(f"\ntrained {args.steps - start} steps in {elapsed:.0f} s; held-out bits per byte: {bpb:.3f}")
    comm = None
    if ctx is not None and args.steps > start:
        trained = args.steps - start
        tokens = (args.batch // world) * args.context
        comm = {key: value / trained for key, value in sent.items()}
        comm["bytes_sent_remote_per_token"] = comm["bytes_sent_remote"] / tokens
        say(f"expert-parallel exchanges (rank 0, forward + backward, per step): {comm['bytes_sent'] / 1e6:.2f} MB "
            f"sent, {comm['bytes_sent_remote'] / 1e6:.2f} MB to other processes "
            f"({comm['bytes_sent_remote_per_token']:.0f} bytes per token), "
            f"{comm['count_bytes_sent']:.0f} bytes of split sizes")
    model.eval()
    # Every process generates (the experts are spread over them); the same generator seed keeps
    # them in step.
    sample = model.generate(b"The ", args.sample, generator=torch.Generator().manual_seed(args.seed))
    say("\n--- sample (temperature 0.8) ---")
    say(sample.decode("utf-8", errors="replace"))
    say("--- end of sample ---\n")

    alloc = model.budget.allocation().tolist()
    soft = [float(layer.k.detach()) for layer in model.moe_layers()]
    # the realised count of the last 10 % of the steps (as the quality benchmark averages it)
    recent = history["active"][-max(1, len(history["active"]) // 10):]
    active = [sum(col) / len(col) for col in zip(*recent)]
    say(f"learned per-layer allocation (global budget: {budget_text}; shares sum to {sum(alloc):.2f})")
    say("layer | share | soft k_l | realised active experts per token | top-2 MoE")
    for layer, (share, k, a) in enumerate(zip(alloc, soft, active)):
        say(f"{layer:5d} | {share:5.2f} | {k:8.3f} | {a:34.2f} | {2.0:9.2f}")
    say(f"mean  |       |          | {sum(active) / len(active):34.2f} | {2.0:9.2f}")
    if not main_rank:
        return 0
    plot = os.path.join(args.out, "allocation.png")
    if plot_allocation(history, plot, cfg.mean_active if cfg.mean_active is not None else cfg.mean_k,
                       "active experts a_l" if cfg.mean_active is not None else "soft count k_l"):
        print(f"allocation over training: {plot}")
    summary = {"config": cfg.to_dict(), "steps": args.steps, "heldout_bpb": bpb, "allocation": alloc,
               "active_per_layer": active, "seconds": elapsed, "argv": sys.argv}
    if ctx is not None:
        summary["processes"] = world
        summary["exchange_per_step_rank0"] = comm
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
