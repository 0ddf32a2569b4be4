"""Small timing helpers shared by the softmoe benchmarks.

Design rules (the machines we run on are small and noisy):
- warm-up calls first, then at least ``repeats`` timed repeats; report the median;
- when several methods are compared, time them *interleaved* (round robin over repeats), so that
  a burst of noise hits every method alike, and report ratios against a baseline timed in the
  same run (``ratio_of_medians`` and ``median_of_ratios``);
- each timed repeat runs ``number`` calls (calibrated so that one repeat lasts at least
  ``min_repeat_s``); the time reported is per call;
- CUDA work is synchronised before the clock is read.

Nothing here imports softmoe, so every benchmark can use it before the extension is built.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

__all__ = [
    "Case",
    "Stats",
    "measure",
    "time_fn",
    "ratio_of_medians",
    "median_of_ratios",
    "peak_memory_bytes",
    "cpu_model",
    "machine_info",
    "write_json",
    "progress",
]


@dataclass
class Case:
    """One thing to time.

    ``fn(state)`` is the timed statement. ``setup()`` (optional) runs untimed before every timed
    call and its return value is passed to ``fn`` (use it to build a fresh autograd graph when
    timing backward only); without ``setup`` ``fn`` is called with ``None``.
    """

    name: str
    fn: Callable[[Any], Any]
    setup: Optional[Callable[[], Any]] = None


@dataclass
class Stats:
    name: str
    times_ms: List[float] = field(default_factory=list)  # per-call time of each repeat
    number: int = 1  # calls per repeat

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms) if self.times_ms else float("nan")

    @property
    def min_ms(self) -> float:
        return min(self.times_ms) if self.times_ms else float("nan")

    @property
    def max_ms(self) -> float:
        return max(self.times_ms) if self.times_ms else float("nan")

    @property
    def iqr_ms(self) -> float:
        if len(self.times_ms) < 4:
            return float("nan")
        q = statistics.quantiles(self.times_ms, n=4)
        return q[2] - q[0]

    def as_dict(self) -> Dict[str, Any]:
        return {
            "median_ms": self.median_ms,
            "min_ms": self.min_ms,
            "max_ms": self.max_ms,
            "iqr_ms": self.iqr_ms,
            "repeats": len(self.times_ms),
            "calls_per_repeat": self.number,
            "times_ms": self.times_ms,
        }


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_timed(case: Case, number: int, device: Optional[torch.device]) -> float:
    """Seconds for ``number`` calls of case.fn (setup excluded)."""
    if case.setup is None:
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(number):
            case.fn(None)
        _sync(device)
        return time.perf_counter() - t0
    total = 0.0
    for _ in range(number):
        state = case.setup()
        _sync(device)
        t0 = time.perf_counter()
        case.fn(state)
        _sync(device)
        total += time.perf_counter() - t0
        del state
    return total


def measure(
    cases: Sequence[Case],
    *,
    repeats: int = 7,
    warmup: int = 2,
    min_repeat_s: float = 0.0,
    max_number: int = 1000,
    device: Optional[torch.device] = None,
    interleave: bool = True,
) -> Dict[str, Stats]:
    """Time every case; returns name -> Stats (per-call times of each repeat, in ms).

    ``warmup`` untimed calls per case, then a calibration call that picks ``number`` (calls per
    repeat) so that a repeat lasts >= ``min_repeat_s``; then ``repeats`` timed repeats, round robin
    over the cases when ``interleave`` (default), else case by case. GC is disabled while timing.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    stats: Dict[str, Stats] = {}
    numbers: Dict[str, int] = {}
    for c in cases:
        for _ in range(max(0, warmup)):
            _run_timed(c, 1, device)
        n = 1
        if min_repeat_s > 0:
            one = max(_run_timed(c, 1, device), 1e-7)
            n = int(min(max_number, max(1, math.ceil(min_repeat_s / one))))
        numbers[c.name] = n
        stats[c.name] = Stats(c.name, [], n)

    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        if interleave:
            for _ in range(repeats):
                for c in cases:
                    n = numbers[c.name]
                    stats[c.name].times_ms.append(_run_timed(c, n, device) * 1e3 / n)
        else:
            for c in cases:
                n = numbers[c.name]
                for _ in range(repeats):
                    stats[c.name].times_ms.append(_run_timed(c, n, device) * 1e3 / n)
    finally:
        if was_enabled:
            gc.enable()
    return stats


