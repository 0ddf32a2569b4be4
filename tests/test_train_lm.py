"""The README demo's training script, run end to end at a toy size: checkpoints, resume, the NaN
guard, the budget invariant and the outputs it promises."""
import json
import warnings

import torch

import train_lm  # examples/train_lm.py (pyproject.toml: pytest's pythonpath)

TINY = ["--layers", "2", "--d-model", "32", "--d-hidden", "32", "--batch", "4", "--context", "32",
        "--sample", "20", "--mean-k", "1.5", "--max-active", "3", "--threads", "1"]


def run(tmp_path, *extra):
    return train_lm.main(TINY + ["--out", str(tmp_path)] + list(extra))


def test_trains_saves_resumes_and_reports(tmp_path, capsys):
    assert run(tmp_path, "--steps", "6", "--eval-every", "3") == 0
    out = capsys.readouterr().out
    assert "learned per-layer allocation" in out and "--- sample" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert abs(sum(summary["allocation"]) - 2 * 1.5) < 1e-5
    assert all(1.0 < k < 2.0 for k in summary["allocation"])  # k_min < k_l < max_active - 1
    assert all(1.0 <= a <= 3.0 for a in summary["active_per_layer"])
    assert (tmp_path / "allocation.png").exists()
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["step"] == 6

    assert run(tmp_path, "--steps", "9", "--eval-every", "3", "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 9


def test_the_default_budget_runs_without_warnings_of_its_own(tmp_path, capsys):
    """The demo's default (a budget in realised active experts) at toy size: the script itself
    raises no warning (it once read the soft count of a layer, a tensor that requires grad, with
    float(), which torch warns about on every logged step)."""
    tiny_active = [a for a in TINY if a not in ("--mean-k", "1.5")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert train_lm.main(tiny_active + ["--out", str(tmp_path), "--steps", "12", "--eval-every", "6"]) == 0
    assert "realised active experts per token" in capsys.readouterr().out
    own = [w for w in caught if w.filename.endswith("train_lm.py")]
    assert not own, [str(w.message) for w in own]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    assert run(tmp_path, "--steps", "3", "--eval-every", "3") == 0
    good = (tmp_path / "checkpoint.pt").read_bytes()
    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(train_lm.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    assert run(tmp_path, "--steps", "6", "--eval-every", "3", "--resume") == 1
    assert "the loss became nan" in capsys.readouterr().err
    assert (tmp_path / "checkpoint.pt").read_bytes() == good


def test_parallel_runs_do_not_overwrite_the_demo(monkeypatch):
    """--nproc N (and torchrun's relaunched processes, which see WORLD_SIZE) default to their own
    --out, so the demo's checkpoint and plot survive a parallel run; an explicit --out is kept."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    demo = train_lm.parse_args([]).out
    assert demo == "runs/train_lm"
    assert train_lm.parse_args(["--nproc", "2"]).out == "runs/train_lm_2proc"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_lm.parse_args([]).out == "runs/train_lm_2proc"
    assert train_lm.parse_args(["--out", "mine"]).out == "mine"
