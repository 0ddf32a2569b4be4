#!/usr/bin/env python3
"""Expert-parallel training step on the CPU (gloo over loopback): step time and bytes exchanged for
1, 2 and 4 processes.

Model: the README demo's TinyLM (softmoe/tiny_lm.py: 4 layers, d_model 128, 8 experts x 128 hidden,
SwiGLU, GlobalBudget mean k 1.5, max_active 4, float32), global batch 16 x 128 tokens, split over the
W processes (each runs batch / W rows: strong scaling; the same global batch as 1 process). W = 1 is
the plain single-process step (no exchange); W > 1 has every layer's experts split over the W
processes (softmoe.SoftMoELayer(expert_group=...)) and the replicated parameters under DDP
(softmoe.parallel.wrap_ddp), with the global-norm clipping of softmoe.parallel.clip_grad_norm_.

A step is: forward, cross-entropy, backward, gradient clipping, AdamW step. The processes pass a
barrier before each step; rank 0's wall time of the step is recorded; the median over --steps timed
steps (after --warmup) is reported, with the interquartile range. Bytes are counted by
softmoe.parallel.comm_stats() on every rank: all rows each rank sends in the expert all-to-alls
(forward dispatch + return, and the same two reversed in the backward), the part that goes to other
processes ("remote"), and the split-size exchanges; the table gives the mean over ranks per step and
per token (a rank's tokens: batch / W x context). DDP's gradient all-reduce of the replicated
parameters is not counted by softmoe; the JSON gives the ring all-reduce estimate
2 (W - 1) / W x replicated-parameter bytes per rank per step.

Each process uses --threads torch threads (default 1), so W = 4 runs 4 threads: on a 2-core machine
it oversubscribes the cores, and the step times say so.

  python3 benchmarks/bench_parallel.py                  # 1, 2, 4 processes (~2-4 minutes on 2 cores)
  python3 benchmarks/bench_parallel.py --procs 1 2 --steps 10
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import _timing  # benchmarks/_timing.py, beside this script

_HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_JSON = os.path.join(_HERE, "results", "bench_parallel.json")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--steps", type=int, default=12, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="global batch (rows of --context bytes)")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--d-hidden", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per process count before giving up")
    ap.add_argument("--out", default=DEFAULT_JSON)
    ap.add_argument("--worker", nargs=4, metavar=("RANK", "WORLD", "STORE", "RESULT"), help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist
    from torch.nn import functional as F

    from softmoe import parallel
    from softmoe.tiny_lm import LMConfig, TinyLM, batches, load_bytes, make_optimizer, split

    rank, world, store, result = int(args.worker[0]), int(args.worker[1]), args.worker[2], args.worker[3]
    torch.set_num_threads(args.threads)
    if world > 1:
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
    cfg = LMConfig(ffn="softmoe", d_model=args.d_model, layers=args.layers, context=args.context,
                   experts=args.experts, d_hidden=args.d_hidden, mean_k=1.5, max_active=4)
    torch.manual_seed(0)
    model = TinyLM(cfg, expert_group=dist.group.WORLD if world > 1 else None)
    train_model = parallel.wrap_ddp(model) if world > 1 else model
    optimizer = make_optimizer(model, 3e-3, 3e-2)
    train_data, _ = split(load_bytes())
    stream = batches(train_data, args.batch, args.context, torch.Generator().manual_seed(0))
    rows = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    times, sent, active = [], [], []
    for step in range(args.warmup + args.steps):
        x, y = next(stream)
        x, y = x[rows], y[rows]
        if world > 1:
            dist.barrier()
        before = parallel.comm_stats()
        t0 = time.perf_counter()
        loss = F.cross_entropy(train_model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            parallel.clip_grad_norm_(model, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        elapsed = time.perf_counter() - t0
        after = parallel.comm_stats()
        if step >= args.warmup:
            times.append(elapsed * 1e3)
            sent.append({key: after[key] - before[key] for key in after})
            active.append(sum(model.active_experts()) / cfg.layers)
    experts = {id(p) for p in parallel.expert_parameters(model)}
    replicated_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                           if p.requires_grad and id(p) not in experts)
    with open(result, "w") as f:
        json.dump({"rank": rank, "times_ms": times, "sent": sent, "active_per_token": active,
                   "tokens": (args.batch // world) * args.context, "replicated_param_bytes": replicated_bytes}, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run(args: argparse.Namespace, world: int, tmp: str) -> dict:
    store = os.path.join(tmp, f"store{world}")
    results = [os.path.join(tmp, f"w{world}_r{rank}.json") for rank in range(world)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), GLOO_SOCKET_IFNAME="lo")
    passthrough = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                   "--context", str(args.context), "--layers", str(args.layers), "--d-model", str(args.d_model),
                   "--experts", str(args.experts), "--d-hidden", str(args.d_hidden), "--threads", str(args.threads)]
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *passthrough,
                               "--worker", str(rank), str(world), store, results[rank]], env=env)
             for rank in range(world)]
    deadline = time.monotonic() + args.timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise RuntimeError(f"{world} processes did not finish within {args.timeout} s")
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{world} processes: a worker failed (exit codes {[p.returncode for p in procs]})")
    ranks = []
    for path in results:
        with open(path) as f:
            ranks.append(json.load(f))
    times = ranks[0]["times_ms"]
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [float("nan")] * 3

    def per_step(key: str) -> float:
        return statistics.mean(statistics.mean(s[key] for s in r["sent"]) for r in ranks)

    tokens = ranks[0]["tokens"]
    row = {
        "processes": world,
        "step_ms_median": statistics.median(times),
        "step_ms_iqr": q[2] - q[0],
        "step_ms_all_rank0": times,
        "tokens_per_rank": tokens,
        "global_tokens": tokens * world,
        "active_experts_per_token": statistics.mean(statistics.mean(r["active_per_token"]) for r in ranks),
        "bytes_sent_per_step": per_step("bytes_sent"),
        "bytes_sent_remote_per_step": per_step("bytes_sent_remote"),
        "count_bytes_per_step": per_step("count_bytes_sent"),
        "rows_sent_per_step": per_step("rows_sent"),
        "exchanges_per_step": per_step("exchanges"),
        "ddp_allreduce_bytes_per_step_estimate": 2 * (world - 1) / world * ranks[0]["replicated_param_bytes"],
    }
    row["bytes_sent_per_token"] = row["bytes_sent_per_step"] / tokens
    row["bytes_sent_remote_per_token"] = row["bytes_sent_remote_per_step"] / tokens
    # 4 exchanges per layer and step (forward dispatch and return, their two backward reversals),
    # each moving a rows of d_model float32 values per token.
    row["bytes_per_token_formula_all"] = 4 * args.layers * row["active_experts_per_token"] * args.d_model * 4 if world > 1 else 0.0
    row["tokens_per_s"] = tokens * world / (row["step_ms_median"] / 1e3)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    for world in args.procs:
        if args.batch % world or args.experts % world:
            raise SystemExit(f"--batch {args.batch} and --experts {args.experts} must be divisible by {world}")
    info = _timing.machine_info()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.procs:
            print(f"{world} process(es) ...", flush=True)
            rows.append(run(args, world, tmp))
    base = next((r["step_ms_median"] for r in rows if r["processes"] == 1), None)
    print("\n| processes | step (ms, median) | IQR | tokens/s | active experts/token | sent/step/rank (KB) "
          "| to other ranks/step/rank (KB) | remote bytes/token | split-size bytes/step | DDP all-reduce est. (KB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} | {r['step_ms_median']:.0f} | {r['step_ms_iqr']:.0f} | {r['tokens_per_s']:.0f} "
              f"| {r['active_experts_per_token']:.2f} | {r['bytes_sent_per_step'] / 1e3:.0f} "
              f"| {r['bytes_sent_remote_per_step'] / 1e3:.0f} | {r['bytes_sent_remote_per_token']:.0f} "
              f"| {r['count_bytes_per_step']:.0f} | {r['ddp_allreduce_bytes_per_step_estimate'] / 1e3:.0f} |")
    _timing.write_json(args.out, {"machine": info, "config": {k: v for k, v in vars(args).items() if k != "worker"},
                                  "baseline_step_ms": base, "rows": rows})
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
