"""The torch binding is split by dispatch key (csrc/torch): every op's schema is defined once, each op
has a CPU kernel, the CUDA kernels live in the *_cuda.cpp files (compiled only in a CUDA build), and
no op implementation branches on the device."""
import glob
import os
import re

import pytest
import torch

import softmoe  # noqa: F401  (loads the extension)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINDING = sorted(glob.glob(os.path.join(ROOT, "csrc", "torch", "*.cpp")))
OPS = sorted(s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("softmoe::"))


def test_every_op_is_defined():
    names = {name.split("::")[1] for name in OPS}
    assert names == {
        "soft_topk", "soft_topk_backward", "dispatch_plan", "gather_rows", "gather_rows_backward", "combine_rows",
        "combine_rows_backward", "matmul", "grouped_mm", "grouped_mm_weight_grad", "expert_ffn", "expert_ffn_backward",
    }


@pytest.mark.parametrize("op", OPS)
def test_kernels_per_dispatch_key(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), f"{op} has no CPU kernel"
    if torch.version.cuda is None:  # a CPU build of torch: the extension was built without CUDA code
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has a CUDA kernel in a CPU build"


def _registrations(path):
    with open(path) as fh:
        return set(re.findall(r"TORCH_LIBRARY_IMPL\(softmoe,\s*(\w+),", fh.read()))


@pytest.mark.parametrize("path", BINDING, ids=[os.path.basename(p) for p in BINDING])
def test_one_dispatch_key_per_file_and_no_device_branch(path):
    with open(path) as fh:
        text = fh.read()
    keys = _registrations(path)
    if path.endswith("_cuda.cpp"):
        assert keys == {"CUDA"}, f"{os.path.basename(path)} registers {sorted(keys)}"
    else:
        assert keys <= {"CPU"}, f"{os.path.basename(path)} registers {sorted(keys)}"
    for branch in ("is_cpu()", "is_cuda()", "SOFTMOE_WITH_CUDA", "built without CUDA"):
        assert branch not in text, f"{os.path.basename(path)} branches on the device ({branch})"
