"""benchmarks/quality.py end to end at a toy size: it trains, checks its safeguards and writes the
JSON (and plots) it promises."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import quality  # noqa: E402


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
    assert soft["params"]["active"] < soft["params"]["total"]

    timing = result["step_timing"]["methods"]
    assert set(timing) == {"dense", "softmoe_k1.5"} and all(t["step_ms_median"] > 0 for t in timing.values())

    agg = result["aggregate"]["softmoe_k1.5"]
    assert agg["bpb"]["n"] == 1 and agg["bpb"]["mean"] == soft["final_bpb"]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "quality.png").exists() and (tmp_path / "quality_allocation.png").exists()
