"""benchmarks/quality.py end to end at a toy size: it trains, checks its safeguards and writes the
JSON (and plots) it promises."""
import json
import math
import os
import pty
import subprocess
import sys

import pytest
import torch

import quality  # benchmarks/quality.py (pyproject.toml: pytest's pythonpath)


def test_quick_run_writes_json(tmp_path, capsys):
    argv = ["--quick", "--steps", "3", "--seeds", "0", "--methods", "dense", "softmoe_k1.5",
            "--threads", "1", "--out", str(tmp_path)]
    assert quality.main(argv) == 0
    out = capsys.readouterr().out
    assert "| method |" in out and "safeguard checks passed" in out

    result = json.loads((tmp_path / "quality.json").read_text())
    for key in ("machine", "config", "methods", "seeds", "aggregate", "runs", "checks", "table_markdown", "step_timing"):
        assert key in result
    for key in ("command", "torch", "torch_num_threads", "cpu_model", "date_utc"):
        assert key in result["machine"]
    assert "--quick" in result["machine"]["argv"]
    assert result["config"]["steps"] == 3 and result["seeds"] == [0]
    assert result["checks"]["passed"] and result["checks"]["softmoe_runs"] == 1
    assert set(result["aggregate"]) == {"dense", "softmoe_k1.5"}
    assert [r["method"] for r in result["runs"]] == ["dense", "softmoe_k1.5"]

    for run in result["runs"]:
        assert run["steps_done"] == 3 and run["nan"] is False
        assert 0 < run["final_bpb"] < 9 and run["bpb_curve"]["step"][-1] == 3
        assert run["tokens_per_s"] > 0 and run["wall_s"] > 0
        assert 0 < run["params"]["active"] <= run["params"]["total"]
    dense, soft = result["runs"]
    assert dense["active_per_layer"] == [] and dense["params"]["active"] == dense["params"]["total"]
    layers = result["config"]["layers"]
    assert len(soft["allocation"]) == layers and len(soft["active_per_layer"]) == layers
    assert soft["allocation_sum"] == pytest.approx(layers * 1.5, abs=1e-5)
    lo, hi = soft["k_range"]
    assert all(lo < k < hi for k in soft["allocation"])
    assert all(1.0 <= a <= result["config"]["max_active"] for a in soft["active_per_layer"])
    # The collapse check ran over every step of every layer.
    for key in ("diversity_min_seen", "load_experts_min_seen", "diversity_below_longest", "diversity_final"):
        assert len(soft[key]) == layers, key
    assert all(d >= quality.COLLAPSE_DIVERSITY for d in soft["diversity_final"])
    assert max(soft["diversity_below_longest"]) < quality.collapse_steps(3)
    assert result["checks"]["diversity_min"] == min(soft["diversity_min_seen"])
    assert len(soft["history"]["diversity"][0]) == layers
    assert soft["params"]["active"] < soft["params"]["total"]

    timing = result["step_timing"]["methods"]
    assert set(timing) == {"dense", "softmoe_k1.5"} and all(t["step_ms_median"] > 0 for t in timing.values())

    agg = result["aggregate"]["softmoe_k1.5"]
    assert agg["bpb"]["n"] == 1 and agg["bpb"]["mean"] == soft["final_bpb"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "quality.png").exists() and (tmp_path / "quality_allocation.png").exists()


def test_routing_load_measures_collapse():
    """N_eff / active is 1 when every token goes to the same experts, E / active when balanced."""
    layer = quality.softmoe.SoftMoELayer(8, 8, 8, k=1.5, max_active=4)
    layer.last_stats = {"tokens_per_expert": torch.tensor([64, 64, 0, 0, 0, 0, 0, 0]),
                        "active_per_token": torch.tensor(2.0)}
    n_eff, diversity = quality.routing_load(layer)
    assert n_eff == pytest.approx(2.0) and diversity == pytest.approx(1.0)
    layer.last_stats = {"tokens_per_expert": torch.full((8,), 16), "active_per_token": torch.tensor(2.0)}
    n_eff, diversity = quality.routing_load(layer)
    assert n_eff == pytest.approx(8.0) and diversity == pytest.approx(4.0)
    assert quality.collapse_steps(800) == 80 and quality.collapse_steps(3) == 1


def _soft_run(**kw):
    run = {"method": "softmoe_k1.5", "seed": 0, "nan": False, "nan_what": "", "nan_step": None, "steps_done": 800,
           "k_range": [1.0, 3.0], "allocation_min_seen": [1.4, 1.5], "allocation_max_seen": [1.6, 1.6],
           "active_min_seen": [2.0, 2.1], "diversity_below_longest": [0, 79], "diversity_final": [2.0, 1.8]}
    run.update(kw)
    return run


