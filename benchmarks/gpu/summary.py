#!/usr/bin/env python3
"""One page (OUT/summary.md) of a run_all.sh run: its steps (OUT/steps.tsv), the CUDA tests
(OUT/tests.xml, pytest's JUnit report) and the GPU benchmarks (OUT/bench_gpu.json); what is missing
or was skipped is said so.

  python3 benchmarks/gpu/summary.py OUTDIR
"""
from __future__ import annotations

import csv
import json
import os
import sys
import xml.etree.ElementTree as ET
from typing import Any, Dict, List


def _steps(out: str) -> List[Dict[str, str]]:
    path = os.path.join(out, "steps.tsv")
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _tests(out: str) -> str:
    path = os.path.join(out, "tests.xml")
    if not os.path.exists(path):
        return "CUDA tests: not run (no tests.xml)."
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    lines = [f"CUDA tests: {total['tests']} run, {total['failures']} failed, {total['errors']} errors, "
             f"{total['skipped']} skipped."]
    for suite in suites:
        for case in suite.iter("testcase"):
            for tag in ("failure", "error"):
                bad = case.find(tag)
                if bad is not None:
                    message = (bad.get("message") or "").splitlines()[0][:160] if bad.get("message") else ""
                    lines.append(f"- {tag}: {case.get('classname')}::{case.get('name')}: {message}")
    return "\n".join(lines[:30])


def _router(section: Dict[str, Any]) -> List[str]:
    lines = ["| rows | E | forward ms | fwd+bwd ms | floor ms | forward / floor |", "|---:|---:|---:|---:|---:|---:|"]
    for c in section["cases"]:
        ms = c["ms"]
        lines.append(f"| {c['rows']} | {c['experts']} | {ms['forward']:.4f} | {ms['forward_backward']:.4f} | "
                     f"{ms['bandwidth_floor']:.4f} | {c['forward_x_floor']:.2f} |")
    return lines + [f"Target: {section['target']}."]


def _layer(section: Dict[str, Any]) -> List[str]:
    lines = ["| E | d_hidden | active/token | softmoe ms | grouped top-k ms | ratio | softmoe kernels (mem ops) | "
             "top-k kernels (mem ops) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in section["cases"]:
        ms, lc = c["ms"], c["launches_per_step"]
        base = ms.get("grouped_topk")
        base_l = lc.get("grouped_topk")
        base_text = f"{base:.3f}" if base else "n/a"
        base_launches = f"{base_l['kernels']} ({base_l['memory_ops']})" if base_l else "n/a"
        lines.append(
            f"| {c['experts']} | {c['d_hidden']} | {c['active_per_token']:.2f} | {ms['softmoe']:.3f} | "
            f"{base_text} | {c.get('softmoe_x_grouped_topk', float('nan')):.2f} | "
            f"{lc['softmoe']['kernels']} ({lc['softmoe']['memory_ops']}) | {base_launches} |")
        if "baseline_error" in c:
            lines.append(f"Baseline unavailable for E = {c['experts']}: {c['baseline_error'][:200]}")
    lines.append(f"Kernel launches per step independent of E: {section['softmoe_launches_independent_of_E']}. "
                 f"Target: {section['target']}.")
    return lines


def _hf(section: Dict[str, Any]) -> List[str]:
    ms = section["ms"]
    return [f"Converted Mixtral step {ms['softmoe']:.3f} ms vs original {ms['topk']:.3f} ms "
            f"({section['softmoe_x_topk']:.2f}x)."]


def summary(out: str) -> str:
    lines = ["# GPU check (benchmarks/gpu/run_all.sh)", ""]
    steps = _steps(out)
    if steps:
        lines += ["| step | status | seconds | note |", "|---|---|---:|---|"]
        lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['note']} |" for s in steps]
    else:
        lines.append("No steps.tsv: run_all.sh did not run here.")
    lines += ["", _tests(out), ""]
    path = os.path.join(out, "bench_gpu.json")
    if not os.path.exists(path):
        lines.append("Benchmarks: not run (no bench_gpu.json).")
        return "\n".join(lines) + "\n"
    with open(path) as f:
        data = json.load(f)
    lines.append(f"torch {data['torch']}, CUDA {data['cuda']}, device: {data.get('device', 'none')}")
    render = {"router": _router, "layer": _layer, "hf": _hf}
    for name, section in data["sections"].items():
        lines += ["", f"## {name}"]
        if "skipped" in section:
            lines.append(f"Skipped: {section['skipped']}.")
        elif "error" in section:
            lines.append(f"Failed: {section['error'][:300]}")
        else:
            lines += render[name](section)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: summary.py OUTDIR", file=sys.stderr)
        return 2
    text = summary(argv[0])
    with open(os.path.join(argv[0], "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
