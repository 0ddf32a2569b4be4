#!/usr/bin/env python3
"""Peak memory per token of one MoE FFN layer: SoftMoELayer vs TopKMoE (top-2) vs a dense SwiGLU
FFN with the same active parameters, float32 on the CPU, d_model 512, E in {8, 64} with d_hidden
1024 (E = 8) / 256 (E = 64), as in benchmarks/bench_layer.py, whose layers, step functions and
peak-memory measurement this script reuses (import, not copy).

Per (E, mode, method, tokens) a fresh subprocess builds the layer and input, runs one warm-up
step, frees the gradients, malloc_trim(0)s, reads VmRSS, resets the peak (/proc/self/clear_refs),
runs one step and reads VmHWM: "peak" = VmHWM - VmRSS, what one step adds on top of weights and
input (activations, temporaries, gradients) as the OS sees it.
  fwd+bwd     y = m(x); (y * g).sum().backward(), x.requires_grad (as inside a network)
  inference   m(x) under torch.inference_mode() (SoftMoELayer.inference for softmoe)
The children run with MALLOC_MMAP_THRESHOLD_=65536: every allocation of 64 KiB or more (every
tensor that scales with tokens) is its own mmap and goes back to the OS when freed, so the resident
peak is the peak of live memory, page-rounded, and repeats to 0.2 MB. With glibc's default
(dynamic) threshold, freed blocks stay in the heap and count too, by an amount that changes with
the randomised address-space layout from one process to the next (softmoe, E = 8, 1024 tokens,
fwd+bwd: 136 to 142 MB, sometimes 104 MB, against 72.4 MB every time with the fixed threshold):
--malloc-default measures that instead, best with --repeats 3 (the smallest peak is kept; all
repeats are in the JSON).
bytes/token is the least-squares slope of peak vs tokens over --tokens, so fixed costs
(weight gradients, thread-pool buffers) do not count; "fixed MB" is the intercept. For reference,
the layer's own input is d_model * 4 = 2048 bytes/token.

SoftMoELayer runs at k = 1.0, eps = 1e-2, max_active = 3 with its router scaled so that the
realised mean number of active experts per token is 2.0 (bench_layer's bisection, per (E, tokens)):
the same expert FLOPs as top-2. In eager mode the layer trims its dispatch plan to the routed pairs
(DispatchPlan.trim), so its expert buffers scale with the realised count, not with max_active.

The JSON records the git commit and whether the tree was dirty, so a re-run after a layer change
is comparable to the committed one:

    python3 benchmarks/bench_memory.py --threads 1             # full run, ~6 min on 2 busy cores
    python3 benchmarks/bench_memory.py --quick --threads 1     # smoke run, small sizes (~2 min)
    python3 benchmarks/bench_memory.py --experts 8 --tokens 1024,8192
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

_HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_JSON = os.path.join(_HERE, "results", "bench_memory.json")
DEFAULT_MD = os.path.join(os.path.dirname(_HERE), "docs", "memory.md")
METHODS = ["softmoe", "topk", "dense"]
MODES = ["fwd+bwd", "inference"]
INPUT_BYTES_PER_TOKEN = 4  # float32, times d_model


def child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """One measurement in this (fresh) process: bench_layer's child_memory plus, for softmoe, the
    realised routing of the measured layer on the measured input."""
    import torch

    import bench_layer

    out = bench_layer.child_memory(spec)
    if spec["method"] == "softmoe":
        layer = bench_layer.build("softmoe", spec["cfg"])
        x, _ = bench_layer.make_input(spec["cfg"])
        out["realised_mean_active"] = bench_layer.realised_active(layer, x)
    out["torch_threads"] = torch.get_num_threads()
    return out


MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_child(spec: Dict[str, Any], malloc_default: bool) -> Dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)]
    env = dict(os.environ)
    for key in MALLOC_ENV:
        env.pop(key, None)
    if not malloc_default:
        env.update(MALLOC_ENV)
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"bench_memory child {spec['method']} {spec['mode']} T={spec['cfg']['tokens']} "
                           f"failed:\n{res.stderr.strip()[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def router_scale(cfg: Dict[str, Any], target: float) -> Dict[str, float]:
    import bench_layer

    x, _ = bench_layer.make_input(cfg)
    scale, active = bench_layer.tune_router_scale(cfg, x, target)
    return {"router_scale": scale, "tuned_mean_active": active}


def fit_line(xs: List[float], ys: List[float]) -> Dict[str, float]:
    """Least-squares y = slope * x + intercept, and the largest residual relative to the range of
    y (how well "per token" describes the data: near 0 when peak is linear in tokens)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    resid = max(abs(y - (slope * x + intercept)) for x, y in zip(xs, ys))
    span = max(ys) - min(ys)
    return {"slope": slope, "intercept": intercept, "max_residual_fraction": resid / span if span > 0 else 0.0}


