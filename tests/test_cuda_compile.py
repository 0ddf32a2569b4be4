"""Compile-only check of the CUDA kernels: every csrc/cuda/*.cu builds with nvcc for sm_80 and
sm_90 with all warnings (nvcc's and the host compiler's -Wall -Wextra) as errors. Needs nvcc, not
torch's CUDA build and not a GPU; skipped when nvcc is not on PATH. The binding's CUDA
implementations (csrc/torch/*_cuda.cpp, host C++ that a CUDA build compiles) get a syntax check with
nvcc against the installed torch's headers, with the same warnings as errors (`make cuda-check` runs
both).

The lists of files come from globs, as in setup.py, so a new file is checked without touching this
test or the Makefile."""
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import tempfile

import pytest
from torch.utils.cpp_extension import include_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
CU_FILES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
CUDA_BINDING = sorted(glob.glob(os.path.join(ROOT, "csrc", "torch", "*_cuda.cpp")))
NVCC = shutil.which("nvcc")
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
FLAGS = ["-std=c++17", "-I", os.path.join(ROOT, "csrc"), "-Xcompiler", "-Wall,-Wextra"]
FLAGS += ["--Werror", "all-warnings"]  # nvcc's warnings and (as -Werror) the host compiler's

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA compile check needs it")


def _compile(src, out_dir):
    obj = os.path.join(out_dir, os.path.basename(src) + ".o")
    cmd = [NVCC, *FLAGS, *ARCHS, "-c", src, "-o", obj]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    return cmd, proc, obj


# torch's headers as system headers (their own warnings are not ours); the one header a CPU build of
# torch lacks (c10/cuda/impl/cuda_cmake_macros.h, a Windows export macro) is skipped by its switch.
BINDING_FLAGS = ["-std=c++17", "-I", os.path.join(ROOT, "csrc"), "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]
BINDING_FLAGS += [flag for path in include_paths() for flag in ("-isystem", path)]
BINDING_FLAGS += ["-Xcompiler", "-Wall,-Wextra,-fsyntax-only", "--Werror", "all-warnings"]


def _syntax_check(src):
    cmd = [NVCC, *BINDING_FLAGS, "-c", src, "-o", os.devnull]
    return cmd, subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def compiled():
    """All .cu files compiled once, in parallel: {path: (cmd, CompletedProcess, object file)}."""
    with tempfile.TemporaryDirectory() as out_dir:
        workers = max(1, min(len(CU_FILES), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            results = dict(zip(CU_FILES, pool.map(lambda f: _compile(f, out_dir), CU_FILES)))
        # read the symbol tables before the directory goes away
        out = {}
        for f, (cmd, proc, obj) in results.items():
            out[f] = (cmd, proc, _defined_symbols(obj) if proc.returncode == 0 else None)
        yield out


def _defined_symbols(obj):
    """Global symbols an object file defines (None when nm is unavailable)."""
    nm = shutil.which("nm")
    if nm is None:
        return None
    proc = subprocess.run([nm, "-g", "--defined-only", obj], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return {line.split()[-1] for line in proc.stdout.splitlines() if line.strip()}


def test_cuda_sources_exist():
    """The globs see the kernels and the binding's CUDA side (guards against a moved directory making
    every check vacuous)."""
    names = {os.path.basename(f) for f in CU_FILES}
    assert {"lapsum.cu", "budget.cu"} <= names, f"csrc/cuda holds {sorted(names)}"
    binding = {os.path.basename(f) for f in CUDA_BINDING}
    assert binding == {"topk_cuda.cpp", "route_cuda.cpp", "experts_cuda.cpp"}, f"csrc/torch holds {sorted(binding)}"


@needs_nvcc
@pytest.mark.parametrize("src", CU_FILES, ids=[os.path.basename(f) for f in CU_FILES])
def test_cu_file_compiles(compiled, src):
    cmd, proc, _ = compiled[src]
    assert proc.returncode == 0, (
        f"nvcc failed for {os.path.relpath(src, ROOT)} (rc={proc.returncode})\n"
        f"command: {' '.join(cmd)}\n--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout}"
    )


@needs_nvcc
def test_every_cu_file_checked(compiled):
    """Every .cu file of the project went through nvcc here, independent of the Makefile's list:
    all of them live in csrc/cuda (the directory setup.py and this test glob), and each compiled."""
    everywhere = sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu"), recursive=True))
    assert everywhere == CU_FILES, f".cu files outside csrc/cuda: {sorted(set(everywhere) - set(CU_FILES))}"
    assert sorted(compiled) == CU_FILES
    assert all(proc.returncode is not None for _, proc, _ in compiled.values())


@needs_nvcc
def test_launch_h_is_implemented(compiled):
    """Every launcher declared in csrc/cuda/launch.h is defined, with C linkage, by exactly one
    compiled .cu file (so the torch binding links)."""
    with open(os.path.join(CUDA_DIR, "launch.h")) as fh:
        declared = set(re.findall(r"\b(smoe_cuda_\w+)\s*\(", fh.read()))
    assert declared, "no smoe_cuda_* declarations found in launch.h"
    if any(syms is None for syms in compiled.values()):
        pytest.skip("nm is not available (or a file did not compile) to read the symbol tables")
    owners = {
        name: [os.path.basename(f) for f, (_, _, syms) in compiled.items() if name in syms] for name in declared
    }
    missing = sorted(name for name, files in owners.items() if not files)
    repeated = {name: files for name, files in owners.items() if len(files) > 1}
    assert not missing and not repeated, (
        f"launchers declared in csrc/cuda/launch.h but defined by no .cu file: {missing}; "
        f"defined more than once: {repeated}"
    )


@needs_nvcc
@pytest.mark.parametrize("src", CUDA_BINDING, ids=[os.path.basename(f) for f in CUDA_BINDING])
def test_cuda_binding_compiles(src):
    """The *_cuda.cpp implementations (the ops under the CUDA dispatch key) compile against torch's
    headers; a CPU build never compiles them, so this is their only check on a machine without a CUDA
    build of torch."""
    cmd, proc = _syntax_check(src)
    assert proc.returncode == 0, (
        f"nvcc failed for {os.path.relpath(src, ROOT)} (rc={proc.returncode})\n"
        f"command: {' '.join(cmd)}\n--- stderr ---\n{proc.stderr}\n--- stdout ---\n{proc.stdout}"
    )
