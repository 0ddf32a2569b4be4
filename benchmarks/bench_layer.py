#!/usr/bin/env python3
"""Layer benchmark (DESIGN.md section 7): a whole MoE FFN layer, forward+backward and
inference-only, float32 on the CPU, tokens x d_model = 8192 x 512, E in {8, 64} with d_hidden =
1024 (E = 8) / 256 (E = 64).

Methods (all on one input; every expert method uses the same expert weights)
  topk      baseline (ratio denominator): softmoe.baselines.TopKMoE, top-2 (softmax, topk,
            renormalise), on softmoe's dispatch + grouped experts code.
  softmoe   softmoe.SoftMoELayer, eps = 1e-2, max_active = 3, k = 1.0, with the router weight
            scaled (router.weight.mul_(s)) so that the realised mean number of active experts per
            token on the benchmark input is 2.0 (the scale s is found by bisection before timing and
            reported with the realised mean from layer.last_stats): the same expert FLOPs as top-2.
            (For 1 < k < 2 the realised count is >= ceil(k) = 2 per token, so a mean of exactly 2
            needs k <= 1: then tokens use 1, 2 or 3 experts.)
  hf_loop   a naive per-expert Python loop like Hugging Face's eager Mixtral MoE block: softmax,
            topk(2), renormalise, one_hot expert mask, for each expert with tokens: torch.where,
            index the tokens, SwiGLU FFN with F.linear (separate w1, w3, w2 like Mixtral), scale,
            index_add_. Same routing and weights as topk (checked before timing).
  dense     a dense SwiGLU FFN with the same active parameters: hidden width 2 * d_hidden
            (two experts' worth), F.linear, no router.

Timing: forward+backward is y = m(x); (y * g).sum().backward() with x.requires_grad (as inside a
network) and the gradients reset to None before each step; inference is m(x) under
torch.inference_mode() (SoftMoELayer.inference for softmoe). Medians over --repeats timed repeats
after warm-up, the four methods interleaved round robin (benchmarks/_timing.py); "x topk" is
median(method) / median(topk) from the same run, "paired" the median over repeats of the
per-repeat ratio (repeats of the methods ran back to back, so slow drifts of the machine cancel).

Peak memory: tracemalloc does not see torch's allocations, so each (E, mode, method) runs in a
fresh subprocess: build the model and input, run one warm-up step, free the gradients and
malloc_trim(0), read VmRSS (the baseline: weights, input, upstream gradient), reset the peak with
/proc/self/clear_refs (5), run one step, read VmHWM. "peak MB" is VmHWM - baseline: the peak
resident memory the step adds (activations, temporaries, gradients) as the OS sees it, including
allocator fragmentation. Without /proc/self/clear_refs it falls back to ru_maxrss - baseline.
With --alloc-profile also (JSON only, "alloc_peak_mb"): torch.profiler's net allocation peak of one
step, which misses temporaries freed inside an operator.

  python3 benchmarks/bench_layer.py                 # full run, ~4-7 minutes on 2 cores
  python3 benchmarks/bench_layer.py --quick         # smoke run, small sizes (~1 min; more on a loaded machine)
  python3 benchmarks/bench_layer.py --threads 1      # one thread (steadier on a loaded 2-core machine)
  python3 benchmarks/bench_layer.py --malloc no-mmap # glibc keeps large blocks on its heap (see below)

Allocator: glibc's malloc serves blocks above its mmap threshold (at most 32 MB) with fresh mmaps
and returns them on free, so every step page-faults its large activations again (a [16384, 1024]
float32 tensor is 64 MB). softmoe's ops put their large CPU activations on 2 MB huge pages
(csrc/torch/cpu_runtime.cpp, empty_activation), which takes most of that cost off topk and softmoe; dense
still pays it, the per-expert loop hardly (its tensors are one expert's share). --malloc no-mmap
re-runs the benchmark with MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ at 1 GiB (the effect
of jemalloc / tcmalloc, or of PyTorch's CPU tuning advice), the same for every method.
  python3 benchmarks/bench_layer.py --experts 64 --repeats 9 --tokens 4096

Mixed precision: --autocast bf16 adds topk@bf16 and softmoe@bf16, the same layers (float32
weights) run under torch.autocast("cpu", dtype=torch.bfloat16), to the interleaved timings, and
reports each one's paired ratio to the same layer in float32 and softmoe@bf16's to topk@bf16.
  python3 benchmarks/bench_layer.py --autocast bf16 --threads 1 --no-memory
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import resource
import subprocess
import sys
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import _timing  # benchmarks/_timing.py, beside this script
from _timing import Case

_HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_JSON = os.path.join(_HERE, "results", "bench_layer.json")
METHODS = ["topk", "softmoe", "hf_loop", "dense"]
BASELINE = "topk"
MODES = ["fwd+bwd", "inference"]
D_HIDDEN = {8: 1024, 64: 256}
NO_MMAP_BYTES = str(1 << 30)
AUTOCAST = {"bf16": torch.bfloat16}
# with --autocast: the methods also timed under torch.autocast (name@dtype)
AUTOCAST_METHODS = ["topk", "softmoe"]


def split_method(method: str) -> Tuple[str, Any]:
    """("softmoe@bf16") -> ("softmoe", torch.bfloat16); a plain name -> (name, None)."""
    base, _, amp = method.partition("@")
    return base, AUTOCAST[amp] if amp else None


# --------------------------------------------------------------------------------------------
# The compared layers
# --------------------------------------------------------------------------------------------
class HFLoopMoE(nn.Module):
    """Hugging Face's eager Mixtral sparse MoE block (transformers' MixtralSparseMoeBlock.forward),
    with the expert weights of a softmoe GroupedExperts as separate w1 (gate), w3 (up), w2 (down)
    linear weights [out, in]."""

    def __init__(self, router: nn.Linear, experts, top_k: int = 2) -> None:
        super().__init__()
        h = experts.d_hidden
        self.top_k = top_k
        self.num_experts = experts.num_experts
        self.gate = nn.Linear(router.in_features, router.out_features, bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(router.weight)
        w_in, w_out = experts.w_in.detach(), experts.w_out.detach()
        self.w1 = nn.ParameterList([nn.Parameter(w_in[e, :, :h].t().contiguous()) for e in range(self.num_experts)])
        self.w3 = nn.ParameterList([nn.Parameter(w_in[e, :, h:].t().contiguous()) for e in range(self.num_experts)])
        self.w2 = nn.ParameterList([nn.Parameter(w_out[e].t().contiguous()) for e in range(self.num_experts)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        router_logits = self.gate(hidden_states)
        routing_weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        routing_weights, selected_experts = torch.topk(routing_weights, self.top_k, dim=-1)
        routing_weights /= routing_weights.sum(dim=-1, keepdim=True)
        routing_weights = routing_weights.to(hidden_states.dtype)
        final = torch.zeros_like(hidden_states)
        expert_mask = F.one_hot(selected_experts, num_classes=self.num_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            e = int(expert_idx)
            idx, top_x = torch.where(expert_mask[e])
            current = hidden_states[top_x]
            act = F.silu(F.linear(current, self.w1[e])) * F.linear(current, self.w3[e])
            out = F.linear(act, self.w2[e]) * routing_weights[top_x, idx, None]
            final.index_add_(0, top_x, out.to(hidden_states.dtype))
        return final.reshape(shape)


class DenseSwiGLU(nn.Module):
    """Dense SwiGLU FFN of hidden width `hidden` (fused gate/up projection, F.linear)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.w_in = nn.Linear(d_model, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).split(self.hidden, dim=-1)
        return self.w_out(F.silu(gate) * up)


