#!/usr/bin/env python3
"""Quality benchmark (DESIGN.md section 7): train the same small byte-level transformer LM with
different FFNs on the same text, for the same steps and seeds, and compare held-out bits per byte.

Methods (all on the same experts code, softmoe/tiny_lm.py's TinyLM):
  dense              a SwiGLU FFN with the parameters of ONE expert (d_hidden = expert width)
  topk1, topk2       softmoe.baselines.TopKMoE, top-1 (Switch) / top-2 (Mixtral), with the
                     load-balancing + router z loss added to the training loss
  softmoe_a1.5       SoftMoELayer(active=...) under GlobalBudget(mean_active=1.5): the budget is the
                     realised mean number of active experts per token (the compute paid for); each
                     layer steers its soft count so that the experts it computes follow its share
  softmoe_a2.0       ... mean_active 2.0 (both with active=...'s defaults: combine "scaled", router
                     z-loss 1e-3, router init std 0.6)
  softmoe_a1.5_normalized, softmoe_a2.0_normalized
                     the same budgets with the soft-count layer's routing (combine "normalized", no
                     z-loss, router init std 4): the first mechanism tried, kept for comparison
  softmoe_k1.5       the earlier design: GlobalBudget(mean_k=1.5), a budget in soft count (sum of
                     routing weights per token), no load-balancing loss; its realised count is not
                     set by the budget (every layer activates >= 2 experts per token)

Every run: AdamW (betas 0.9/0.95, weight decay 0.1 on matrices), linear warm-up then cosine decay
to 10 %, gradient clipping at 1.0, the budget logits with their own learning rate (--budget-lr),
exactly as examples/train_lm.py. Runs of the same seed share the model-init seed and the order
of training windows, so differences between methods are paired. The held-out part is the end of
the text (tiny_lm.split, 5 %), never trained on; bits per byte are measured on fixed windows of
it a few times during training and at the end.

Reported per run: held-out bits per byte (final and during training), realised mean active
experts per token of each layer (SoftMoE: layer.last_stats["active_per_token"] averaged over the
last --active-window steps; top-k: k), the budget's learned share of each layer (SoftMoE: a_l
active experts, or k_l soft count) and the layers' soft counts,
tokens per second (training steps only; on a shared machine this is noisy, so at the end one
training step of each trained model is also timed round robin over the methods, as a ratio to
topk2), wall time, parameters active per token / total, and
NaN / collapse checks. Aggregated over seeds: mean, std, min and max of bits per byte. Output:
a markdown table on stdout, --out/quality.json, --out/quality.png (bits-per-byte curves) and
--out/quality_allocation.png (learned SoftMoE allocation per layer over training). The exit
status is 1 if a SoftMoE run hit a NaN, a layer's share left its allowed range, a mean_active
budget was not met (a layer's realised count more than BUDGET_TOLERANCE off its share), or a layer
collapsed: its routing diversity (the effective number of experts of its load over the mean
active experts per token; 1 when every token goes to the same experts) stayed below
COLLAPSE_DIVERSITY for 10 % of the steps in a row, or ended below it.

  python3 benchmarks/quality.py                  # default: 6 methods x 3 seeds x {steps} steps,
                                                 #   about {minutes} minutes on 2 idle CPU cores
  python3 benchmarks/quality.py --threads 1      # the same on a shared / busy machine (see --threads)
  python3 benchmarks/quality.py --jobs 2 --threads 1   # two runs at once, one thread each
  python3 benchmarks/quality.py --quick          # smoke run: tiny model, a few steps, seconds
  python3 benchmarks/quality.py --scale          # longer / larger: hours on 2 cores
  python3 benchmarks/quality.py --data my.txt --steps 2000 --seeds 0 1 2 --out runs/quality
  python3 benchmarks/quality.py --methods topk2 softmoe_k1.5
  python3 benchmarks/quality.py --autocast bf16  # forward passes (training, held-out, timing) under
                                                 #   torch.autocast("cpu", torch.bfloat16)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch
from torch.nn import functional as F

import softmoe
from softmoe.baselines import TopKMoE
from softmoe.tiny_lm import (
    DEFAULT_DATA,
    LMConfig,
    TinyLM,
    batches,
    bits_per_byte,
    fixed_batches,
    load_bytes,
    make_optimizer,
    set_lr,
    split,
)

import _timing  # benchmarks/_timing.py, beside this script

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
DEFAULT_OUT = os.path.join(_HERE, "results")

# name -> the LMConfig fields that define the method
METHODS: Dict[str, Dict[str, Any]] = {
    "dense": {"ffn": "dense"},
    "topk1": {"ffn": "topk", "top_k": 1},
    "topk2": {"ffn": "topk", "top_k": 2},
    # budget in realised active experts per token (the layers steer their soft count to it), with
    # the defaults of active=...: combine "scaled", router z-loss 1e-3, router init std 0.6
    "softmoe_a1.5": {"ffn": "softmoe", "mean_active": 1.5, "mean_k": None},
    "softmoe_a2.0": {"ffn": "softmoe", "mean_active": 2.0, "mean_k": None},
    # the same budget with the soft-count layers' routing: combine "normalized", no z-loss, init std 4
    "softmoe_a1.5_normalized": {"ffn": "softmoe", "mean_active": 1.5, "mean_k": None, "combine": "normalized",
                                "z_coef": 0.0, "router_init_std": 4.0},
    "softmoe_a2.0_normalized": {"ffn": "softmoe", "mean_active": 2.0, "mean_k": None, "combine": "normalized",
                                "z_coef": 0.0, "router_init_std": 4.0},
    # the earlier design: budget in soft count (sum of weights), no load balancing
    "softmoe_k1.5": {"ffn": "softmoe", "mean_active": None, "mean_k": 1.5, "lb_coef": 0.0},
}

# Model / training sizes. "default" fits in 30 minutes on 2 idle cores for all six methods and
# two seeds (measured: see DEFAULT_MINUTES); "scale" is a longer, larger run; "quick" a smoke run.
PRESETS: Dict[str, Dict[str, Any]] = {
    "default": dict(steps=800, batch=16, context=128, layers=4, d_model=128, heads=4, d_hidden=128,
                    experts=8, max_active=4, eval_batches=16, evals=5),
    "scale": dict(steps=4000, batch=16, context=256, layers=6, d_model=192, heads=4, d_hidden=192,
                  experts=8, max_active=4, eval_batches=32, evals=10),
    "quick": dict(steps=6, batch=4, context=32, layers=2, d_model=32, heads=4, d_hidden=32,
                  experts=8, max_active=4, eval_batches=2, evals=2),
}
DEFAULT_MINUTES = 25  # expected wall time of the default run on 2 idle cores (from measured step times)

__doc__ = __doc__.format(steps=PRESETS["default"]["steps"], minutes=DEFAULT_MINUTES)


# ---- command line ---------------------------------------------------------------------------


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="UTF-8 text file (.gz ok), split into train / held-out "
                    "(the last 5%%); default: the bundled Python docs")
    ap.add_argument("--out", default=None, help="folder for quality.json and the PNGs (default: benchmarks/results; "
                    "with --quick: a folder in the system's temporary directory, so smoke runs never "
                    "overwrite the committed results)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD",
                    help="subset of: " + ", ".join(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    ap.add_argument("--steps", type=int, default=None,
                    help=f"training steps per run (default {PRESETS['default']['steps']}; "
                         f"--scale {PRESETS['scale']['steps']}; --quick {PRESETS['quick']['steps']})")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--scale", action="store_true",
                      help="longer, larger configuration (6 layers, d_model 192, context 256, 4000 steps): "
                           "many hours on 2 CPU cores; meant for a bigger machine")
    size.add_argument("--quick", action="store_true", help="smoke run: tiny model, a few steps (for tests)")
    g = ap.add_argument_group("overrides of the preset (default: the preset's value)")
    for name in ("batch", "context", "layers", "d-model", "heads", "d-hidden", "experts", "max-active",
                 "eval-batches", "evals"):
        g.add_argument(f"--{name}", type=int, default=None)
    ap.add_argument("--eps", type=float, default=1e-2, help="SoftMoE truncation level (default 1e-2)")
    ap.add_argument("--alpha", type=float, default=1.0, help="SoftMoE LapSum temperature (default 1)")
    ap.add_argument("--k-min", type=float, default=1.0,
                    help="GlobalBudget floor of every layer's share (k_min / active_min, default 1)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--budget-lr", type=float, default=3e-2, help="learning rate of the budget logits")
    ap.add_argument("--active-window", type=int, default=None,
                    help="average the realised active experts (and the budget's shares) over the last N steps "
                         "(default: the last 10 %% of the steps)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default, all cores). On a shared machine use 1: with 2 "
                         "threads on 2 cores and one other busy process, a training step ran 4-15x slower "
                         "than with 1 thread in our measurements")
    ap.add_argument("--jobs", type=int, default=1,
                    help="training runs at once, each in its own process with --threads threads (default 1: "
                         "one after the other in this process). With --jobs 2 --threads 1 two runs share 2 cores")
    ap.add_argument("--autocast", choices=["bf16"], default=None,
                    help="run every forward under torch.autocast('cpu', dtype=torch.bfloat16) (float32 weights)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    ap.add_argument("--no-step-timing", action="store_true",
                    help="skip the interleaved step timing of the trained models at the end")
    return ap.parse_args(argv)


def resolve(args: argparse.Namespace) -> Dict[str, Any]:
    preset = "scale" if args.scale else "quick" if args.quick else "default"
    cfg = dict(PRESETS[preset])
    cfg["preset"] = preset
    for key in list(PRESETS["default"]):
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    if cfg["steps"] < 1:
        raise SystemExit("--steps must be >= 1")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit("--seeds must be distinct")
    cfg["evals"] = max(1, min(cfg["evals"], cfg["steps"]))
    cfg.update(eps=args.eps, alpha=args.alpha, k_min=args.k_min, lr=args.lr, budget_lr=args.budget_lr,
               warmup=min(100, cfg["steps"] // 10 + 1), grad_clip=1.0, weight_decay=0.1,
               held_out_fraction=0.05,
               active_window=max(1, min(args.active_window or cfg["steps"] // 10, cfg["steps"])),
               autocast=args.autocast)
    return cfg


def budget_mean(method: str) -> float:
    """The budget of a SoftMoE method in its own unit (mean active experts, or mean soft count)."""
    spec = METHODS[method]
    return spec["mean_active"] if spec.get("mean_active") is not None else spec["mean_k"]


def autocast(cfg: Dict[str, Any]) -> torch.autocast:
    """The forward passes' mixed precision (--autocast); disabled without it."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.get("autocast") == "bf16")


