"""Shared pytest configuration for the softmoe test-suite.

Markers:
  cuda  - needs a CUDA device; skipped when torch.cuda.is_available() is False.
  slow  - long-running; run by default, deselect with `-m "not slow"`.
"""
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Devices for the tests that run on every device the build supports.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running test")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so failures reproduce."""
    torch.manual_seed(0)
    yield


def random_scores(rows, n, dtype=torch.float64, spread=1.0, device="cpu", generator=None):
    """[rows, n] scores ~ N(0, spread^2), drawn in float64 then cast (the same values for every dtype)."""
    r = torch.randn(rows, n, dtype=torch.float64, generator=generator) * spread
    return r.to(dtype=dtype, device=device)


def per_thread_count(fn, counts=(1, 2)):
    """fn() under each torch.set_num_threads(n) of counts, in order; the thread count is restored."""
    threads = torch.get_num_threads()
    try:
        results = []
        for n in counts:
            torch.set_num_threads(n)
            results.append(fn())
        return results
    finally:
        torch.set_num_threads(threads)