def test_check_run_flags_nan_and_collapse():
    assert quality.check_run(_soft_run()) == []
    assert any("non-finite" in f for f in quality.check_run(_soft_run(nan=True, nan_what="loss = nan", nan_step=7)))
    # A transient dip shorter than 10 % of the run (79 of 800 steps above) is not a collapse.
    collapsed = quality.check_run(_soft_run(diversity_below_longest=[0, 80]))
    assert len(collapsed) == 1 and "layer 1 collapsed" in collapsed[0]
    at_end = quality.check_run(_soft_run(diversity_final=[1.05, 1.8]))
    assert len(at_end) == 1 and "layer 0 collapsed at the end" in at_end[0]
    assert quality.check_run(_soft_run(diversity_final=[2.0, math.nan]))  # NaN is not >= the limit
    assert quality.check_run(_soft_run(diversity_below_longest=None))  # a run that did not measure it fails
    assert quality.check_run({"method": "topk2", "nan": True}) == []  # the baselines are not checked


def test_collapse_makes_the_benchmark_fail(tmp_path, capsys, monkeypatch):
    """End to end: a layer whose load looks collapsed at some step gives exit status 1."""
    real = quality.routing_load
    calls = {"n": 0}

    def collapsing(layer):
        calls["n"] += 1
        n_eff, diversity = real(layer)
        return (n_eff, 1.0) if calls["n"] == 3 else (n_eff, diversity)

    monkeypatch.setattr(quality, "routing_load", collapsing)
    argv = ["--quick", "--steps", "2", "--seeds", "0", "--methods", "softmoe_k1.5", "--threads", "1",
            "--no-plot", "--no-step-timing", "--out", str(tmp_path)]
    assert quality.main(argv) == 1
    out = capsys.readouterr().out
    assert "SAFEGUARD CHECKS FAILED" in out and "collapsed" in out
    result = json.loads((tmp_path / "quality.json").read_text())
    assert result["checks"]["passed"] is False and result["checks"]["diversity_min"] == 1.0


def test_progress_bars_show_on_an_unsized_terminal(tmp_path):
    """On a pseudo-terminal that reports 0 x 0 (as `script` and some CI runners give), every run's
    progress bar is shown and no blank line is left where it was (tqdm alone prints only newlines)."""
    bench = os.path.dirname(os.path.abspath(quality.__file__))
    argv = ["--quick", "--steps", "2", "--seeds", "0", "--methods", "dense", "topk1", "--threads", "1",
            "--no-plot", "--no-step-timing", "--out", str(tmp_path)]
    leader, follower = pty.openpty()  # a new pty: 0 rows, 0 columns
    assert os.get_terminal_size(follower) == (0, 0)
    proc = subprocess.Popen([sys.executable, os.path.join(bench, "quality.py"), *argv],
                            stdout=follower, stderr=follower, cwd=os.path.dirname(bench))
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=300) == 0
    text = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    lines = text.split("\n")
    table = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    before = [line.rsplit("\r", 1)[-1] for line in lines[:table - 1]]  # what the terminal shows
    assert "" not in before, before
    for run in ("[1/2] dense seed 0", "[2/2] topk1 seed 0"):
        assert any(line.startswith(run) and "2/2" in line for line in before), (run, before)


def test_jobs_run_in_worker_processes_like_one_process(tmp_path, capsys):
    """--jobs 2 trains in two spawned processes: the same runs (bit for bit, one thread each) as
    in-process, the budget check per layer, and the step time against top-k at equal active."""
    common = ["--quick", "--steps", "3", "--seeds", "0", "--methods", "topk1", "topk2", "softmoe_a1.5",
              "--threads", "1", "--no-plot"]
    assert quality.main(common + ["--jobs", "2", "--out", str(tmp_path / "jobs")]) in (0, 1)
    assert quality.main(common + ["--out", str(tmp_path / "one")]) in (0, 1)
    capsys.readouterr()
    jobs, one = (json.loads((tmp_path / d / "quality.json").read_text()) for d in ("jobs", "one"))
    assert [r["method"] for r in jobs["runs"]] == ["topk1", "topk2", "softmoe_a1.5"]
    assert [r["final_bpb"] for r in jobs["runs"]] == [r["final_bpb"] for r in one["runs"]]
    soft = jobs["runs"][2]
    assert soft["budget_unit"] == "mean_active" and len(soft["budget_error_per_layer"]) == jobs["config"]["layers"]
    timing = jobs["step_timing"]["methods"]["softmoe_a1.5"]
    assert timing["active_mean"] == soft["active_mean"] and timing["time_ratio_vs_topk_at_equal_active"] > 0


def test_autocast_flag_trains_and_evaluates_under_bf16_autocast(tmp_path, monkeypatch):
    """--autocast bf16: the forward passes run under CPU bf16 autocast (the layer outputs bfloat16),
    and the JSON records the setting."""
    seen = []
    forward = quality.TinyLM.forward

    def spy(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(quality.TinyLM, "forward", spy)
    argv = ["--quick", "--steps", "2", "--seeds", "0", "--methods", "softmoe_k1.5", "--threads", "1",
            "--no-plot", "--autocast", "bf16", "--out", str(tmp_path)]
    assert quality.main(argv) == 0
    result = json.loads((tmp_path / "quality.json").read_text())
    assert result["config"]["autocast"] == "bf16"
    assert seen and all(seen)  # training steps, held-out evaluation and the step timing
    run = result["runs"][0]
    assert run["steps_done"] == 2 and not run["nan"] and 0 < run["final_bpb"] < 9
