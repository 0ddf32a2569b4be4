"""The CUDA build without a GPU (`make cuda-build` runs this file with it): every op has a CUDA kernel,
and the host-side parts of the CUDA path are checked by calling the launchers' host functions of
the built extension directly (ctypes): the soft top-k launch shape (blocks on every multiprocessor at
4,096 rows, bounded scratch) and the CUDA error text of a failed launch. The source checks below
run in any build: no host loop over experts and no host read of the offsets in the CUDA expert
compute."""
import ctypes
import pathlib
import re

import pytest
import torch

import softmoe  # noqa: F401  (loads softmoe._C and its registrations)
from softmoe import _C

ROOT = pathlib.Path(__file__).resolve().parents[1]
OPS = ("soft_topk", "soft_topk_backward", "dispatch_plan", "gather_rows", "gather_rows_backward", "combine_rows",
       "combine_rows_backward", "matmul", "grouped_mm", "grouped_mm_weight_grad", "expert_ffn", "expert_ffn_backward")


def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"softmoe::{op}", "CUDA")


cuda_build = pytest.mark.skipif(
    torch.version.cuda is None or not _has_cuda_kernel("soft_topk"),
    reason="softmoe is not a CUDA build here (make cuda-build builds and tests one)",
)


@pytest.fixture(scope="module")
def lib():
    return ctypes.CDLL(_C.__file__)


@cuda_build
@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_cuda_kernel(op):
    assert _has_cuda_kernel(op), f"softmoe::{op} has no CUDA kernel in a CUDA build"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"softmoe::{op}", "CPU")


def _topk_shape(lib, rows, row_bytes, sms):
    threads, block = ctypes.c_int64(), ctypes.c_int()
    lib.smoe_cuda_topk_shape(ctypes.c_int64(rows), ctypes.c_size_t(row_bytes), ctypes.c_int(sms),
                             ctypes.byref(threads), ctypes.byref(block))
    return threads.value, block.value


@cuda_build
@pytest.mark.parametrize("sms", [108, 132])  # A100, H100 / H200
def test_topk_launch_reaches_every_multiprocessor_at_4096_rows(lib, sms):
    threads, block = _topk_shape(lib, 4096, 2080, sms)  # E = 256, float32, max_active = 8
    assert threads == 4096 and block in (32, 64, 128)
    assert -(-threads // block) >= min(sms, 4096 // 32)


@cuda_build
@pytest.mark.parametrize("row_bytes", [2080, 4096, 7168, 1 << 20])
def test_topk_scratch_is_bounded(lib, row_bytes):
    sms = 132
    for rows in (1, 33, 4096, 10**5, 10**7):
        threads, block = _topk_shape(lib, rows, row_bytes, sms)
        assert threads >= 1 and threads % 32 == 0 and threads <= max(32, -(-rows // 32) * 32)
        assert threads * row_bytes <= max(64 << 20, sms * 32 * row_bytes)
    assert _topk_shape(lib, 0, 2080, sms) == (0, 128)


@cuda_build
def test_cuda_error_text(lib):
    lib.smoe_cuda_error_text.restype = ctypes.c_char_p
    lib.smoe_cuda_last_error.restype = ctypes.c_char_p
    text = lib.smoe_cuda_error_text(700).decode()  # cudaErrorIllegalAddress
    assert text.startswith("cudaErrorIllegalAddress: ") and "illegal memory access" in text
    assert lib.smoe_cuda_error_text(0) == b""
    assert lib.smoe_cuda_last_error() == b""  # no launch has failed on this thread


def _code(path: pathlib.Path) -> str:
    """The file without its comments."""
    text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def test_cuda_expert_compute_has_no_host_loop_or_sync():
    code = _code(ROOT / "csrc/torch/experts_cuda.cpp")
    for pattern in (r"\bfor\s*\(", r"\bwhile\s*\(", r"segment_bounds", r"kCPU", r"\.item\s*[<(]", r"\.cpu\(",
                    r"Schedule", r"RowBlock"):
        assert not re.search(pattern, code), f"experts_cuda.cpp: {pattern} (a host loop over experts or a sync)"
    # the grouped kernels read the offsets on the device
    assert "smoe_cuda_grouped_mm(" in code and "smoe_cuda_grouped_mm_weight_grad(" in code
