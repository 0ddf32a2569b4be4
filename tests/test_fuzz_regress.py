"""Replays the committed fuzz corpus (tests/fuzz/corpus/<target>/) as regression tests.

Each libFuzzer target of tests/fuzz is compiled with tests/fuzz/replay_main.c instead of libFuzzer,
with the system C compiler (gcc is fine, no clang needed) under AddressSanitizer and
UndefinedBehaviorSanitizer, and run once over every corpus input: an invariant violation or a
sanitizer report aborts and fails the test. This is what `make fuzz-regress` does; skipped only when
there is no C compiler. See tests/fuzz/README.md.

`make test` has built the same replays under the sanitizers just before (`make ctest`) and names
their folder in SOFTMOE_FUZZ_REPLAY_DIR: they are run from there instead of compiled again.
"""
import concurrent.futures
import os
import shutil
import subprocess
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "tests", "fuzz")
CORE = sorted(
    os.path.join(ROOT, "csrc", "core", f) for f in os.listdir(os.path.join(ROOT, "csrc", "core")) if f.endswith(".c")
)
TARGETS = ("fuzz_topk", "fuzz_dispatch")
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


def _compiler():
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


def _build(cc, out, flags):
    """Both replays, the core compiled once with flags, its files in parallel (the row loops' three
    instruction-set files take a minute each under the sanitizers; line tables without variable
    tracking, as the Makefile's DEBUG_INFO); {target: path}, or the failing compiler output."""
    debug_info = ["-g", "-fno-var-tracking"]
    base = [cc, "-std=c11", "-O1", *debug_info, "-Wall", "-Wextra", "-I" + os.path.join(ROOT, "csrc")] + flags
    objects = [os.path.join(out, os.path.basename(src)[:-2] + ".o") for src in CORE]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        procs = list(pool.map(lambda so: _run(base + ["-c", so[0], "-o", so[1]]), zip(CORE, objects)))
    for proc in procs:
        if proc.returncode != 0:
            return proc.stderr
    binaries = {}
    for target in TARGETS:
        binaries[target] = os.path.join(out, f"replay_{target}")
        src = [os.path.join(FUZZ, f"{target}.c"), os.path.join(FUZZ, "replay_main.c")]
        proc = _run(base + src + objects + ["-lm", "-o", binaries[target]])
        if proc.returncode != 0:
            return proc.stderr
    return binaries


@pytest.fixture(scope="module")
def replay_binaries(tmp_path_factory):
    built = os.environ.get("SOFTMOE_FUZZ_REPLAY_DIR")
    if built:
        binaries = {target: os.path.join(built, f"replay_{target}") for target in TARGETS}
        missing = [path for path in binaries.values() if not os.access(path, os.X_OK)]
        assert not missing, f"SOFTMOE_FUZZ_REPLAY_DIR names no replay binaries {missing}"
        return binaries
    cc = _compiler()
    if cc is None:
        pytest.skip("no C compiler (cc, gcc or clang) on PATH")
    sanitized = _build(cc, str(tmp_path_factory.mktemp("fuzz_replay")), SANITIZE)
    if isinstance(sanitized, dict):
        return sanitized
    # a compiler without the sanitizer runtimes still replays the invariants
    plain = _build(cc, str(tmp_path_factory.mktemp("fuzz_replay_plain")), [])
    assert isinstance(plain, dict), f"cannot build the replays:\n{plain[-3000:]}"
    warnings.warn(f"{cc} cannot build with ASan/UBSan here; replaying without sanitizers:\n{sanitized[-500:]}")
    return plain


@pytest.mark.parametrize("target", TARGETS)
def test_corpus_replays_clean(target, replay_binaries):
    binary = replay_binaries[target]
    corpus = os.path.join(FUZZ, "corpus", target)
    inputs = [f for f in os.listdir(corpus) if not f.startswith(".")]
    assert inputs, f"the corpus of {target} is empty"
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=1", UBSAN_OPTIONS="print_stacktrace=1")
    proc = subprocess.run([binary, corpus], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, f"{target} replay failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    assert f"replay: {len(inputs)} inputs, all passed" in proc.stdout, proc.stdout


def test_corpus_holds_the_regressions():
    """Every bug the fuzzers found is pinned by at least one named input (see tests/fuzz/README.md)."""
    names = os.listdir(os.path.join(FUZZ, "corpus", "fuzz_topk"))
    for tag in ("regress-A-", "regress-B-", "regress-C-", "regress-D-", "regress-E-", "regress-F-", "regress-G-"):
        assert any(tag in n for n in names), f"no corpus input for {tag}"