def lm_config(method: str, cfg: Dict[str, Any]) -> LMConfig:
    return LMConfig(d_model=cfg["d_model"], layers=cfg["layers"], heads=cfg["heads"], context=cfg["context"],
                    experts=cfg["experts"], d_hidden=cfg["d_hidden"], k_min=cfg["k_min"],
                    max_active=cfg["max_active"], alpha=cfg["alpha"], eps=cfg["eps"], **METHODS[method])


# ---- one training run -----------------------------------------------------------------------


def eval_steps(steps: int, evals: int) -> List[int]:
    """The steps (1-based counts of finished steps) after which held-out bpb is measured."""
    return sorted({max(1, round(steps * (i + 1) / evals)) for i in range(evals)})


def param_counts(model: TinyLM, active: List[float]) -> Dict[str, float]:
    """Total parameters, and the parameters one token uses: everything but the experts it skips
    (``active[l]`` of layer l's experts are used, on average)."""
    total = sum(p.numel() for p in model.parameters())
    skipped = 0.0
    moe = [blk.ffn for blk in model.blocks if isinstance(blk.ffn, (softmoe.SoftMoELayer, TopKMoE))]
    for layer, a in zip(moe, active):
        per_expert = (layer.experts.w_in.numel() + layer.experts.w_out.numel()) / layer.num_experts
        skipped += (layer.num_experts - a) * per_expert
    return {"total": int(total), "active": float(total - skipped)}


