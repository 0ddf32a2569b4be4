#!/usr/bin/env python3
"""The GPU benchmarks of the one-call GPU check (run_all.sh, issue 15): router, layer and Hugging Face
step on one CUDA device, with the kernel launches of a layer step counted by the profiler.

  router  soft_topk forward and forward + backward (float32 logits, k = 2, eps = 1e-2,
          max_active = 4) for 4,096 and 65,536 rows and E = 8, 64, 256, against a bandwidth floor:
          one elementwise pass that reads the logits and writes a tensor of their size
          (`torch.mul(scores, 1.0)`), the least any soft top-k must move. Target: within 2x.
  layer   SoftMoELayer forward + backward (bfloat16, 8,192 tokens, d_model 1024, k = 2,
          max_active = 4) against a top-k MoE on torch's grouped GEMM (torch._grouped_mm:
          top-k routing, tokens sorted by expert on the device, both expert matmuls grouped)
          with top-k = the layer's realised active experts per token (rounded), same d_hidden,
          for E = 8, 64 (d_hidden 2048, 512: the same expert parameters). Kernel launches per step
          (profiler: CUDA kernels and memory operations of one forward + backward) for both,
          which must not grow with E for SoftMoE. Target: within 1.1x.
  hf      bench_hf's Mixtral (4 layers, hidden 256, 8 experts, top-2) on the GPU: a training step
          of the converted model (softmoe.hf.convert, lossless) against the original.

Timing: CUDA events around each call after warm-up, median over --repeats; the methods of one
comparison interleaved. Writes OUT/bench_gpu.json and prints a table per section. The hf section
imports bench_hf (benchmarks/): run_all.sh puts that folder on PYTHONPATH.
--dry-run (no GPU needed): checks the arguments and the imports and writes the JSON with every
section marked skipped and why, so that the script's plumbing is tested on a CPU-only machine.

  PYTHONPATH=benchmarks python3 benchmarks/gpu/bench_gpu.py --out OUTDIR [--sections router,layer,hf] [--quick] [--dry-run]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List

import torch
from torch.nn import functional as F

SECTIONS = ("router", "layer", "hf")


def cuda_ms(fns: Dict[str, Callable[[], Any]], warmup: int, repeats: int) -> Dict[str, float]:
    """Median milliseconds per call of each fn, timed with CUDA events, the fns interleaved per repeat."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(t) for name, t in times.items()}


