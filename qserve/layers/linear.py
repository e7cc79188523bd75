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
from qserve.kernels import cpu_native
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

        self._packed: torch.Tensor | None = None  # CPU bf16: the weight in a kernel's layout, see prepack_cpu
        self._native = False  # _packed is qserve's panel layout (cpu_native) rather than oneDNN's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native:
            return cpu_native.linear_bf16(x, self._packed, self.bias, self.out_features)  # type: ignore[arg-type]
        if self._packed is not None:
            return linear_packed(x, self._packed, self.bias, self.out_features)
        return F.linear(x, self.weight, self.bias)

    def native_ok(self) -> bool:
        """Whether `prepack_cpu` would use qserve's native kernel (it needs an even in_features)."""
        return self.in_features % 2 == 0 and cpu_native.available()

    def prepack_cpu(self) -> None:
        """Reorder the weight once into a CPU kernel's layout and release the dense one (only forward can use
        the layer afterwards).

        qserve's native bf16 kernel where it runs (`cpu_native`: AVX512-BF16, 1.8-3.8x oneDNN at batch 1, level
        at large batches; same fp32 accumulation, so it agrees with F.linear to bf16 rounding); otherwise
        oneDNN's blocked layout (bit-identical to F.linear; without it oneDNN reorders the weight on every
        call, 1.2-2x slower at decode batch sizes).
        """
        if self.native_ok():
            self._packed, self._native = cpu_native.pack_bf16(self.weight.data), True
        else:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data, 64)
        self.weight.data = torch.empty(0, dtype=self.weight.dtype)

    def load(self, shards: list[dict[str, torch.Tensor]]) -> None:
        weight = torch.cat([s["weight"] for s in shards], dim=0) if len(shards) > 1 else shards[0]["weight"]
        extra = sorted({k for s in shards for k in s} - {"weight", "bias"})
        if extra or not weight.is_floating_point():  # bitsandbytes int8 + SCB, say: codes are not floats
            raise QServeError(f"a float layer got {weight.dtype} weights with {extra or 'no scales'}")
        if weight.shape != self.weight.shape:
            raise QServeError(f"weight shape {tuple(weight.shape)} does not match {tuple(self.weight.shape)}")
        self.weight.data.copy_(weight)
        if self.bias is not None:
            if any("bias" not in s for s in shards):
                raise QServeError("checkpoint lacks a bias the config asks for")
            self.bias.data.copy_(torch.cat([s["bias"] for s in shards], dim=0))


class PanelEmbedding(nn.Module):
    """An embedding that reads its rows from a tied lm_head's packed panels (`cpu_native.pack_bf16`), so tying
    the two keeps one copy of the table: row n is ``panels[n // 16, :, n % 16, :]``."""

    def __init__(self, panels: torch.Tensor, num_embeddings: int):
        super().__init__()
        self.panels, self.num_embeddings = panels, num_embeddings
        self.embedding_dim = panels.shape[1] * 2

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # (T,) -> (T, K/2, 2): the two advanced indices pick the panel and the lane, the slices keep K
        rows = self.panels[ids // 16, :, ids % 16, :]
        return rows.reshape(*ids.shape, self.embedding_dim)


def prepack_cpu_linears(model: nn.Module) -> int:
    """Prepack every bf16 float `Linear` of a CPU model whose weight no other module shares, a bf16 lm_head
    tied to the embedding where the native kernel runs (the embedding then reads the packed table:
    `PanelEmbedding`), and the bf16 experts of every MoE layer.

    Returns how many were packed (linears and experts). A no-op where oneDNN (mkldnn) is unavailable.
    """
    if not torch.backends.mkldnn.is_available():
        return 0
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    n = 0
    for m in list(model.modules()):
        w = getattr(m, "weight", None)
        uses = counts.get(id(w), 0)  # 2: e.g. an lm_head tied to the embedding
        bf16_cpu = w is not None and w.dtype == torch.bfloat16 and w.is_cpu
        if isinstance(m, Linear) and bf16_cpu and uses == 1:
            m.prepack_cpu()
            n += 1
        elif isinstance(m, Linear) and bf16_cpu and uses == 2:
            n += _pack_tied(model, m)
        elif hasattr(m, "prepack_cpu_experts"):  # qserve.layers.moe.FusedMoE: every bf16 expert, packed
            n += int(m.prepack_cpu_experts())  # type: ignore[operator]
    return n


def _pack_tied(model: nn.Module, head: Linear) -> int:
    """Pack a tied lm_head and point its embedding at the panels (1), or leave both dense (0)."""
    weight = head.weight
    owners = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Embedding) and child.weight is weight
    ]
    if len(owners) != 1 or not head.native_ok():  # oneDNN's layout cannot serve the embedding's rows
        return 0
    head.prepack_cpu()
    parent, name = owners[0]
    setattr(parent, name, PanelEmbedding(head._packed, head.out_features))  # type: ignore[arg-type]
    return 1


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
    if quant.source == "bnb" and torch.device(device).type == "cpu":  # LLM.int8 by bitsandbytes (exact)
        from qserve.layers.bnb_linear import Bnb8bitLinear

        return Bnb8bitLinear(in_features, out_features, bias, quant, dtype, device)
    from qserve.layers.quant_linear import QuantLinear

    return QuantLinear(in_features, out_features, bias, quant, dtype, device)