def routing_load(layer: softmoe.SoftMoELayer) -> tuple:
    """(effective number of experts, routing diversity) of the layer's last forward.

    The effective number is N_eff = exp(entropy) of the load q_e = (tokens routed to e) / (routed
    pairs): E when every expert gets the same number of tokens. It is never below the mean number
    a of active experts per token (no expert gets more than all the tokens), and equals a exactly
    when every token goes to the same experts. The diversity N_eff / a is therefore 1 for routing
    that no longer depends on the token (the MoE has collapsed into one fixed mixture) and E / a
    for perfectly balanced routing."""
    counts = layer.last_stats["tokens_per_expert"].double()
    total = float(counts.sum())
    active = float(layer.last_stats["active_per_token"])
    if total <= 0 or active <= 0:
        return 0.0, 0.0
    q = counts[counts > 0] / total
    n_eff = float(torch.exp(-(q * q.log()).sum()))
    return n_eff, n_eff / active


def train_run(method: str, seed: int, cfg: Dict[str, Any], train: torch.Tensor,
              held: List, position: str = "", keep: Optional[Dict[str, Any]] = None, show_progress: bool = True) -> Dict[str, Any]:
    """Train one model; returns the run's record. ``keep[method] = (model, optimizer)`` if given."""
    torch.manual_seed(seed)
    lm = lm_config(method, cfg)
    model = TinyLM(lm)
    model.train()
    optimizer = make_optimizer(model, cfg["lr"], cfg["budget_lr"], weight_decay=cfg["weight_decay"])
    stream = batches(train, cfg["batch"], cfg["context"], torch.Generator().manual_seed(seed))
    steps, window = cfg["steps"], cfg["active_window"]
    evals_at = set(eval_steps(steps, cfg["evals"]))
    is_soft = lm.ffn == "softmoe"
    layers = model.moe_layers()
    share_lo = share_hi = None
    if is_soft:
        share_lo, share_hi = model.budget.low, model.budget.high

    # "k": the budget's shares per layer (soft counts for mean_k, active targets for mean_active);
    # "soft_count": the layers' soft counts k_l (the same as "k" for mean_k)
    hist: Dict[str, List] = {"step": [], "loss": [], "k": [], "soft_count": [], "active": [], "diversity": []}
    recent_alloc: List[List[float]] = []  # the budget's shares, the last `window` steps
    curve: Dict[str, List] = {"step": [], "bpb": []}
    recent_active: List[List[float]] = []  # realised active per layer, the last `window` steps
    alloc_min = alloc_max = None
    active_min: Optional[List[float]] = None
    load_min: Optional[List[float]] = None  # per layer, the least effective number of experts seen
    diversity_min: Optional[List[float]] = None  # per layer, the least routing diversity seen
    below: List[int] = [0] * len(layers)  # per layer, consecutive steps so far below COLLAPSE_DIVERSITY
    below_longest: List[int] = [0] * len(layers)
    recent_diversity: List[List[float]] = []  # the last `window` steps
    nan_step: Optional[int] = None
    nan_what = ""
    train_s = eval_s = 0.0
    t_wall = time.perf_counter()
    bar = (_timing.progress(range(steps), desc=f"{position}{method} seed {seed}", dynamic_ncols=True,
                            leave=True, mininterval=1.0) if show_progress else range(steps))
    done = 0
    for step in bar:
        t0 = time.perf_counter()
        set_lr(optimizer, step, steps, warmup=cfg["warmup"])
        x, y = next(stream)
        with autocast(cfg):
            ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss = ce + model.aux_loss()
        if not torch.isfinite(loss):
            nan_step, nan_what = step, f"loss = {loss.item()}"
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        if not torch.isfinite(gnorm):
            nan_step, nan_what = step, f"gradient norm = {gnorm.item()}"
            break
        optimizer.step()
        active = model.active_experts()  # per MoE layer, this step's forward
        train_s += time.perf_counter() - t0
        done = step + 1

        if active:
            recent_active.append(active)
            del recent_active[:-window]
            active_min = active if active_min is None else [min(a, b) for a, b in zip(active_min, active)]
        if layers:
            load = [routing_load(layer) for layer in layers]
            n_eff = [a for a, _ in load]
            diversity = [b for _, b in load]
            load_min = n_eff if load_min is None else [min(a, b) for a, b in zip(load_min, n_eff)]
            diversity_min = (diversity if diversity_min is None
                             else [min(a, b) for a, b in zip(diversity_min, diversity)])
            below = [n + 1 if not d >= COLLAPSE_DIVERSITY else 0 for n, d in zip(below, diversity)]
            below_longest = [max(a, b) for a, b in zip(below_longest, below)]
            recent_diversity.append(diversity)
            del recent_diversity[:-window]
        alloc: List[float] = []
        if is_soft:
            with torch.no_grad():
                alloc = model.budget.allocation().tolist()
            recent_alloc.append(alloc)
            del recent_alloc[:-window]
            alloc_min = alloc if alloc_min is None else [min(a, b) for a, b in zip(alloc_min, alloc)]
            alloc_max = alloc if alloc_max is None else [max(a, b) for a, b in zip(alloc_max, alloc)]
        if step % 10 == 0 or done == steps:
            hist["step"].append(done)
            hist["loss"].append(ce.item())
            hist["k"].append(alloc)
            hist["soft_count"].append([float(layer.last_stats["soft_count"]) for layer in layers] if is_soft else [])
            hist["active"].append(active)
            hist["diversity"].append(diversity if layers else [])
        if done in evals_at:
            t1 = time.perf_counter()
            curve["step"].append(done)
            with autocast(cfg):
                curve["bpb"].append(bits_per_byte(model, held))
            eval_s += time.perf_counter() - t1
        if hasattr(bar, "set_postfix") and (step % 10 == 0 or done == steps):
            post = {"loss": f"{ce.item():.3f}"}
            if curve["bpb"]:
                post["bpb"] = f"{curve['bpb'][-1]:.3f}"
            if active:
                post["active"] = f"{sum(active) / len(active):.2f}"
            bar.set_postfix(post, refresh=False)
    if hasattr(bar, "close"):
        bar.close()
    wall = time.perf_counter() - t_wall
    if nan_step is not None:
        print(f"{method} seed {seed}: stopped at step {nan_step}: {nan_what}", file=sys.stderr)

    if layers or any(isinstance(b.ffn, TopKMoE) for b in model.blocks):
        if recent_active:
            active_mean = [statistics.fmean(col) for col in zip(*recent_active)]
        else:
            active_mean = [float("nan")] * len(model.active_experts() or [])
    else:
        active_mean = []
    params = param_counts(model, active_mean)
    final_bpb = curve["bpb"][-1] if nan_step is None and curve["bpb"] else float("nan")
    run: Dict[str, Any] = {
        "method": method,
        "seed": seed,
        "steps_done": done,
        "final_bpb": final_bpb,
        "bpb_curve": curve,
        "active_per_layer": active_mean,
        "active_mean": statistics.fmean(active_mean) if active_mean else None,
        "tokens_per_s": done * cfg["batch"] * cfg["context"] / train_s if train_s > 0 else float("nan"),
        "train_s": train_s,
        "eval_s": eval_s,
        "wall_s": wall,
        "params": params,
        "nan": nan_step is not None,
        "nan_step": nan_step,
        "nan_what": nan_what,
        "history": hist,
    }
    if is_soft:
        final_alloc = model.budget.allocation().detach().tolist()
        run["allocation"] = final_alloc
        run["allocation_sum"] = sum(final_alloc)
        run["active_window"] = window
        run["budget_unit"] = model.budget.unit
        run["budget_mean"] = model.budget.mean
        run["k_range"] = [share_lo, share_hi]  # the range of the shares (either unit)
        run["allocation_window"] = [statistics.fmean(col) for col in zip(*recent_alloc)] if recent_alloc else None
        run["soft_count"] = [float(layer.k.detach()) for layer in layers]
        if model.budget.unit == "mean_active" and run["allocation_window"] is not None:
            # realised minus assigned, per layer, both averaged over the last `window` steps
            run["budget_error_per_layer"] = [a - b for a, b in zip(active_mean, run["allocation_window"])]
        run["max_active"] = lm.max_active
        run["allocation_min_seen"] = alloc_min
        run["allocation_max_seen"] = alloc_max
        run["active_min_seen"] = active_min
        run["load_experts_min_seen"] = load_min
        run["diversity_min_seen"] = diversity_min
        run["diversity_below_longest"] = below_longest if layers and done else None
        run["diversity_final"] = ([statistics.fmean(col) for col in zip(*recent_diversity)]
                                  if recent_diversity else None)
        run["tokens_per_expert_share_max"] = [
            float(layer.last_stats["tokens_per_expert"].max() / layer.last_stats["tokens_per_expert"].sum())
            for layer in layers if "tokens_per_expert" in layer.last_stats
        ]
        run["router_entropy"] = [float(layer.last_stats["router_entropy"]) for layer in layers
                                 if "router_entropy" in layer.last_stats]
    else:
        topk = [blk.ffn for blk in model.blocks if isinstance(blk.ffn, TopKMoE)]
        if topk:
            run["load_balancing_loss"] = [float(layer.last_losses["load_balancing"]) for layer in topk
                                          if "load_balancing" in layer.last_losses]
    if keep is not None and nan_step is None:
        keep[method] = (model, optimizer)
    return run


