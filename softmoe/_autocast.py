"""What every softmoe op computes in under ``torch.autocast``: one rule per op, chosen as torch chooses
for its own ops (the lists in ATen's autocast_mode.cpp).

- ``LOWER_PRECISION`` (like ``torch.mm`` / ``nn.Linear``): the router's ``matmul`` and the experts'
  ``grouped_mm`` / ``expert_ffn`` cast their floating inputs to the autocast dtype (bfloat16 or
  float16), so the experts, most of a MoE model's FLOPs, reach the 16-bit matmul units. Their
  products accumulate in float32 inside BLAS; ``matmul`` also sums its reduction blocks in float32.
- ``FLOAT32`` (like ``softmax``): ``soft_topk``, the routing math (its kernels already compute in
  float32; the rule makes a 16-bit ``scores`` come back as float32 weights ``p``, as softmax's do).
- No rule, so autocast falls through and the op follows its inputs: ``dispatch_plan`` (integers
  out), ``gather_rows`` (a permutation: ``xs`` has x's dtype), ``combine_rows`` (float32 math,
  ``ys``' dtype out, so the layer returns the autocast dtype like an ``nn.Linear`` FFN does), and
  every backward op, which sees the dtypes its forward saved.

A cast, as torch's: floating tensors on the autocast device, float64 excepted (autocast leaves
float64 alone). Autocast runs above autograd, so the casts are differentiated: the gradients of
float32 parameters come back float32.
"""
from typing import Callable

import torch

from . import _extension

_extension.load()  # the ops must exist before rules can be registered for them

LOWER_PRECISION = ("matmul", "grouped_mm", "expert_ffn")
FLOAT32 = ("soft_topk",)
#: Devices whose autocast the rules follow (the devices the kernels run on).
DEVICE_TYPES = ("cpu", "cuda")
#: The autocast dtypes the lower-precision ops run in (what ``torch.autocast`` itself accepts on the
#: CPU and GPU; other dtypes are reachable through ``torch.set_autocast_dtype`` only).
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16)

# Keeps the registrations alive (they are dropped with the Library object).
_LIB = torch.library.Library("softmoe", "IMPL")


def _cast(value: object, device_type: str, dtype: torch.dtype) -> object:
    if (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.device.type == device_type
        and value.dtype != torch.float64
    ):
        return value.to(dtype)
    return value


def lower_precision_dtype(op: str, device_type: str) -> torch.dtype:
    """The autocast dtype of ``device_type``, checked: a TypeError naming ``op`` for one the kernels
    do not compute in (e.g. ``torch.set_autocast_dtype("cpu", torch.float8_e4m3fn)``)."""
    dtype = torch.get_autocast_dtype(device_type)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"softmoe: {op}: the {device_type} autocast dtype must be torch.bfloat16 or torch.float16 (the "
            f"16-bit dtypes the expert and router matmuls run in under torch.autocast), got {dtype}"
        )
    return dtype


def _register(name: str, device_type: str, target: Callable[[str, str], torch.dtype]) -> None:
    """The Autocast kernel of ``softmoe::name`` on ``device_type``: casts the inputs to
    ``target(name, device_type)``, then calls the op below autocast."""
    op = getattr(torch.ops.softmoe, name).default
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
    key = getattr(torch._C.DispatchKey, key_name)

    def cast_and_call(*args):
        dtype = target(name, device_type)
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return op(*(_cast(arg, device_type, dtype) for arg in args))

    # Both registrations, as torch.library.register_autocast makes them: the dispatcher's kernel
    # (eager) and the Python kernel that tracing (torch.compile, opcheck) runs through.
    op.py_impl(key)(cast_and_call)
    _LIB.impl(name, lambda _keyset, *args: cast_and_call(*args), key_name, with_keyset=True)


def _float32(op: str, device_type: str) -> torch.dtype:
    return torch.float32


for _device_type in DEVICE_TYPES:
    for _name in LOWER_PRECISION:
        _register(_name, _device_type, lower_precision_dtype)
    for _name in FLOAT32:
        _register(_name, _device_type, _float32)
