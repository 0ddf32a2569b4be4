"""Expert parallelism and data parallelism over torch.distributed (softmoe/parallel.py), on the CPU
with the gloo backend: 2 and 4 processes spawned per test (tests/_dist_worker.py), loopback only, a
FileStore rendezvous (no ports), each test bounded in time so that a hang fails instead of blocking.

- expert-parallel forward, backward, comm accounting and checkpoints equal the single-process layer
  (2 ranks x 2 experts; 4 ranks x 2 experts with GELU and combine="sum"; 4 ranks x 1 expert);
- ranks whose experts receive no tokens;
- DDP and FSDP2 training (with and without expert parallelism, GlobalBudget included, gradient
  clipping active) equal single-process training on the global batch;
- mismatched configurations raise clear errors on every rank (construction, dtype, autograd mode,
  a rank skipping a forward -> timeout error).
"""
import os
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_dist_worker.py")
LIMIT_S = 150  # per test: a hang fails the test after this long

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with the gloo backend")


def launch(scenario: str, world: int, tmp_path) -> None:
    """Runs the scenario on `world` processes; fails with every rank's output if one fails or if
    they are not all done within LIMIT_S."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
    store = tmp_path / "store"
    logs = [tmp_path / f"rank{rank}.log" for rank in range(world)]
    procs = []
    for rank in range(world):
        with open(logs[rank], "w") as out:
            procs.append(subprocess.Popen([sys.executable, WORKER, scenario, str(rank), str(world), str(store)],
                                          stdout=out, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + LIMIT_S
    timed_out = False
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    report = "\n".join(f"--- rank {rank} (exit {proc.returncode}) ---\n{logs[rank].read_text()[-4000:]}"
                       for rank, proc in enumerate(procs))
    if timed_out:
        pytest.fail(f"{scenario} on {world} processes did not finish within {LIMIT_S} s (hang?)\n{report}")
    if any(proc.returncode != 0 for proc in procs):
        pytest.fail(f"{scenario} on {world} processes failed\n{report}")


def test_expert_parallel_matches_single_process_2_ranks(tmp_path):
    launch("ep2", 2, tmp_path)


def test_expert_parallel_matches_single_process_4_ranks(tmp_path):
    launch("ep4", 4, tmp_path)


def test_ranks_whose_experts_get_no_tokens(tmp_path):
    launch("empty_rank", 2, tmp_path)


def test_ddp_training_matches_single_process(tmp_path):
    launch("ddp", 2, tmp_path)


def test_fsdp2_training_matches_single_process(tmp_path):
    launch("fsdp", 2, tmp_path)


def test_mismatched_configuration_fails_clearly(tmp_path):
    launch("mismatch", 2, tmp_path)


TRAIN_LM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "train_lm.py")
TINY_LM = ["--layers", "2", "--d-model", "32", "--d-hidden", "32", "--batch", "4", "--context", "32", "--sample", "20",
           "--mean-k", "1.5", "--max-active", "3", "--threads", "1", "--steps", "6", "--eval-every", "3"]


def test_train_lm_nproc_2_follows_the_single_process_run(tmp_path):
    """examples/train_lm.py --nproc 2 relaunches itself with torchrun (gloo, loopback) and trains the
    same model as the single-process run on the same global batches, up to float32 rounding."""
    import json

    import torch

    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        cmd = [sys.executable, TRAIN_LM, *TINY_LM, "--out", str(out)] + (["--nproc", "2"] if nproc > 1 else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LIMIT_S)
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        runs[nproc] = (json.loads((out / "summary.json").read_text()), done.stdout,
                       torch.load(out / "checkpoint.pt", weights_only=False))
    (single, _, ckpt1), (ep, stdout, ckpt2) = runs[1], runs[2]
    assert "expert parallel: 2 processes (gloo), 4 experts per layer each" in stdout
    assert "bytes per token" in stdout and ep["exchange_per_step_rank0"]["bytes_sent_remote"] > 0
    assert abs(ep["heldout_bpb"] - single["heldout_bpb"]) < 1e-4, (ep["heldout_bpb"], single["heldout_bpb"])
    assert max(abs(a - b) for a, b in zip(ep["allocation"], single["allocation"])) < 1e-5
    # The expert-parallel checkpoint holds the full model in the single-process layout.
    for key, value in ckpt1["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.allclose(ckpt2["model"][key], value, rtol=1e-4, atol=1e-5), key
