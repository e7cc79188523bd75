"""Linear layers. Float weights here; quantized ones come from `qserve.layers.quant_linear`.

Every linear layer loads through ``load(shards)``: a list of checkpoint tensor dicts, one per
sub-projection in output order (q, k, v for a fused qkv_proj), each mapping a tensor-name suffix
("weight", "bias", "qweight", ...) to its tensor. Fused layers concatenate along the output dimension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from qserve.errors import QServeError

if TYPE_CHECKING:
    from qserve.kernels.packing import QuantSpec


class Linear(nn.Module):
    """y = x W^T + b with W (out_features, in_features) in the model dtype."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device), False)
        self.bias = (
            nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load(self, shards: list[dict[str, torch.Tensor]]) -> None:
        weight = torch.cat([s["weight"] for s in shards], dim=0) if len(shards) > 1 else shards[0]["weight"]
        if weight.shape != self.weight.shape:
            raise QServeError(f"weight shape {tuple(weight.shape)} does not match {tuple(self.weight.shape)}")
        self.weight.data.copy_(weight)
        if self.bias is not None:
            if any("bias" not in s for s in shards):
                raise QServeError("checkpoint lacks a bias the config asks for")
            self.bias.data.copy_(torch.cat([s["bias"] for s in shards], dim=0))


def make_linear(
    in_features: int,
    out_features: int,
    bias: bool,
    quant: QuantSpec | None,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """A float Linear, or a QuantLinear when the checkpoint is quantized."""
    if quant is None:
        return Linear(in_features, out_features, bias, dtype, device)
    from qserve.layers.quant_linear import QuantLinear

    return QuantLinear(in_features, out_features, bias, quant, dtype, device)
