"""Argument validation for the public entry points.

Every check raises with a message that starts with the function and the argument name and states
the rule that was broken, so a user never has to read a stack trace into C++.
"""
import math
from typing import Optional, Union

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_float_tensor(fn: str, name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: {name} must be float32, float64, bfloat16 or float16, got {t.dtype}"
        )
    return t


def normalize_dim(fn: str, dim: object, ndim: int) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{fn}: dim must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{fn}: dim must be in [{-ndim}, {ndim - 1}] for a {ndim}-d tensor, got {dim}")
    return dim % ndim


def check_row_param(
    fn: str,
    name: str,
    value: Union[float, int, torch.Tensor],
    scores: torch.Tensor,
    lead_shape: torch.Size,
) -> None:
    """k or alpha given as a tensor: floating, on the device of scores, one value or one per row."""
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {value.dtype}")
    if value.device != scores.device:
        raise ValueError(
            f"{fn}: {name} must be on the device of scores ({scores.device}), got {value.device}"
        )
    if value.numel() != 1 and value.shape != lead_shape:
        raise ValueError(
            f"{fn}: {name} must be a scalar or have the shape of scores without dim "
            f"({tuple(lead_shape)}), got shape {tuple(value.shape)}"
        )


def check_number(fn: str, name: str, value: object, tensor_ok: bool = False) -> float:
    """A Python int or float (not bool). `tensor_ok`: the caller also accepts a Tensor (handled before
    this check), which the message then mentions."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a float or a Tensor" if tensor_ok else "a float"
        raise TypeError(f"{fn}: {name} must be {kind}, got {type(value).__name__}")
    return float(value)


def check_eps(fn: str, eps: object) -> float:
    eps = check_number(fn, "eps", eps)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"{fn}: eps must satisfy 0 <= eps < 0.5, got {eps}")
    return eps


def check_max_active(fn: str, max_active: Optional[int], num_experts: int, k: Optional[float]) -> int:
    if max_active is None:
        return num_experts
    if isinstance(max_active, bool) or not isinstance(max_active, int):
        raise TypeError(f"{fn}: max_active must be an int or None, got {type(max_active).__name__}")
    low = max(1, math.ceil(k)) if k is not None else 1
    if not low <= max_active <= num_experts:
        rule = f"ceil(k) = {low}" if k is not None else "1"
        raise ValueError(
            f"{fn}: max_active must satisfy {rule} <= max_active <= {num_experts} (the number of experts), "
            f"got {max_active}"
        )
    return max_active


def check_int(fn: str, name: str, value: object, minimum: int = 1) -> int:
    """A size or a count: a Python int (not bool; a float such as 4.0 is a type error, not rounded)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def check_activation(fn: str, activation: object) -> str:
    """Checked by the modules themselves so that the message names the class the user called, not
    the GroupedExperts they build."""
    if not isinstance(activation, str):
        raise TypeError(f"{fn}: activation must be 'swiglu' or 'gelu' (a str), got {type(activation).__name__}")
    if activation not in ("swiglu", "gelu"):
        raise ValueError(f"{fn}: activation must be 'swiglu' or 'gelu', got {activation!r}")
    return activation


def check_module_dtype(fn: str, dtype: object) -> None:
    """The ``dtype`` of a module constructor: the kernels run float32/float64/bfloat16/float16 only,
    and without this check an integer dtype fails deep inside parameter creation with torch's message."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{fn}: dtype must be a torch.dtype or None, got {type(dtype).__name__}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: dtype must be float32, float64, bfloat16, float16 or None, got {dtype}")


def _autocast_casts(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch.autocast, enabled for x's device, casts x and weight to one dtype (it leaves
    float64 alone)."""
    device_type = x.device.type
    return (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
            and torch.float64 not in (x.dtype, weight.dtype))


def check_layer_input(fn: str, x: object, d_model: int, weight: torch.Tensor, batched: bool = False) -> torch.Tensor:
    """The input of a MoE layer's forward: a floating tensor ``[..., d_model]`` (``[batch, seq,
    d_model]`` when ``batched``) with the dtype (under torch.autocast: any but float64) and device
    of ``weight`` (the layer's first weight).
    Shapes, dtypes and devices only, so torch.compile traces it without graph breaks."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if batched:
        if x.dim() != 3 or x.shape[-1] != d_model:
            raise ValueError(f"{fn}: x must be [batch, seq, d_model = {d_model}], got shape {tuple(x.shape)}")
    elif x.dim() < 1 or x.shape[-1] != d_model:
        raise ValueError(f"{fn}: x must have last dimension d_model = {d_model}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor, got {x.dtype}")
    # Under torch.autocast an nn.Linear takes any float16 / bfloat16 / float32 input (its inputs are
    # cast to the autocast dtype), and so does a MoE layer; autocast leaves float64 alone. The
    # autocast state is asked only when the dtypes differ: torch.compile before torch 2.13 cannot
    # trace torch.amp.is_autocast_available (a graph break, an error under fullgraph=True).
    if x.dtype != weight.dtype and not _autocast_casts(x, weight):
        raise TypeError(
            f"{fn}: x must have the layer's dtype {weight.dtype}, got {x.dtype} "
            f"(convert the layer with .to() or the input, or run it under torch.autocast)"
        )
    if x.device != weight.device:
        raise ValueError(
            f"{fn}: x must be on the layer's device {weight.device}, got {x.device} "
            f"(move the layer with .to() or the input)"
        )
    return x


def check_coef(fn: str, name: str, value: object) -> float:
    """A loss coefficient: NaN or inf would silently turn the auxiliary loss into NaN."""
    value = check_number(fn, name, value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {value}")
    return value


def check_bool(fn: str, name: str, value: object) -> bool:
    """A flag: a str such as "no" or "False" is truthy and would silently switch the feature on."""
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(value).__name__}")
    return value