def git_state() -> Dict[str, Any]:
    root = os.path.dirname(_HERE)

    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True)
        return res.stdout.strip() if res.returncode == 0 else ""

    # only what the measured layers are made of: other files changing mid-run do not matter
    dirty = git("status", "--porcelain", "--", "softmoe", "csrc", "benchmarks/bench_layer.py")
    return {"commit": git("rev-parse", "HEAD") or None, "layer_sources_dirty": bool(dirty),
            "dirty_files": dirty.splitlines()}


def markdown(data: Dict[str, Any]) -> str:
    s = data["settings"]
    lines = [
        f"Peak memory per token, float32, CPU, d_model = {s['d_model']}, tokens {', '.join(map(str, s['tokens']))}, "
        f"{s['threads']} thread(s); measured {data['finished_utc']} on commit "
        f"{(data['git']['commit'] or 'unknown')[:10]}{' (layer sources modified)' if data['git']['layer_sources_dirty'] else ''}"
        f"{'; the sources changed during the run' if data['git_changed_during_run'] else ''}.",
        "",
        "bytes/token = slope of the peak resident memory one step adds (VmHWM - VmRSS, fresh process"
        f"{'' if not s.get('child_malloc_env') else ', glibc mmap threshold 64 KiB: live memory, no allocator cache'}) "
        "against the token count; fixed MB = the intercept (weight gradients and other per-call constants); "
        "x input = bytes/token / the "
        f"{INPUT_BYTES_PER_TOKEN * s['d_model']} bytes/token of the float32 input itself; x topk = ratio to "
        "top-2 in the same mode.",
        "",
        "| E | d_hidden | mode | method | bytes/token | KiB/token | x input | x topk | fixed MB | "
        + " | ".join(f"peak MB @{t}" for t in s["tokens"]) + " |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(s["tokens"]),
    ]
    for r in data["results"]:
        for mode in MODES:
            base = r["modes"][mode]["topk"]["bytes_per_token"]
            for m in METHODS:
                if m not in r["modes"][mode]:
                    continue
                row = r["modes"][mode][m]
                name = m
                if m == "softmoe":
                    act = [p.get("realised_mean_active") for p in row["points"]]
                    name = f"softmoe (mean active {min(act):.2f}-{max(act):.2f}, max_active {r['config']['max_active']})"
                elif m == "dense":
                    name = f"dense (hidden {2 * r['config']['d_hidden']})"
                elif m == "topk":
                    name = "topk (top-2)"
                bpt = row["bytes_per_token"]
                lines.append(
                    f"| {r['config']['experts']} | {r['config']['d_hidden']} | {mode} | {name} | {bpt:.0f} | "
                    f"{bpt / 1024:.1f} | {bpt / (INPUT_BYTES_PER_TOKEN * s['d_model']):.1f} | {bpt / base:.2f} | "
                    f"{row['fixed_mb']:.1f} | " + " | ".join(f"{p['peak_rss_delta_mb']:.1f}" for p in row["points"]) + " |"
                )
    return "\n".join(lines)


