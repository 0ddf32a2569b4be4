"""Build of the softmoe extension: the C core plus the torch binding (csrc/torch), and the CUDA
kernels with the binding's CUDA implementations (csrc/torch/*_cuda.cpp) when torch is a CUDA build
and nvcc is found. The extension compiles against the torch of the build environment: pip's
default isolated build installs the one pyproject.toml's build-system names;
`pip install --no-build-isolation ...` uses the environment's own. Either way the package then
requires exactly that torch version at run time (a build only loads with the torch it was compiled
against).

SOFTMOE_CUDA=0|1|auto (default auto) forces the CUDA part off or on. SOFTMOE_WERROR=1 turns warnings in
softmoe's own files into errors (CI); the headers of torch, CUDA and the nvidia-* packages are system
headers, whose warnings are not ours.

A CUDA build finds its headers itself: CUDA_HOME, when unset, is the toolkit of the `nvcc` on PATH as
nvcc reports it (torch would guess the parent of PATH's nvcc, wrong for a wrapper script such as
/usr/local/bin/nvcc), and the headers a minimal toolkit lacks (cuBLAS, cuSPARSE, ...) come from the
nvidia-* packages that the CUDA build of torch installs beside itself (site-packages/nvidia/*/include).
"""
import glob
import os
import shutil
import subprocess
import sys
from typing import List, Optional

from setuptools import setup


def nvcc_cuda_home() -> Optional[str]:
    """The toolkit root of the nvcc on PATH: nvcc's own `_HERE_` (its bin folder) from a dry run,
    else the parent of the resolved binary's folder; None without nvcc or without the runtime header."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    candidates = []
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("#$ _HERE_="):
                candidates.append(os.path.dirname(line.split("=", 1)[1].strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            return home
    return None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
if os.environ.get("SOFTMOE_CUDA", "auto") != "0" and not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    _home = nvcc_cuda_home()
    if _home is not None:
        os.environ["CUDA_HOME"] = _home

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, include_paths
except ImportError as exc:
    raise SystemExit(
        f"softmoe's build needs torch in the build environment ({exc}). pip's default (isolated) build "
        "installs it from pyproject.toml's build-system.requires; with --no-build-isolation install torch "
        "into this environment first (e.g. pip install torch==2.13.0)."
    ) from None

ROOT = os.path.dirname(os.path.abspath(__file__))


def torch_requirement() -> str:
    """The run-time requirement: the torch release this build compiles against (its public version,
    without a local label such as +cpu or +cu128: those builds of one release share the C++ ABI)."""
    return "torch==" + torch.__version__.split("+")[0]


def with_cuda() -> bool:
    flag = os.environ.get("SOFTMOE_CUDA", "auto")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not available:
        raise RuntimeError("SOFTMOE_CUDA=1 needs a CUDA build of torch and nvcc (CUDA_HOME)")
    return available and flag != "0"


def nvidia_include_dirs() -> List[str]:
    """The include folders of the nvidia-* wheels installed with a CUDA build of torch (e.g.
    site-packages/nvidia/cu13/include): the cuBLAS / cuSPARSE / cuSOLVER headers that torch's CUDA
    headers include and that a minimal CUDA toolkit does not ship."""
    roots = {os.path.dirname(os.path.dirname(torch.__file__))} | {p for p in sys.path if os.path.isdir(p)}
    found = []
    for root in sorted(roots):
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(found) if os.path.isdir(d)]


def system_includes(dirs: List[str], flag: str = "-isystem") -> List[str]:
    """dirs as system include folders: their headers' warnings are not softmoe's (-Werror stays
    about our own files). GCC drops a -I folder that is also a -isystem one."""
    return [arg for d in dirs for arg in (flag, d)]


def extensions():
    cuda = with_cuda()
    werror = os.environ.get("SOFTMOE_WERROR", "0") == "1"
    binding = sorted(glob.glob("csrc/torch/*.cpp"))
    cuda_binding = [f for f in binding if f.endswith("_cuda.cpp")]
    sources = sorted(glob.glob("csrc/core/*.c")) + [f for f in binding if f not in cuda_binding]
    # The C core is valid C11 and C++17; the extension build compiles it as C++.
    # -fopenmp: torch's at::parallel_for only runs on several threads when _OPENMP is defined.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]
    third_party = list(include_paths("cuda" if cuda else "cpu"))
    if cuda:
        third_party += nvidia_include_dirs()
    cxx += system_includes(third_party) + (["-Werror"] if werror else [])
    extra = {"cxx": cxx}
    if cuda:
        # registered under the CUDA dispatch key; a CPU build has no CUDA code at all
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + cuda_binding
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler", "-Wall,-Wextra"]
        nvcc += system_includes(third_party)
        if werror:
            nvcc += ["--Werror", "all-warnings", "-Xcompiler", "-Werror"]
        extra["nvcc"] = nvcc
    ext = CUDAExtension if cuda else CppExtension
    return [
        ext(
            "softmoe._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args=extra,
            extra_link_args=["-fopenmp"],
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtension}, install_requires=[torch_requirement()])