def launches(fn: Callable[[], Any]) -> Dict[str, int]:
    """Device operations of one call of fn (after a warm-up call), from the profiler: kernels and
    memory operations (copies, memsets) on the GPU."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = memory = 0
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = evt.name.lower()
        if "memcpy" in name or "memset" in name:
            memory += 1
        else:
            kernels += 1
    return {"kernels": kernels, "memory_ops": memory}


# ---- router -----------------------------------------------------------------------------------


def bench_router(args) -> Dict[str, Any]:
    import softmoe

    rows_list = [4096] if args.quick else [4096, 65536]
    experts_list = [8, 64] if args.quick else [8, 64, 256]
    out = []
    for rows in rows_list:
        for experts in experts_list:
            gen = torch.Generator(device="cuda").manual_seed(0)
            scores = torch.randn(rows, experts, device="cuda", generator=gen).requires_grad_(True)
            k = torch.tensor(2.0, device="cuda", requires_grad=True)
            grad = torch.randn(rows, experts, device="cuda", generator=gen)

            def fwd():
                with torch.no_grad():
                    return softmoe.soft_topk(scores, k, 1.0, eps=1e-2, max_active=4)

            def fwd_bwd():
                p = softmoe.soft_topk(scores, k, 1.0, eps=1e-2, max_active=4)
                torch.autograd.grad(p, (scores, k), grad)

            def floor():
                return torch.mul(scores.detach(), 1.0)

            ms = cuda_ms({"forward": fwd, "forward_backward": fwd_bwd, "bandwidth_floor": floor}, 3, args.repeats)
            out.append({"rows": rows, "experts": experts, "ms": ms,
                        "forward_x_floor": ms["forward"] / ms["bandwidth_floor"]})
            print(f"router rows={rows} E={experts}: forward {ms['forward']:.4f} ms, fwd+bwd "
                  f"{ms['forward_backward']:.4f} ms, floor {ms['bandwidth_floor']:.4f} ms "
                  f"({ms['forward'] / ms['bandwidth_floor']:.2f}x)", flush=True)
    return {"cases": out, "target": "forward within 2x of the bandwidth floor"}


# ---- layer ------------------------------------------------------------------------------------


class GroupedTopK(torch.nn.Module):
    """A top-k MoE on torch's grouped GEMM: softmax top-k routing, tokens sorted by expert on the
    device (no host sync), SwiGLU experts as two torch._grouped_mm calls, a weighted scatter-add
    back. The baseline of the layer benchmark."""

    def __init__(self, d_model: int, d_hidden: int, experts: int, top_k: int, dtype: torch.dtype):
        super().__init__()
        self.top_k, self.experts, self.d_hidden = top_k, experts, d_hidden
        self.router = torch.nn.Linear(d_model, experts, bias=False, device="cuda", dtype=dtype)
        self.w_in = torch.nn.Parameter(torch.randn(experts, d_model, 2 * d_hidden, device="cuda", dtype=dtype) * 0.02)
        self.w_out = torch.nn.Parameter(torch.randn(experts, d_hidden, d_model, device="cuda", dtype=dtype) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.router(x).float(), -1)
        weight, expert = probs.topk(self.top_k, -1)
        weight = (weight / weight.sum(-1, keepdim=True)).to(x.dtype)
        flat = expert.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // self.top_k
        offs = torch.bincount(flat, minlength=self.experts).cumsum(0).to(torch.int32)
        xs = x[token]
        h = torch._grouped_mm(xs, self.w_in, offs=offs)
        a = F.silu(h[:, : self.d_hidden]) * h[:, self.d_hidden:]
        ys = torch._grouped_mm(a, self.w_out, offs=offs)
        ys = ys * weight.reshape(-1)[order].unsqueeze(1)
        return torch.zeros_like(x).index_add_(0, token, ys)


def bench_layer(args) -> Dict[str, Any]:
    import softmoe

    dtype = torch.bfloat16
    tokens, d_model = (2048, 512) if args.quick else (8192, 1024)
    out = []
    for experts, d_hidden in ((8, 2048), (64, 256) if args.quick else (64, 512)):
        torch.manual_seed(0)
        layer = softmoe.SoftMoELayer(d_model, d_hidden, experts, k=2.0, max_active=4, device="cuda", dtype=dtype)
        x = torch.randn(tokens, d_model, device="cuda", dtype=dtype, requires_grad=True)
        with torch.no_grad():
            layer(x)
        active = float(layer.last_stats["active_per_token"])
        baseline = GroupedTopK(d_model, d_hidden, experts, max(1, round(active)), dtype)
        grad = torch.randn_like(x)

        def step(module):
            def run():
                x.grad = None
                module.zero_grad(set_to_none=True)
                module(x).backward(grad)
            return run

        case: Dict[str, Any] = {"experts": experts, "d_hidden": d_hidden, "tokens": tokens, "d_model": d_model,
                                "active_per_token": active, "baseline_top_k": baseline.top_k}
        fns = {"softmoe": step(layer)}
        try:
            step(baseline)()
            fns["grouped_topk"] = step(baseline)
        except (RuntimeError, AttributeError) as exc:  # torch._grouped_mm missing or not for this GPU / dtype
            case["baseline_error"] = f"{type(exc).__name__}: {exc}"
        ms = cuda_ms(fns, 3, args.repeats)
        case["ms"] = ms
        case["launches_per_step"] = {name: launches(fn) for name, fn in fns.items()}
        if "grouped_topk" in ms:
            case["softmoe_x_grouped_topk"] = ms["softmoe"] / ms["grouped_topk"]
        out.append(case)
        print(f"layer E={experts}: {json.dumps(case)}", flush=True)
    counts = [c["launches_per_step"]["softmoe"]["kernels"] for c in out]
    return {"cases": out, "softmoe_launches_independent_of_E": len(set(counts)) == 1,
            "target": "softmoe within 1.1x of grouped_topk; launches per step independent of E"}


# ---- Hugging Face ------------------------------------------------------------------------------


def bench_hf_gpu(args) -> Dict[str, Any]:
    import bench_hf  # benchmarks/bench_hf.py
    import softmoe.hf

    hf_args = argparse.Namespace(layers=2 if args.quick else 4, hidden=256, intermediate=512, heads=8, experts=8,
                                 batch=8, context=128, seed=0)
    original = bench_hf.build_original(hf_args).cuda()
    converted = softmoe.hf.convert(copy.deepcopy(original))
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, 256, (hf_args.batch, hf_args.context), device="cuda", generator=gen)
    y = torch.roll(x, -1, dims=1)

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x).logits.reshape(-1, 256), y.reshape(-1)).backward()
        return run

    ms = cuda_ms({"topk": step(original), "softmoe": step(converted)}, 2, args.repeats)
    result = {"ms": ms, "softmoe_x_topk": ms["softmoe"] / ms["topk"], "settings": vars(hf_args)}
    print(f"hf: {json.dumps(result)}", flush=True)
    return result


RUNNERS = {"router": bench_router, "layer": bench_layer, "hf": bench_hf_gpu}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (bench_gpu.json)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="fewer and smaller cases")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: check arguments and imports, mark sections skipped")
    args = ap.parse_args(argv)
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        ap.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    os.makedirs(args.out, exist_ok=True)
    import softmoe  # noqa: F401  (the build under test)

    if "hf" in sections:
        import bench_hf  # noqa: F401  (the HF section's model: benchmarks/ on PYTHONPATH)

    data: Dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "sections": {}}
    gpu = torch.cuda.is_available() and not args.dry_run
    if gpu:
        data["device"] = torch.cuda.get_device_name()
    for name in sections:
        if not gpu:
            reason = "dry run" if args.dry_run else "no CUDA device"
            data["sections"][name] = {"skipped": reason}
            print(f"{name}: skipped ({reason})")
            continue
        start = time.perf_counter()
        try:
            data["sections"][name] = RUNNERS[name](args)
        except Exception as exc:  # a failing section is reported; the others still run
            data["sections"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"{name}: FAILED: {type(exc).__name__}: {exc}", flush=True)
        data["sections"][name]["seconds"] = time.perf_counter() - start
    with open(os.path.join(args.out, "bench_gpu.json"), "w") as f:
        json.dump(data, f, indent=1)
    failed = [n for n, s in data["sections"].items() if "error" in s]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
