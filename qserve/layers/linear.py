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
from qserve.kernels.cpu_ops import linear_packed

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

        self._packed: torch.Tensor | None = None  # oneDNN-blocked copy of weight (CPU bf16), see prepack_cpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            return linear_packed(x, self._packed, self.bias, self.out_features)
        return F.linear(x, self.weight, self.bias)

    def prepack_cpu(self) -> None:
        """Reorder the weight once into oneDNN's blocked layout (bit-identical results for bf16).

        Without it oneDNN reorders the weight on every call: 1.2-2x slower at decode batch sizes on CPU.
        The dense weight is released; only forward can use the layer afterwards.
        """
        self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data, 64)
        self.weight.data = torch.empty(0, dtype=self.weight.dtype)

    def load(self, shards: list[dict[str, torch.Tensor]]) -> None:
        weight = torch.cat([s["weight"] for s in shards], dim=0) if len(shards) > 1 else shards[0]["weight"]
        if weight.shape != self.weight.shape:
            raise QServeError(f"weight shape {tuple(weight.shape)} does not match {tuple(self.weight.shape)}")
        self.weight.data.copy_(weight)
        if self.bias is not None:
            if any("bias" not in s for s in shards):
                raise QServeError("checkpoint lacks a bias the config asks for")
            self.bias.data.copy_(torch.cat([s["bias"] for s in shards], dim=0))


def prepack_cpu_linears(model: nn.Module) -> int:
    """Prepack every bf16 float `Linear` of a CPU model whose weight no other module shares, and the bf16
    experts of every MoE layer.

    Returns how many were packed (linears and experts). A no-op where oneDNN (mkldnn) is unavailable.
    """
    if not torch.backends.mkldnn.is_available():
        return 0
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    n = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        shared = w is not None and counts.get(id(w), 0) > 1  # e.g. lm_head tied to the embedding
        if isinstance(m, Linear) and not shared and w is not None and w.dtype == torch.bfloat16 and w.is_cpu:
            m.prepack_cpu()
            n += 1
        elif hasattr(m, "prepack_cpu_experts"):  # qserve.layers.moe.FusedMoE: every bf16 expert, packed
            n += int(m.prepack_cpu_experts())  # type: ignore[operator]
    return n


def make_linear(
    in_features: int,
    out_features: int,
    bias: bool,
    quant: QuantSpec | None,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    """A float Linear, a Bnb4bitLinear (bitsandbytes nf4 / fp4), or a QuantLinear when the checkpoint is quantized."""
    if quant is None:
        return Linear(in_features, out_features, bias, dtype, device)
    if quant.weights in ("nf4", "fp4"):
        from qserve.layers.bnb_linear import Bnb4bitLinear

        return Bnb4bitLinear(in_features, out_features, bias, quant, dtype, device)
    from qserve.layers.quant_linear import QuantLinear

    return QuantLinear(in_features, out_features, bias, quant, dtype, device)