def make_input(cfg: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg["seed"])
    x = torch.randn(cfg["tokens"], cfg["d_model"], generator=g)
    grad = torch.randn(cfg["tokens"], cfg["d_model"], generator=g)
    return x, grad


def build(method: str, cfg: Dict[str, Any]) -> nn.Module:
    """The layer of `method` for config cfg (same seed: same router and expert weights)."""
    import softmoe
    from softmoe.baselines import TopKMoE

    d, h, E = cfg["d_model"], cfg["d_hidden"], cfg["experts"]
    method, _ = split_method(method)  # the same layer (float32 weights) with or without autocast
    torch.manual_seed(cfg["seed"] + 1)
    if method == "dense":
        return DenseSwiGLU(d, 2 * h)
    topk = TopKMoE(d, h, E, top_k=2)
    if method == "topk":
        return topk
    if method == "hf_loop":
        return HFLoopMoE(topk.router, topk.experts, top_k=2)
    if method == "softmoe":
        layer = softmoe.SoftMoELayer(d, h, E, k=cfg["k"], eps=cfg["eps"], max_active=cfg["max_active"])
        with torch.no_grad():
            layer.experts.w_in.copy_(topk.experts.w_in)
            layer.experts.w_out.copy_(topk.experts.w_out)
            layer.router.weight.mul_(cfg["router_scale"])
        return layer
    raise ValueError(method)


