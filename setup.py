"""Build of the softmoe extension: the C core plus the torch binding (csrc/torch), and the CUDA
kernels with the binding's CUDA implementations (csrc/torch/*_cuda.cpp) when torch is a CUDA build
and nvcc is found. The extension compiles against the torch of the build environment: pip's
default isolated build installs the one pyproject.toml's build-system names;
`pip install --no-build-isolation ...` uses the environment's own. Either way the package then
requires exactly that torch version at run time (a build only loads with the torch it was compiled
against).

SOFTMOE_CUDA=0|1|auto (default auto) forces the CUDA part off or on.
"""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
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


def extensions():
    cuda = with_cuda()
    binding = sorted(glob.glob("csrc/torch/*.cpp"))
    cuda_binding = [f for f in binding if f.endswith("_cuda.cpp")]
    sources = sorted(glob.glob("csrc/core/*.c")) + [f for f in binding if f not in cuda_binding]
    # The C core is valid C11 and C++17; the extension build compiles it as C++.
    # -fopenmp: torch's at::parallel_for only runs on several threads when _OPENMP is defined.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-Wall", "-Wextra", "-Wno-missing-field-initializers"]
    extra = {"cxx": cxx}
    if cuda:
        # registered under the CUDA dispatch key; a CPU build has no CUDA code at all
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + cuda_binding
        extra["nvcc"] = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
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
