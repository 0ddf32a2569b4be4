"""The one-call GPU check (benchmarks/gpu/run_all.sh) without a GPU: its dry run goes through every
step's plumbing (files, tools, collecting the CUDA tests, the benchmark script's arguments and
imports) and writes the summary saying what was skipped; the summary renders a full result."""
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _summary(out) -> str:
    """Runs benchmarks/gpu/summary.py OUT (as run_all.sh does) and returns OUT/summary.md."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/summary.py"), str(out)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    return (out / "summary.md").read_text()


def test_dry_run(tmp_path):
    out = tmp_path / "gpu"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run_all.sh"), "--dry-run", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = (out / "steps.tsv").read_text().splitlines()
    status = {line.split("\t")[0]: line.split("\t")[1] for line in steps[1:]}
    assert status == {"build": "skipped", "tests-collect": "ok", "tests": "skipped", "bench": "ok"}, steps
    collected = (out / "tests.log").read_text()
    assert "tests collected" in collected and "test_cuda" in collected
    data = json.loads((out / "bench_gpu.json").read_text())
    assert data["sections"] == {name: {"skipped": "dry run"} for name in ("router", "layer", "hf")}
    text = (out / "summary.md").read_text()
    assert "| build | skipped |" in text and "CUDA tests: not run" in text
    assert text.count("Skipped: dry run.") == 3


def test_usage_error(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run_all.sh")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_bench_rejects_unknown_section(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu/bench_gpu.py"), "--out", str(tmp_path),
                           "--sections", "router,nope", "--dry-run"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown ['nope']" in proc.stderr


def test_summary_of_a_full_run(tmp_path):
    (tmp_path / "steps.tsv").write_text("step\tstatus\tseconds\tnote\nbuild\tok\t61\t\ntests\tfailed\t90\texit status 1\n")
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_cuda" name="test_a"/>'
        '<testcase classname="tests.test_cuda" name="test_b"><failure message="assert 1 == 2">x</failure></testcase>'
        '<testcase classname="tests.test_cuda" name="test_c"><skipped/></testcase></testsuite></testsuites>')
    ms = {"forward": 0.02, "forward_backward": 0.05, "bandwidth_floor": 0.01}
    launches = {"kernels": 40, "memory_ops": 3}
    data = {"torch": "2.13.0", "cuda": "13.0", "device": "NVIDIA H200", "sections": {
        "router": {"cases": [{"rows": 4096, "experts": 8, "ms": ms, "forward_x_floor": 2.0}], "target": "t"},
        "layer": {"cases": [{"experts": e, "d_hidden": 64, "active_per_token": 2.0, "baseline_top_k": 2,
                             "ms": {"softmoe": 1.0, "grouped_topk": 0.9}, "softmoe_x_grouped_topk": 1.11,
                             "launches_per_step": {"softmoe": launches, "grouped_topk": launches}} for e in (8, 64)],
                  "softmoe_launches_independent_of_E": True, "target": "t"},
        "hf": {"ms": {"softmoe": 3.0, "topk": 2.5}, "softmoe_x_topk": 1.2},
    }}
    (tmp_path / "bench_gpu.json").write_text(json.dumps(data))
    text = _summary(tmp_path)
    assert "| tests | failed | 90 | exit status 1 |" in text
    assert "CUDA tests: 3 run, 1 failed, 0 errors, 1 skipped." in text and "test_b: assert 1 == 2" in text
    assert "| 4096 | 8 | 0.0200 | 0.0500 | 0.0100 | 2.00 |" in text
    assert "| 64 | 64 | 2.00 | 1.000 | 0.900 | 1.11 | 40 (3) | 40 (3) |" in text
    assert "independent of E: True" in text and "(1.20x)" in text and "NVIDIA H200" in text
    assert len(text.splitlines()) < 60  # one page


def test_summary_says_what_is_missing(tmp_path):
    text = _summary(tmp_path)
    assert "not run (no bench_gpu.json)" in text and "did not run here" in text