def make_step(method: str, mode: str, model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], Any]:
    method, amp = split_method(method)
    step = _make_step(method, mode, model, x, grad)
    if amp is None:
        return step

    def autocast_step():
        with torch.autocast("cpu", dtype=amp):
            return step()

    return autocast_step


def _make_step(method: str, mode: str, model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], Any]:
    params = list(model.parameters())
    if mode == "inference":
        if method == "softmoe":
            return lambda: model.inference(x)

        def infer():
            with torch.inference_mode():
                return model(x)

        return infer
    xg = x.detach().clone().requires_grad_(True)

    def step():
        for p in params:
            p.grad = None
        xg.grad = None
        y = model(xg)
        (y * grad).sum().backward()

    return step


# --------------------------------------------------------------------------------------------
# Router scale for SoftMoELayer: realised mean active experts per token = target
# --------------------------------------------------------------------------------------------
def realised_active(layer, x: torch.Tensor) -> float:
    with torch.inference_mode():
        layer.inference(x)
    return float(layer.last_stats["active_per_token"])


def tune_router_scale(cfg: Dict[str, Any], x: torch.Tensor, target: float) -> Tuple[float, float]:
    """Bisection on log(scale) (the realised count falls as the router sharpens)."""
    cfg = dict(cfg, router_scale=1.0)
    layer = build("softmoe", cfg)
    w0 = layer.router.weight.detach().clone()

    def active_at(s: float) -> float:
        with torch.no_grad():
            layer.router.weight.copy_(w0 * s)
        return realised_active(layer, x)

    lo, hi = math.log(0.25), math.log(256.0)
    best = (1.0, active_at(1.0))
    for _ in range(24):
        mid = 0.5 * (lo + hi)
        a = active_at(math.exp(mid))
        if abs(a - target) < abs(best[1] - target):
            best = (math.exp(mid), a)
        if abs(a - target) <= 0.005:
            break
        if a > target:
            lo = mid
        else:
            hi = mid
    return best


# --------------------------------------------------------------------------------------------
# Peak memory of one step, in a fresh process
# --------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def child_memory(spec: Dict[str, Any]) -> Dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    cfg, method, mode = spec["cfg"], spec["method"], spec["mode"]
    x, grad = make_input(cfg)
    model = build(method, cfg)
    step = make_step(method, mode, model, x, grad)
    step()  # warm-up: lazy initialisation of BLAS / thread pools, first-touch of weights
    for p in model.parameters():
        p.grad = None
    gc.collect()
    _malloc_trim()
    base_kb = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        method_name = "VmHWM after /proc/self/clear_refs reset"
        step()
        peak_kb = _status_kb("VmHWM")
    except OSError:
        method_name = "ru_maxrss (peak since process start)"
        step()
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for p in model.parameters():
        p.grad = None
    gc.collect()
    alloc = _timing.peak_memory_bytes(step) if spec.get("alloc_profile") else None
    return {
        "peak_rss_delta_mb": (peak_kb - base_kb) / 1024.0,
        "baseline_rss_mb": base_kb / 1024.0,
        "rss_method": method_name,
        "alloc_peak_mb": None if alloc is None else alloc / 2**20,
    }


def measure_memory(cfg: Dict[str, Any], method: str, mode: str, threads: int, alloc_profile: bool) -> Dict[str, Any]:
    spec = {"cfg": cfg, "method": method, "mode": mode, "threads": threads, "alloc_profile": alloc_profile}
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        return {"error": res.stderr.strip()[-2000:]}
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def check_same_routing(models: Dict[str, nn.Module], x: torch.Tensor) -> float:
    """hf_loop and topk share routing and weights: their outputs must agree."""
    with torch.inference_mode():
        a = models["topk"](x[:1024])
        b = models["hf_loop"](x[:1024])
    err = float((a - b).abs().max())
    if not err <= 1e-4 * max(1.0, float(a.abs().max())):
        raise RuntimeError(f"hf_loop and topk disagree (max abs diff {err})")
    return err