DOC_HEADER = """# Memory

Generated by `python3 benchmarks/bench_memory.py --threads 1` (raw data:
`benchmarks/results/bench_memory.json`); re-run it after a change to the layer and commit both files.
How it measures: see the script's docstring. Checking memory *errors* (leaks, out-of-bounds
accesses) is a different thing: `make memcheck` (tests/memcheck/run.py).

"""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1024,4096,8192", help="comma-separated token counts (>= 2 distinct)")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--experts", default="8,64", help="comma-separated E (d_hidden 1024 for 8, 256 for 64, else 8192 / E)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--k", type=float, default=1.0)
    ap.add_argument("--max-active", type=int, default=3)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--target-active", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="fresh processes per point; the smallest peak counts (see the docstring)")
    ap.add_argument("--malloc-default", action="store_true",
                    help="keep glibc's default mmap threshold in the children (noisier; see the docstring)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every measurement (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="smoke run: d_model 128, tokens 256,1024,2048, small experts")
    ap.add_argument("--out", default=None, help=f"JSON results (default {os.path.relpath(DEFAULT_JSON)}; "
                    "with --quick a file in the temp directory, so a smoke run never replaces the real results)")
    ap.add_argument("--markdown", default=None, help=f"where the table goes (default {os.path.relpath(DEFAULT_MD)}; "
                    "with --quick none; '' to skip)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print(json.dumps(child(json.loads(args._child))))
        return 0

    import torch

    import _timing
    import bench_layer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r} (choose from {METHODS})")
    if "topk" not in methods:
        ap.error("topk is the ratio baseline and must be measured")
    experts = [int(e) for e in args.experts.split(",") if e]
    tokens = sorted({int(t) for t in args.tokens.split(",") if t})
    d_model = args.d_model
    d_hidden = {E: bench_layer.D_HIDDEN.get(E, max(16, 8192 // E)) for E in experts}
    if args.quick:
        d_model, tokens = 128, [256, 1024, 2048]
        d_hidden = {E: max(16, d_hidden[E] // 4) for E in experts}
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    if len(tokens) < 2:
        ap.error("--tokens needs at least two distinct counts for a slope")
    if args.out is None:
        args.out = os.path.join(tempfile.gettempdir(), "bench_memory_quick.json") if args.quick else DEFAULT_JSON
    if args.markdown is None:
        args.markdown = "" if args.quick else DEFAULT_MD

    started = time.time()
    git_at_start = git_state()  # the code the children load; compared with the end below
    info = _timing.machine_info()
    print(f"bench_memory: torch {torch.__version__}, {threads} threads, tokens {tokens}, d_model {d_model}, "
          f"load average {info.get('loadavg_at_start')}", flush=True)
    results = []
    for E in experts:
        entry: Dict[str, Any] = {"modes": {mode: {} for mode in MODES}}
        cfgs = {}
        for T in tokens:
            cfg = {"tokens": T, "d_model": d_model, "experts": E, "d_hidden": d_hidden[E], "k": args.k,
                   "eps": args.eps, "max_active": args.max_active, "seed": 1234, "dtype": "float32",
                   "router_scale": 1.0}
            if "softmoe" in methods:
                cfg.update(router_scale(cfg, args.target_active))
            cfgs[T] = cfg
        entry["config"] = {key: cfgs[tokens[-1]][key] for key in ("d_model", "experts", "d_hidden", "k", "eps", "max_active")}
        for mode in MODES:
            for m in methods:
                points = []
                for T in tokens:
                    spec = {"cfg": cfgs[T], "method": m, "mode": mode, "threads": threads, "alloc_profile": False}
                    runs = [run_child(spec, args.malloc_default) for _ in range(args.repeats)]
                    peaks = [r["peak_rss_delta_mb"] for r in runs]
                    res = min(runs, key=lambda r: r["peak_rss_delta_mb"])
                    res.update(tokens=T, router_scale=cfgs[T]["router_scale"], repeats_peak_rss_delta_mb=peaks)
                    points.append(res)
                fit = fit_line([p["tokens"] for p in points], [p["peak_rss_delta_mb"] * 2**20 for p in points])
                entry["modes"][mode][m] = {"bytes_per_token": fit["slope"], "fixed_mb": fit["intercept"] / 2**20,
                                           "max_residual_fraction": fit["max_residual_fraction"], "points": points}
                print(f"  E={E} {mode:9s} {m:8s} {fit['slope']:8.0f} bytes/token, fixed {fit['intercept'] / 2**20:6.1f} MB, "
                      "peaks " + ", ".join(f"{p['peak_rss_delta_mb']:.1f}" for p in points) + " MB", flush=True)
        results.append(entry)

    finished = datetime.datetime.now(datetime.timezone.utc)
    try:
        info["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    data = {
        "benchmark": "bench_memory",
        "finished_utc": finished.strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds": round(time.time() - started, 1),
        "git": git_at_start,
        "git_changed_during_run": git_state() != git_at_start,
        "machine": info,
        "settings": {"tokens": tokens, "d_model": d_model, "experts": experts, "threads": threads,
                     "repeats": args.repeats,
                     "child_malloc_env": {} if args.malloc_default else MALLOC_ENV,
                     "methods": methods, "quick": args.quick, "k": args.k, "eps": args.eps,
                     "max_active": args.max_active, "target_active": args.target_active},
        "notes": [
            "bytes_per_token: least-squares slope of peak_rss_delta_mb (VmHWM - VmRSS around one step in a "
            "fresh process, after a warm-up step; benchmarks/bench_layer.py child_memory; the smallest of "
            "settings.repeats processes, all in repeats_peak_rss_delta_mb) against tokens; "
            "fixed_mb: the intercept; max_residual_fraction: the worst deviation from the line / the range "
            "of the peaks.",
            "Includes activations, temporaries and gradients; excludes weights and the input. With "
            "settings.child_malloc_env (MALLOC_MMAP_THRESHOLD_=65536) the peak is that of live memory, "
            "page-rounded; without it, it also holds freed memory glibc keeps, which varies by process.",
        ],
        "results": results,
    }
    data["table_markdown"] = markdown(data)
    _timing.write_json(args.out, data)
    print()
    print(data["table_markdown"])
    print(f"\nwrote {args.out}")
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as fh:
            fh.write(DOC_HEADER + data["table_markdown"] + "\n")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