def _worker_run(method: str, seed: int, cfg: Dict[str, Any], data: str, threads: int, last: bool):
    """One training run in a worker process (--jobs): the run's record, and for the last seed the
    trained model's state_dict (the parent rebuilds the model for the step timing)."""
    torch.set_num_threads(max(1, threads))
    train, held = split(load_bytes(data), cfg["held_out_fraction"])
    held_batches = fixed_batches(held, count=cfg["eval_batches"], batch=cfg["batch"], context=cfg["context"])
    keep: Dict[str, Any] = {}
    run = train_run(method, seed, cfg, train, held_batches, position="", keep=keep if last else None, show_progress=False)
    state = keep[method][0].state_dict() if method in keep else None
    return run, state


def train_in_workers(order: List[tuple], cfg: Dict[str, Any], args: argparse.Namespace,
                     trained: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The runs of ``order`` ((method, seed) pairs) in ``args.jobs`` worker processes; returns their
    records in ``order`` and fills ``trained`` with the last seed's models (and fresh optimizers)."""
    import concurrent.futures
    import multiprocessing

    runs: Dict[tuple, Dict[str, Any]] = {}
    last = args.seeds[-1]
    context = multiprocessing.get_context("spawn")  # no fork of a process that runs torch threads
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
        futures = {pool.submit(_worker_run, m, seed, cfg, args.data, args.threads, seed == last): (m, seed)
                   for m, seed in order}
        for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
            m, seed = futures[future]
            run, state = future.result()
            runs[(m, seed)] = run
            print(f"[{n}/{len(order)}] {m} seed {seed}: held-out bpb {run['final_bpb']:.4f}, active "
                  f"{run['active_mean'] if run['active_mean'] is not None else '-'} ({run['wall_s']:.0f} s)", flush=True)
            if state is not None:
                model = TinyLM(lm_config(m, cfg))
                model.load_state_dict(state)
                model.train()
                trained[m] = (model, make_optimizer(model, cfg["lr"], cfg["budget_lr"], weight_decay=cfg["weight_decay"]))
    return [runs[key] for key in order]


def step_timing(models: Dict[str, Any], cfg: Dict[str, Any], train: torch.Tensor, quick: bool,
                active: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """Time one training step (forward, backward, clipping, AdamW) of each trained model, round
    robin over the methods (benchmarks/_timing.py), so that the noise of a shared machine hits all
    methods alike; ratios are against topk2 (else the first method) from the same repeats. The
    learning rates are set to 0, so the timing leaves the models unchanged. SoftMoE's cost depends
    on the realised active experts, hence the trained models (of the last seed); their count
    steering keeps running (it is state, not a weight). ``active``: each method's realised mean
    active experts per token; with topk1 and topk2 timed, each MoE method also gets
    ``time_ratio_vs_topk_at_equal_active``: its step time over TopKMoE's at the same realised count,
    interpolated linearly between top-1 and top-2 (extrapolated beyond)."""
    x, y = next(batches(train, cfg["batch"], cfg["context"], torch.Generator().manual_seed(12345)))
    cases = []
    for method, (model, optimizer) in models.items():
        for g in optimizer.param_groups:
            g["lr"] = 0.0

        def fn(_state, model=model, optimizer=optimizer):
            with autocast(cfg):
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten()) + model.aux_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
            optimizer.step()

        cases.append(_timing.Case(method, fn))
    stats = _timing.measure(cases, repeats=3 if quick else 7, warmup=1 if quick else 3,
                            min_repeat_s=0.05 if quick else 1.0)
    base = "topk2" if "topk2" in stats else next(iter(stats))
    tokens = cfg["batch"] * cfg["context"]
    out = {"baseline": base, "tokens_per_step": tokens, "methods": {}}
    for method, st in stats.items():
        out["methods"][method] = {
            "step_ms_median": st.median_ms,
            "tokens_per_s": tokens / (st.median_ms / 1e3),
            f"time_ratio_vs_{base}": _timing.median_of_ratios(st, stats[base]),
            "stats": st.as_dict(),
        }
    if active and "topk1" in stats and "topk2" in stats:
        t1, t2 = stats["topk1"].median_ms, stats["topk2"].median_ms
        for method, entry in out["methods"].items():
            a = active.get(method)
            if a is not None and math.isfinite(a):
                entry["active_mean"] = a
                entry["time_ratio_vs_topk_at_equal_active"] = entry["step_ms_median"] / (t1 + (a - 1.0) * (t2 - t1))
    return out


# ---- checks, aggregation, table -------------------------------------------------------------


# A SoftMoE layer has collapsed when its routing no longer depends on the token: every token goes
# to (nearly) the same experts, so the layer is one fixed mixture of experts, a dense FFN in
# disguise. Measured by the routing diversity N_eff / a (routing_load): exactly 1 for such routing,
# E / a for balanced routing; one shared expert that every token uses plus a second one spread over
# the other 7 of 8 gives 2.65. The check fails a layer whose diversity stays below
# COLLAPSE_DIVERSITY for COLLAPSE_FRACTION of the run's steps in a row, or whose mean over the last
# --active-window steps is below it. A short dip is not a collapse: in the default 800-step runs
# (seed 0, softmoe_k1.5 and softmoe_k2.0) every layer dips to 1.01-1.07 during warm-up (steps
# ~20-50, while the active experts per token saturate at max_active), for at most 6 consecutive
# steps, and recovers; at the end the diversity is 1.84-2.38.
COLLAPSE_DIVERSITY = 1.1
COLLAPSE_FRACTION = 0.1
# A budget in mean_active must be met: each layer's realised count within this of its share,
# averaged over the last --active-window steps.
BUDGET_TOLERANCE = 0.1


def collapse_steps(steps: int) -> int:
    """Consecutive steps below COLLAPSE_DIVERSITY that count as a collapse: 10 % of the run."""
    return max(1, math.ceil(COLLAPSE_FRACTION * steps))


def check_run(run: Dict[str, Any]) -> List[str]:
    """Failures of the SoftMoE safeguards in this run (empty: all good): a non-finite loss or
    gradient norm, a share outside its range, realised active experts below 1, a mean_active budget
    not met (a layer's realised count off its share by more than BUDGET_TOLERANCE), or a collapsed
    layer (routing diversity below COLLAPSE_DIVERSITY at any step)."""
    if not run["method"].startswith("softmoe"):
        return []
    fails = []
    tag = f"{run['method']} seed {run['seed']}"
    if run["nan"]:
        fails.append(f"{tag}: non-finite {run['nan_what']} at step {run['nan_step']}")
    lo, hi = run["k_range"]
    if run["allocation_min_seen"] is not None:
        for layer, (a, b) in enumerate(zip(run["allocation_min_seen"], run["allocation_max_seen"])):
            if not (lo < a and b < hi):
                fails.append(f"{tag}: layer {layer} share left ({lo}, {hi}): min {a:.4f}, max {b:.4f}")
    for layer, err in enumerate(run.get("budget_error_per_layer") or []):
        if not abs(err) <= BUDGET_TOLERANCE:
            fails.append(f"{tag}: layer {layer} realised {err:+.3f} active experts per token off its budget share "
                         f"(tolerance {BUDGET_TOLERANCE}, averaged over the last {run['active_window']} steps)")
    if run["active_min_seen"] is not None:
        for layer, a in enumerate(run["active_min_seen"]):
            if not a >= 1.0:
                fails.append(f"{tag}: layer {layer} realised active experts fell to {a:.3f} < 1")
    longest, final = run.get("diversity_below_longest"), run.get("diversity_final")
    if (longest is None or final is None) and not run["nan"]:
        fails.append(f"{tag}: no routing diversity recorded (the collapse check cannot run)")
    limit = collapse_steps(run["steps_done"])
    for layer, n in enumerate(longest or []):
        if n >= limit:
            fails.append(f"{tag}: layer {layer} collapsed: routing diversity N_eff / active stayed below "
                         f"{COLLAPSE_DIVERSITY} for {n} consecutive steps (limit {limit}: every token routed "
                         f"to the same experts)")
    for layer, d in enumerate(final or []):
        if not d >= COLLAPSE_DIVERSITY:
            fails.append(f"{tag}: layer {layer} collapsed at the end: mean routing diversity {d:.3f} "
                         f"< {COLLAPSE_DIVERSITY} over the last steps")
    return fails


def _stats(values: List[float]) -> Dict[str, Any]:
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def aggregate(runs: List[Dict[str, Any]], methods: List[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        agg: Dict[str, Any] = {
            "seeds": [r["seed"] for r in rs],
            "bpb": _stats([r["final_bpb"] for r in rs]),
            "bpb_per_seed": [r["final_bpb"] for r in rs],
            "tokens_per_s": _stats([r["tokens_per_s"] for r in rs])["mean"],
            "wall_s": _stats([r["wall_s"] for r in rs])["mean"],
            "params_total": rs[0]["params"]["total"],
            "params_active": statistics.fmean(r["params"]["active"] for r in rs),
            "any_nan": any(r["nan"] for r in rs),
        }
        if rs[0]["active_per_layer"]:
            per_layer = [statistics.fmean(col) for col in zip(*(r["active_per_layer"] for r in rs))]
            agg["active_per_layer"] = per_layer
            agg["active_mean"] = statistics.fmean(per_layer)
        if "allocation" in rs[0]:
            agg["allocation"] = [statistics.fmean(col) for col in zip(*(r["allocation"] for r in rs))]
            agg["allocation_per_seed"] = [r["allocation"] for r in rs]
        out[m] = agg
    # Paired differences: runs of the same seed saw the same init seed and the same batches.
    for ref in ("topk2", "dense"):
        if ref not in out:
            continue
        ref_bpb = {r["seed"]: r["final_bpb"] for r in runs if r["method"] == ref}
        for m, agg in out.items():
            deltas = [r["final_bpb"] - ref_bpb[r["seed"]] for r in runs if r["method"] == m and r["seed"] in ref_bpb]
            agg[f"delta_bpb_vs_{ref}"] = _stats(deltas)
            agg[f"delta_bpb_vs_{ref}_per_seed"] = deltas
    return out


def markdown_table(agg: Dict[str, Any], timing: Optional[Dict[str, Any]] = None) -> str:
    timed = (timing or {}).get("methods", {})
    base = (timing or {}).get("baseline", "")
    lines = [
        "| method | held-out bpb: mean ± std [min, max] | active experts / token: mean (per layer) "
        "| learned share per layer (a_l or k_l) | Δ bpb vs topk2 (paired by seed): mean [min, max] | tokens/s (training run) "
        f"| step time, interleaved (× {base or 'baseline'}) | params active / total | wall s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, a in agg.items():
        b = a["bpb"]
        bpb = (f"{b['mean']:.4f} ± {b['std']:.4f} [{b['min']:.4f}, {b['max']:.4f}]" if b["n"] else "NaN")
        if a.get("any_nan"):
            bpb += " (NaN in a run)"
        if "active_per_layer" in a:
            act = f"{a['active_mean']:.2f} ({' / '.join(f'{v:.2f}' for v in a['active_per_layer'])})"
        else:
            act = "— (dense FFN, 1 expert's size)"
        k = " / ".join(f"{v:.2f}" for v in a["allocation"]) if "allocation" in a else "—"
        params = f"{a['params_active'] / 1e6:.2f} M / {a['params_total'] / 1e6:.2f} M"
        d = a.get("delta_bpb_vs_topk2")
        delta = f"{d['mean']:+.4f} [{d['min']:+.4f}, {d['max']:+.4f}]" if d and d["n"] else "—"
        t = timed.get(m)
        step = f"{t['step_ms_median']:.0f} ms ({t[f'time_ratio_vs_{base}']:.2f}×)" if t else "—"
        if t and "time_ratio_vs_topk_at_equal_active" in t:
            step += f"; {t['time_ratio_vs_topk_at_equal_active']:.2f}× top-k at equal active"
        lines.append(f"| {m} | {bpb} | {act} | {k} | {delta} | {a['tokens_per_s']:.0f} | {step} | {params} "
                     f"| {a['wall_s']:.0f} |")
    return "\n".join(lines)


# ---- plots ----------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return None
    return plt


def _ema(values: List[float], beta: float = 0.9) -> List[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else beta * acc + (1 - beta) * v
        out.append(acc)
    return out


def plot_curves(runs: List[Dict[str, Any]], methods: List[str], path: str, title: str) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    top, bottom = -math.inf, math.inf
    for i, m in enumerate(methods):
        rs = [r for r in runs if r["method"] == m and not r["nan"]]
        if not rs:
            continue
        c = colors[i % len(colors)]
        steps = rs[0]["bpb_curve"]["step"]
        cols = list(zip(*(r["bpb_curve"]["bpb"] for r in rs if r["bpb_curve"]["step"] == steps)))
        if cols:
            mean = [statistics.fmean(v) for v in cols]
            axes[0].plot(steps, mean, marker="o", color=c, label=m)
            axes[0].fill_between(steps, [min(v) for v in cols], [max(v) for v in cols], color=c, alpha=0.2)
        hsteps = rs[0]["history"]["step"]
        losses = [r["history"]["loss"] for r in rs if r["history"]["step"] == hsteps]
        if losses:
            smooth = _ema([statistics.fmean(v) for v in zip(*losses)], 0.7)
            axes[1].plot(hsteps, smooth, color=c, label=m)
            tail = smooth[len(smooth) // 5 :] or smooth
            top = max(top, max(tail))
            bottom = min(bottom, min(tail))
    axes[0].set(title="held-out bits per byte (mean over seeds; band: min–max)", xlabel="step", ylabel="bits per byte")
    axes[1].set(title="training cross-entropy (nats, EMA, mean over seeds)", xlabel="step", ylabel="loss")
    if math.isfinite(top) and top > bottom:  # zoom past the first fifth of training
        pad = 0.05 * (top - bottom)
        axes[1].set_ylim(bottom - pad, top + pad)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_allocation(runs: List[Dict[str, Any]], methods: List[str], path: str, title: str) -> bool:
    soft = [m for m in methods if METHODS[m]["ffn"] == "softmoe" and any(r["method"] == m for r in runs)]
    if not soft:
        return False
    plt = _pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(2, len(soft), figsize=(4.8 * len(soft), 7), squeeze=False)
    for j, m in enumerate(soft):
        rs = [r for r in runs if r["method"] == m]
        steps = rs[0]["history"]["step"]
        same = [r for r in rs if r["history"]["step"] == steps]
        ks = [list(zip(*r["history"]["k"])) for r in same]  # [run][layer][time]
        acts = [list(zip(*r["history"]["active"])) for r in same]
        layers = len(ks[0])
        for layer in range(layers):
            k_mean = [statistics.fmean(v) for v in zip(*(k[layer] for k in ks))]
            a_mean = [statistics.fmean(v) for v in zip(*(a[layer] for a in acts))]
            axes[0][j].plot(steps, k_mean, label=f"layer {layer}")
            axes[1][j].plot(steps, _ema(a_mean, 0.8), label=f"layer {layer}")
        lo, hi = rs[0]["k_range"]
        unit = "active experts a_l" if rs[0]["budget_unit"] == "mean_active" else "soft count k_l"
        axes[0][j].axhline(budget_mean(m), color="gray", linestyle="--", linewidth=1, label="budget mean")
        axes[0][j].set(title=f"{m}: learned share ({unit})", xlabel="step", ylabel="share", ylim=(lo, hi))
        axes[1][j].axhline(rs[0]["max_active"], color="gray", linestyle=":", linewidth=1, label="max_active cap")
        axes[1][j].set(title=f"{m}: realised active experts / token", xlabel="step", ylabel="mean |M|")
        for ax in (axes[0][j], axes[1][j]):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(title + " (mean over seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- main -----------------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = resolve(args)
    if args.out is None:
        args.out = os.path.join(tempfile.gettempdir(), "softmoe_quality_quick") if args.quick else DEFAULT_OUT
    methods = [m for m in METHODS if m in args.methods]
    info = _timing.machine_info()
    if argv is not None:  # called as a function (tests): record the arguments actually used
        info["argv"] = ["benchmarks/quality.py"] + list(argv)
        info["command"] = "python3 " + " ".join(info["argv"])

    data = load_bytes(args.data)
    train, held = split(data, cfg["held_out_fraction"])
    if len(held) < cfg["context"] + 2:
        raise SystemExit(f"--data {args.data}: the held-out part ({len(held)} bytes) is shorter than the context")
    held_batches = fixed_batches(held, count=cfg["eval_batches"], batch=cfg["batch"], context=cfg["context"])
    cfg.update(data=os.path.relpath(args.data, _ROOT) if args.data == DEFAULT_DATA else args.data,
               data_bytes=len(data), train_bytes=len(train), held_out_bytes=len(held),
               held_out_eval_bytes=cfg["eval_batches"] * cfg["batch"] * cfg["context"])
    print(f"data: {cfg['data']} ({len(train) / 1e6:.2f} MB train, {len(held) / 1e6:.3f} MB held out; "
          f"{cfg['held_out_eval_bytes']} held-out bytes scored)")
    print(f"preset {cfg['preset']}: {cfg['steps']} steps x batch {cfg['batch']} x context {cfg['context']}; "
          f"{cfg['layers']} layers, d_model {cfg['d_model']}, {cfg['experts']} experts x {cfg['d_hidden']} hidden, "
          f"max_active {cfg['max_active']}; methods {', '.join(methods)}; seeds {args.seeds}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    runs: List[Dict[str, Any]] = []
    t0 = time.perf_counter()
    total = len(methods) * len(args.seeds)
    # Seed-major order: every method of seed 0, then of seed 1, ... so that slow drifts of a
    # shared machine hit all methods alike.
    trained: Dict[str, Any] = {}
    order = [(m, seed) for seed in args.seeds for m in methods]
    if args.jobs > 1:
        runs = train_in_workers(order, cfg, args, trained)
    else:
        for m, seed in order:
            keep = trained if seed == args.seeds[-1] else None
            runs.append(train_run(m, seed, cfg, train, held_batches, position=f"[{len(runs) + 1}/{total}] ", keep=keep))
    timing = None
    if not args.no_step_timing and trained:
        print("timing one training step of each trained model, interleaved ...")
        last_active = {r["method"]: r["active_mean"] for r in runs if r["seed"] == args.seeds[-1] and r["active_mean"]}
        timing = step_timing(trained, cfg, train, quick=args.quick, active=last_active)
    trained.clear()
    elapsed = time.perf_counter() - t0

    agg = aggregate(runs, methods)
    failures = [f for r in runs for f in check_run(r)]
    table = markdown_table(agg, timing)
    print()
    print(table)
    print()
    for m, a in agg.items():
        if "allocation" in a:
            unit = "a_l (active experts)" if METHODS[m].get("mean_active") is not None else "k_l (soft count)"
            print(f"{m}: learned {unit} {['%.3f' % v for v in a['allocation']]} (sum {sum(a['allocation']):.3f} = "
                  f"{cfg['layers']} x {budget_mean(m)}), realised active {['%.2f' % v for v in a['active_per_layer']]}")
    soft_runs = [r for r in runs if r["method"].startswith("softmoe")]
    if failures:
        print("\nSAFEGUARD CHECKS FAILED:\n  " + "\n  ".join(failures))
    elif soft_runs:
        longest = max((n for r in soft_runs for n in (r.get("diversity_below_longest") or [])), default=0)
        final = min((d for r in soft_runs for d in (r.get("diversity_final") or [])), default=float("nan"))
        print(f"\nsafeguard checks passed for all {len(soft_runs)} SoftMoE runs over all their steps: no NaN/inf; "
              f"every layer's share stayed strictly inside its range; mean_active budgets met within "
              f"{BUDGET_TOLERANCE} per layer; realised active experts >= 1; no layer "
              f"collapsed (routing diversity N_eff / active below {COLLAPSE_DIVERSITY} for at most {longest} "
              f"consecutive steps, limit {collapse_steps(cfg['steps'])}; at the end >= {final:.2f})")
    print(f"total wall time: {elapsed:.0f} s ({elapsed / 60:.1f} min)")

    os.makedirs(args.out, exist_ok=True)
    title = (f"{cfg['preset']}: {cfg['steps']} steps, batch {cfg['batch']} x {cfg['context']}, "
             f"{cfg['layers']} layers, d_model {cfg['d_model']}, {cfg['experts']} experts; seeds {args.seeds}")
    plots = {}
    if not args.no_plot:
        p = os.path.join(args.out, "quality.png")
        if plot_curves(runs, methods, p, title):
            plots["curves"] = p
        p = os.path.join(args.out, "quality_allocation.png")
        if plot_allocation(runs, methods, p, title):
            plots["allocation"] = p
    result = {
        "benchmark": "quality",
        "machine": info,
        "config": cfg,
        "methods": {m: METHODS[m] for m in methods},
        "seeds": args.seeds,
        "total_wall_s": elapsed,
        "aggregate": agg,
        "step_timing": timing,
        "table_markdown": table,
        "checks": {"passed": not failures, "failures": failures, "softmoe_runs": len(soft_runs),
                   "collapse_diversity": COLLAPSE_DIVERSITY, "collapse_steps": collapse_steps(cfg["steps"]),
                   "diversity_min": min((d for r in soft_runs for d in (r.get("diversity_min_seen") or [])),
                                        default=None)},
        "plots": {k: os.path.basename(v) for k, v in plots.items()},
        "runs": runs,
    }
    path = os.path.join(args.out, "quality.json")
    _timing.write_json(path, result)
    print(f"wrote {path}" + "".join(f", {v}" for v in plots.values()))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