def run_config(cfg: Dict[str, Any], args, threads: int) -> Dict[str, Any]:
    methods = METHODS + [f"{m}@{args.autocast}" for m in AUTOCAST_METHODS] if args.autocast else METHODS
    x, grad = make_input(cfg)
    scale, active = tune_router_scale(cfg, x, args.target_active)
    cfg = dict(cfg, router_scale=scale)
    models = {m: build(m, cfg) for m in methods}
    err = check_same_routing(models, x)
    soft = models["softmoe"]
    # the realised routing of the timed layer on the benchmark input, after a warm-up forward
    with torch.no_grad():
        soft(x)
        _, p = soft.route(x)
        counts = torch.bincount((p > 0).sum(-1), minlength=cfg["max_active"] + 1)
    stats = soft.last_stats
    routing = {
        "k": float(soft.k.detach()),
        "eps": cfg["eps"],
        "max_active": cfg["max_active"],
        "router_scale": scale,
        "realised_mean_active": float(stats["active_per_token"]),
        "active_count_fractions": {str(i): float(c) / cfg["tokens"] for i, c in enumerate(counts.tolist())},
        "tokens_per_expert_min_max": [int(stats["tokens_per_expert"].min()), int(stats["tokens_per_expert"].max())],
        "router_entropy": float(stats["router_entropy"]),
        "hf_loop_vs_topk_max_abs_diff": err,
    }
    print(
        f"  E={cfg['experts']}: SoftMoELayer k={routing['k']:.3g}, router scale {scale:.3g}: realised mean "
        f"active experts {routing['realised_mean_active']:.3f} (fractions with 0..{cfg['max_active']} active: "
        + ", ".join(f"{v:.3f}" for v in routing["active_count_fractions"].values())
        + ")",
        flush=True,
    )
    out: Dict[str, Any] = {"config": cfg, "softmoe_routing": routing, "modes": {}}
    for mode in MODES:
        cases = [Case(m, (lambda f: (lambda _s: f()))(make_step(m, mode, models[m], x, grad))) for m in methods]
        st = _timing.measure(cases, repeats=args.repeats, warmup=1)
        rows = {}
        for m in methods:
            rows[m] = dict(st[m].as_dict())
            rows[m]["ratio_to_topk"] = _timing.ratio_of_medians(st[m], st[BASELINE])
            rows[m]["paired_ratio_to_topk"] = _timing.median_of_ratios(st[m], st[BASELINE])
            base, amp = split_method(m)
            if amp is not None:  # against the same layer in float32, and against topk under the same autocast
                rows[m]["paired_ratio_to_float32"] = _timing.median_of_ratios(st[m], st[base])
                rows[m]["paired_ratio_to_topk_same_autocast"] = _timing.median_of_ratios(
                    st[m], st[f"{BASELINE}@{args.autocast}"])
        out["modes"][mode] = rows
        print(f"  E={cfg['experts']} {mode}: " + ", ".join(f"{m} {rows[m]['median_ms']:.1f} ms" for m in methods), flush=True)
        for p in (q for mdl in models.values() for q in mdl.parameters()):
            p.grad = None
    del models
    gc.collect()
    if not args.no_memory:
        for mode in MODES:
            for m in methods:
                out["modes"][mode][m]["memory"] = measure_memory(cfg, m, mode, threads, args.alloc_profile)
            base = out["modes"][mode][BASELINE]["memory"].get("peak_rss_delta_mb")
            for m in methods:
                mem = out["modes"][mode][m]["memory"]
                if base and "peak_rss_delta_mb" in mem:
                    mem["peak_ratio_to_topk"] = mem["peak_rss_delta_mb"] / base
        print(f"  E={cfg['experts']} memory done", flush=True)
    return out