def time_fn(fn: Callable[[], Any], **kw: Any) -> Stats:
    """Convenience: time one zero-argument callable (same keywords as ``measure``)."""
    return measure([Case("fn", lambda _s: fn())], **kw)["fn"]


def ratio_of_medians(s: Stats, base: Stats) -> float:
    return s.median_ms / base.median_ms


def median_of_ratios(s: Stats, base: Stats) -> float:
    """Median over repeats of time/base_time, pairing repeat i with repeat i.

    With interleaved timing repeat i of both ran back to back, so this ratio cancels slow
    drifts of the machine better than the ratio of medians.
    """
    pairs = [a / b for a, b in zip(s.times_ms, base.times_ms) if b > 0]
    return statistics.median(pairs) if pairs else float("nan")


def peak_memory_bytes(fn: Callable[[], Any], device: Optional[torch.device] = None) -> Optional[int]:
    """Peak memory allocated while running ``fn()``, above what was allocated before.

    CUDA: exact, from the caching allocator's peak statistics.
    CPU: approximate, from the torch profiler's memory events, netted per operator (temporaries
    that an operator allocates and frees internally are not seen; allocations that do not go
    through the c10 CPU allocator are not seen). It runs ``fn`` once under the profiler (slow,
    a second or two): use it outside the timed loop. Returns None if it cannot be measured.
    """
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    try:
        from torch.profiler import ProfilerActivity, profile
    except Exception:  # pragma: no cover
        return None
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = []
        for e in prof.events():
            # "[memory]" events are allocations/frees not attributed to an operator; for
            # operators, the self usage excludes what their children already account for.
            delta = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
            if delta:
                events.append((e.time_range.start, delta))
        events.sort(key=lambda t: t[0])
        cur = peak = 0
        for _, d in events:
            cur += d
            peak = max(peak, cur)
        return int(peak)
    except Exception:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", "r") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info(device: Optional[torch.device] = None) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "argv": list(sys.argv),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "os_cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
    }
    info["env"] = {k: os.environ[k] for k in sorted(os.environ)
                   if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")
                   or k.startswith("MALLOC_")}
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            info["transparent_hugepage"] = fh.read().strip()
    except OSError:
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except (AttributeError, OSError):
        pass
    try:
        info["sched_affinity_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    try:
        info["torch_parallel_info"] = torch.__config__.parallel_info().strip().splitlines()
    except Exception:
        pass
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def write_json(path: str, data: Any) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(_clean(data), fh, indent=2, sort_keys=False, default=_json_default, allow_nan=False)
        fh.write("\n")
    os.replace(tmp, path)


# Results are committed: paths inside the checkout are stored relative to it, so the files say
# nothing about the machine that wrote them.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def _clean(o: Any) -> Any:
    """Non-finite floats become strings ("nan", "inf") so the file stays strict JSON; absolute
    paths inside the checkout become relative."""
    if isinstance(o, float):
        return o if math.isfinite(o) else str(o)
    if isinstance(o, str) and o.startswith(_REPO_ROOT):
        return o[len(_REPO_ROOT):]
    if isinstance(o, dict):
        return {str(k): _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    return o


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def progress(iterable, **kw: Any):
    """tqdm if it is installed, else the iterable itself.

    A terminal that reports no size (0 rows or columns: a pseudo-terminal nobody sized, as under
    ``script``, some CI runners and container consoles) would make tqdm hide every bar (it takes the
    -1 rows it computes for a full screen) and print only the newline of its close, a blank line per
    bar: such a terminal gets a fixed 80 x 24 instead."""
    try:
        from tqdm import tqdm  # type: ignore
    except Exception:
        return iterable
    try:
        columns, rows = os.get_terminal_size(kw.get("file", sys.stderr).fileno())
    except (AttributeError, OSError, ValueError):  # not a terminal: tqdm does not ask for its size
        columns = rows = None
    if columns == 0 or rows == 0:
        kw.update(dynamic_ncols=False, ncols=(columns or 80) - 1, nrows=(rows or 24) - 1)
    return tqdm(iterable, **kw)
