"""Feed-forward experts with weights stored as 3-D tensors ``[E, ...]``, run as a grouped matmul
over expert-contiguous row segments (the layout the dispatch plan produces) by the fused
``expert_ffn`` op."""
import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from . import _checks, ops

Activation = Literal["swiglu", "gelu"]


class GroupedExperts(nn.Module):
    """``E`` independent FFN experts.

    SwiGLU (default): ``y = (silu(x W_gate) * (x W_up)) W_down``; GELU: ``y = gelu(x W_in) W_down``.
    Weights: ``w_in`` ``[E, d_model, 2 * d_hidden]`` (SwiGLU: gate columns first, then up) or
    ``[E, d_model, d_hidden]`` (GELU), and ``w_out`` ``[E, d_hidden, d_model]``.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_hidden: int,
        activation: Activation = "swiglu",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        fn = "GroupedExperts"
        _checks.check_activation(fn, activation)
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_hidden", d_hidden)):
            _checks.check_int(fn, name, value)
        _checks.check_module_dtype(fn, dtype)
        self.num_experts = num_experts
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.activation = activation
        width = 2 * d_hidden if activation == "swiglu" else d_hidden
        factory = {"device": device, "dtype": dtype}
        self.w_in = nn.Parameter(torch.empty(num_experts, d_model, width, **factory))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_hidden, d_model, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The scale of nn.Linear's default init, per expert.
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.d_hidden), 1 / math.sqrt(self.d_hidden))

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            gate, up = h.split(self.d_hidden, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h)

    def forward(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Runs expert ``e`` on rows ``offsets[e]:offsets[e + 1]`` of ``xs``.

        Args:
            xs: ``[P, d_model]`` rows in expert-contiguous order.
            offsets: ``[E + 1]`` int64 segment bounds; rows from ``offsets[E]`` on are padding and
                come out as zeros.

        Returns:
            ``[P, d_model]``.
        """
        return ops.expert_ffn(xs, self.w_in, self.w_out, offsets, self.activation)

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: ``[T, d_model] -> [E, T, d_model]`` (for references and tests)."""
        h = torch.einsum("td,edh->eth", x, self.w_in)
        return torch.einsum("eth,ehd->etd", self._activate(h), self.w_out)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation!r}"
        )
