"""The router benchmark (benchmarks/bench_router.py) runs end to end on a few rows: its correctness
checks pass, every mode of --breakdown gives a record per method with its multiple of the
bandwidth floor, and the references around the methods (the step's own overhead, the cheapest
elementwise op) are timed in the same run. Timings are not asserted (benchmarks, not tests)."""
import bench_router  # benchmarks/ is on pytest's path (pyproject.toml)
import pytest


def test_quick_breakdown_runs():
    result = bench_router.main(["--quick", "--experts", "8", "--methods", "hard_topk,softmoe_trunc", "--breakdown",
                                "--json", ""])
    assert result["checks"]["ok"]
    records = result["records"]
    by_mode = {}
    for rec in records:
        by_mode.setdefault(rec["mode"], {})[rec["method"]] = rec
    assert set(by_mode) == {"fwd_bwd", "fwd", "fwd_nograd", "bwd"}
    want = {"bandwidth_floor", "hard_topk", "softmoe_trunc"}
    for mode, recs in by_mode.items():
        assert want <= set(recs), (mode, sorted(recs))
    step = by_mode["fwd_bwd"]
    assert {"step_overhead", "elementwise"} <= set(step)
    for name in ("hard_topk", "softmoe_trunc", "elementwise"):
        rec = step[name]
        assert rec["ms"] > 0 and rec["x_floor"] == pytest.approx(rec["ns_per_row"] / rec["floor_ns_per_row"])
    assert step["hard_topk"]["ratio_vs_hard_topk"] == pytest.approx(1.0)
    assert step["softmoe_trunc"]["mean_active_per_row"] == pytest.approx(8.0, abs=0.2)
    assert step["hard_topk"]["mean_active_per_row"] == 2.0


def test_unknown_method_is_refused():
    with pytest.raises(SystemExit, match="unknown method 'topk'"):
        bench_router.main(["--quick", "--methods", "topk", "--json", ""])