def fmt(v: Any, spec: str) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def markdown(results: List[Dict[str, Any]], tokens: int, d_model: int) -> str:
    lines = [
        f"tokens = {tokens}, d_model = {d_model}, float32; median ms per call; x topk = ratio of medians "
        "(paired = median of per-repeat ratios); peak MB = peak RSS added by one step (fresh process)",
        "",
        "| E | d_hidden | mode | method | median ms | x topk | paired | peak MB | x topk |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cfg = r["config"]
        for mode in MODES:
            for m in METHODS:
                row = r["modes"][mode][m]
                mem = row.get("memory", {})
                name = m
                if m == "softmoe":
                    name = f"softmoe (mean active {r['softmoe_routing']['realised_mean_active']:.2f})"
                lines.append(
                    f"| {cfg['experts']} | {cfg['d_hidden']} | {mode} | {name} | {row['median_ms']:.1f} | "
                    f"{row['ratio_to_topk']:.2f} | {row['paired_ratio_to_topk']:.2f} | "
                    f"{fmt(mem.get('peak_rss_delta_mb'), '.0f')} | {fmt(mem.get('peak_ratio_to_topk'), '.2f')} |"
                )
    amp_rows = [(r, mode, m) for r in results for mode in MODES for m in r["modes"][mode] if "@" in m]
    if amp_rows:
        lines += [
            "",
            "Under torch.autocast (float32 weights): paired ratios to the same layer in float32 and to topk "
            "under the same autocast",
            "",
            "| E | mode | method | median ms | x same layer float32 | x topk same autocast |",
            "|---:|---|---|---:|---:|---:|",
        ]
        for r, mode, m in amp_rows:
            row = r["modes"][mode][m]
            lines.append(f"| {r['config']['experts']} | {mode} | {m} | {row['median_ms']:.1f} | "
                         f"{row['paired_ratio_to_float32']:.2f} | {row['paired_ratio_to_topk_same_autocast']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--experts", default="8,64", help="comma-separated E values (d_hidden 1024 for 8, 256 for 64, "
                    "else 2048 * 4 / E)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--k", type=float, default=1.0, help="SoftMoELayer k (default 1.0, see the docstring)")
    ap.add_argument("--max-active", type=int, default=3)
    ap.add_argument("--eps", type=float, default=1e-2)
    ap.add_argument("--target-active", type=float, default=2.0)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--alloc-profile", action="store_true",
                    help="also report torch.profiler's allocation peak of one step (slower)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--quick", action="store_true", help="smoke run: tokens 1024, d_model 128, small experts, 3 repeats")
    ap.add_argument("--malloc", choices=["glibc", "no-mmap"], default="glibc",
                    help="glibc: the default allocator settings; no-mmap: large blocks stay on glibc's heap")
    ap.add_argument("--autocast", choices=sorted(AUTOCAST), default=None,
                    help="also time topk and softmoe under torch.autocast('cpu', dtype) (see the docstring)")
    ap.add_argument("--out", default=DEFAULT_JSON)
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.malloc == "no-mmap" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != NO_MMAP_BYTES:
        # glibc reads these at process start, so the benchmark restarts itself with them set.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=NO_MMAP_BYTES, MALLOC_TRIM_THRESHOLD_=NO_MMAP_BYTES)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if args._child:
        print(json.dumps(child_memory(json.loads(args._child))))
        return 0

    experts = [int(e) for e in args.experts.split(",") if e]
    tokens, d_model, repeats = args.tokens, args.d_model, args.repeats
    d_hidden = {E: D_HIDDEN.get(E, max(16, 8192 // E)) for E in experts}
    if args.quick:
        tokens, d_model, repeats = 1024, 128, 3
        d_hidden = {E: max(16, d_hidden[E] // 4) for E in experts}
    args.repeats = repeats
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    info = _timing.machine_info()
    print(f"bench_layer: torch {torch.__version__}, {threads} threads, {info['cpu_model']}, "
          f"load average at start {info.get('loadavg_at_start')}", flush=True)
    results = []
    for E in experts:
        cfg = {
            "tokens": tokens, "d_model": d_model, "experts": E, "d_hidden": d_hidden[E], "k": args.k,
            "eps": args.eps, "max_active": args.max_active, "seed": 1234, "dtype": "float32",
        }
        results.append(run_config(cfg, args, threads))
    table = markdown(results, tokens, d_model)
    try:
        info["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    data = {
        "benchmark": "bench_layer",
        "machine": info,
        "notes": [
            "Shared, noisy machine: other processes may run during the benchmark (see loadavg); compare "
            "ratios from the same run, not absolute times across runs.",
            "peak_rss_delta_mb: VmHWM - VmRSS around one step in a fresh process, after a warm-up step, "
            "gradients freed and malloc_trim(0); includes activations, temporaries, gradients and "
            "allocator fragmentation, excludes the weights and the input.",
            "alloc_peak_mb (with --alloc-profile): torch.profiler net allocation peak of one step "
            "(misses temporaries freed inside an operator).",
            "softmoe uses k = --k with its router weight scaled so that the realised mean number of "
            "active experts per token equals --target-active (same expert FLOPs as top-2).",
        ],
        "settings": {"tokens": tokens, "d_model": d_model, "experts": experts, "repeats": repeats, "malloc": args.malloc,
                     "quick": args.quick, "threads": threads, "baseline": BASELINE, "autocast": args.autocast,
                     "methods": METHODS + [f"{m}@{args.autocast}" for m in AUTOCAST_METHODS] if args.autocast else METHODS},
        "results": results,
        "table_markdown": table,
    }
    _timing.write_json(args.out, data)
    print()
    print(table)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
