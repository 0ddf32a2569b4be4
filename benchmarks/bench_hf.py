#!/usr/bin/env python3
"""Hugging Face benchmark (issue 5): one training step (forward + backward) of a Mixtral model
converted with softmoe.hf.convert, against the original top-k model, same run.

Model: MixtralForCausalLM from a config (no download): 4 layers, hidden 256, 8 experts of
intermediate size 512, top-2, 8 attention heads (4 KV heads), vocabulary 256 (bytes), random
weights (seed 0); float32 on the CPU. Input: 8 x 128 tokens of the bundled text (bytes).

Methods (one model's weights: the converted models start from a copy of the original)
  topk             baseline (ratio denominator): the original model, top-2 routing, with
                   transformers' default experts backend (reported: "grouped_mm" on this torch).
  topk_eager       the same model with experts_implementation="eager" (transformers' per-expert
                   Python loop), for reference.
  softmoe          softmoe.hf.convert(model) with the defaults: the lossless conversion (k = the
                   model's top-k, sharp soft top-k, the model's gate as combine weights), so every
                   token uses its 2 top experts: the same expert FLOPs as top-2 and the same logits.
  softmoe_soft     softmoe.hf.convert(model, alpha=1.0, combine="normalized"), convert's defaults before
                   the lossless conversion: the random router's logits are small, so routing is
                   nearly uniform and every token uses max_active = 4 experts (reported as
                   "active"): twice top-2's expert work.

Timing: loss = cross_entropy(model(x).logits, y); loss.backward(), gradients set to None before each
step (untimed); train mode. Medians over --repeats timed repeats after warm-up, methods interleaved
round robin (benchmarks/_timing.py); "x topk" = median(method) / median(topk) of the same run,
"paired" = median over repeats of the per-repeat ratio.

  python3 benchmarks/bench_hf.py                  # ~2-4 minutes on 2 cores
  python3 benchmarks/bench_hf.py --threads 2      # torch threads (default 1: steadier on a shared 2-core machine)
  python3 benchmarks/bench_hf.py --quick          # smoke run: 2 layers, hidden 64, 3 repeats
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch.nn import functional as F

import _timing  # benchmarks/_timing.py, beside this script

HERE = os.path.dirname(os.path.abspath(__file__))

DEFAULT_JSON = os.path.join(HERE, "results", "bench_hf.json")


def build_original(args):
    import transformers

    config = transformers.MixtralConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=max(1, args.heads // 2), num_local_experts=args.experts,
        num_experts_per_tok=2, max_position_embeddings=max(512, args.context), tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )
    torch.manual_seed(args.seed)
    return transformers.MixtralForCausalLM(config).train()


def mean_active(model, x) -> float:
    import softmoe.hf

    with torch.no_grad():
        model(x)
    return sum(r["active"] for r in softmoe.hf.stats(model)) / len(softmoe.hf.layers(model))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 layers, hidden 64, 3 repeats")
    ap.add_argument("--out", default=DEFAULT_JSON)
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.heads, args.repeats = 2, 64, 128, 4, 3
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import softmoe.hf
    from softmoe.tiny_lm import fixed_batches, load_bytes

    (x, y), = fixed_batches(load_bytes(), 1, args.batch, args.context)
    original = build_original(args)
    backend = original.get_experts_implementation()
    eager = copy.deepcopy(original)
    eager.set_experts_implementation("eager")
    converted = softmoe.hf.convert(copy.deepcopy(original))
    active_default = mean_active(converted, x)
    soft = softmoe.hf.convert(copy.deepcopy(original), alpha=1.0, combine="normalized")
    active_soft = mean_active(soft, x)
    print(f"transformers {transformers.__version__}, experts backend of the original: {backend}; "
          f"softmoe active experts/token: default {active_default:.3f}, soft {active_soft:.3f}")

    models = {"topk": original, "topk_eager": eager, "softmoe": converted, "softmoe_soft": soft}

    def step_case(name, model):
        def setup():
            model.zero_grad(set_to_none=True)

        def fn(_state):
            loss = F.cross_entropy(model(x).logits.reshape(-1, 256), y.reshape(-1))
            loss.backward()

        return _timing.Case(name, fn, setup)

    # the same loss from the same weights for the two top-k backends and the lossless conversion
    # (a check, not timed)
    with torch.no_grad():
        a, b, c = (F.cross_entropy(m(x).logits.reshape(-1, 256), y.reshape(-1)).item() for m in (original, eager, converted))
    assert abs(a - b) < 1e-4 and abs(a - c) < 1e-4, (a, b, c)

    info = _timing.machine_info()
    info["transformers"] = transformers.__version__
    stats = _timing.measure([step_case(n, m) for n, m in models.items()], repeats=args.repeats, warmup=2)
    base = stats["topk"]
    active = {"topk": 2.0, "topk_eager": 2.0, "softmoe": active_default, "softmoe_soft": active_soft}
    results = {}
    lines = ["| method | median ms | x topk | paired | active experts/token |", "|---|---:|---:|---:|---:|"]
    for name, s in stats.items():
        ratio = _timing.ratio_of_medians(s, base)
        paired = _timing.median_of_ratios(s, base)
        results[name] = dict(s.as_dict(), ratio_vs_topk=ratio, paired_ratio_vs_topk=paired, active_per_token=active[name])
        lines.append(f"| {name} | {s.median_ms:.1f} | {ratio:.2f} | {paired:.2f} | {active[name]:.2f} |")
    table = "\n".join(lines)
    print(table)
    data = {
        "benchmark": "bench_hf: forward+backward step, converted Mixtral (softmoe.hf.convert) vs original top-2",
        "machine": info,
        "settings": dict(vars(args), tokens=args.batch * args.context, dtype="float32", device="cpu",
                         original_experts_implementation=backend,
                         softmoe_default_routing=converted.config.softmoe, softmoe_soft_routing=soft.config.softmoe),
        "notes": [
            "topk is the ratio denominator; ratios come from the same interleaved run",
            "softmoe (defaults) is the lossless conversion: each token's top-2 experts, the model's gate, the same loss",
            "softmoe_soft (alpha 1, p / k combine) routes every token to max_active = 4 experts here: the random "
            "router's logits are nearly uniform, so it does twice top-2's expert work",
        ],
        "results": results,
        "table_markdown": table,
    }
    _timing.write_json(args.out, data)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
