"""KV cache storage: its byte size per token and block (one formula for planner and engine), and allocation.

Every KV dtype sits behind `KVCacheSpec`: the engine asks it how many blocks a byte budget buys and for
the per-layer tensors; attention kernels read the layout documented in qserve.kernels.attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qserve.config import KV_CACHE_DTYPES
from qserve.errors import QServeError
from qserve.kernels.kv_quant import KV_QUANT_BITS, block_bytes

# float KV dtype name -> the torch dtype it is stored in
FLOAT_KV_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}
_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def resolve_kv_dtype(kv_cache_dtype: str, model_dtype: str) -> str:
    """'auto' -> the model's own dtype; otherwise a validated KV dtype name."""
    name = kv_cache_dtype.lower()
    if name == "auto":
        name = model_dtype
    name = _ALIASES.get(name, name)
    if name not in FLOAT_KV_DTYPES and name not in KV_QUANT_BITS:
        raise QServeError(
            f"unsupported kv cache dtype {kv_cache_dtype!r}; choose from {', '.join(KV_CACHE_DTYPES)}"
        )
    return name


@dataclass(frozen=True)
class KVCacheSpec:
    """Shape of the whole KV cache for one model: the single source of the byte formulas."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: str  # "fp16" | "bf16" | "fp32" | "int8" | "int4"

    @property
    def quant_bits(self) -> int:
        """0 for floating-point KV, else the bits per stored value."""
        return KV_QUANT_BITS.get(self.dtype, 0)

    @property
    def torch_dtype(self) -> torch.dtype:
        """Element type of the allocated tensors (uint8 bytes for quantized KV)."""
        return FLOAT_KV_DTYPES[self.dtype] if not self.quant_bits else torch.uint8

    @property
    def _row_bytes(self) -> int:
        """Bytes of one (K|V, head, block) row, including int8/int4 scales and zero points."""
        if self.quant_bits:
            return block_bytes(self.block_size, self.head_dim, self.quant_bits)
        return self.block_size * self.head_dim * FLOAT_KV_DTYPES[self.dtype].itemsize

    @property
    def bytes_per_block(self) -> int:
        """K and V, every layer, every KV head, for block_size tokens."""
        return 2 * self.num_layers * self.num_kv_heads * self._row_bytes

    @property
    def bytes_per_token(self) -> int:
        """2 * layers * Hkv * (D * elem bytes); for int8/int4, D * bits / 8 + 4 bytes of fp16 scale and zero."""
        return self.bytes_per_block // self.block_size

    def num_blocks(self, budget_bytes: int) -> int:
        """Whole blocks that fit in ``budget_bytes``."""
        return budget_bytes // self.bytes_per_block

    def allocate(self, num_blocks: int, device: torch.device) -> list[torch.Tensor]:
        """One tensor per layer: float (2, Hkv, num_blocks, block_size, D) (layout: qserve.kernels.attention),
        or uint8 (2, Hkv, num_blocks, row_bytes) for int8/int4 (layout: qserve.kernels.kv_quant)."""
        if self.quant_bits:
            shape: tuple[int, ...] = (2, self.num_kv_heads, num_blocks, self._row_bytes)
        else:
            shape = (2, self.num_kv_heads, num_blocks, self.block_size, self.head_dim)
        return [torch.zeros(shape, dtype=self.torch_dtype, device=device) for _ in range(self.num_layers)]
