"""Input checks of the paged-attention ops, shared by their real and fake implementations.

`check_store` / `check_attention` / `check_out` look at shapes, dtypes, strides and devices only (they also
run on fake tensors while tracing); `check_runnable` (CUDA, or CPU under TRITON_INTERPRET=1) is for the real
kernels only.
`paged_attention.supports` mirrors `_check_cache`'s layout limits.
"""

from __future__ import annotations

import os

import torch

from qserve.kernels.kv_quant import block_bytes

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def check_runnable(device: torch.device) -> None:
    """The kernels run on CUDA, or on CPU tensors in Triton's interpreter (real impls only)."""
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"Triton paged attention needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")


def _check_cache(
    kv_cache: torch.Tensor, block_size: int, head_dim: int, bits: int, device: torch.device
) -> None:
    bs, d = block_size, head_dim
    if bits not in (0, 4, 8):
        raise ValueError(f"KV cache bits must be 0 (float), 8 or 4, got {bits}")
    if d < 16 or d > 256 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two in [16, 256] for the Triton kernels, got {d}")
    if bits == 4 and d < 32:
        raise ValueError(f"int4 KV needs head_dim >= 32 for the Triton kernels, got {d}")
    if bs < 1:
        raise ValueError(f"block_size must be positive, got {bs}")
    if bits == 0:
        if kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or tuple(kv_cache.shape[3:]) != (bs, d):
            raise ValueError(
                f"float KV cache must be (2, Hkv, num_blocks, {bs}, {d}), got {tuple(kv_cache.shape)}"
            )
        if kv_cache.dtype not in FLOAT_DTYPES:
            raise ValueError(f"float KV cache must be fp16/bf16/fp32, got {kv_cache.dtype}")
    else:
        nbytes = block_bytes(bs, d, bits)
        if kv_cache.dtype != torch.uint8 or kv_cache.dim() != 4 or kv_cache.shape[0] != 2:
            raise ValueError(
                f"int{bits} KV cache must be uint8 (2, Hkv, num_blocks, {nbytes}), got "
                f"{kv_cache.dtype} {tuple(kv_cache.shape)}"
            )
        if kv_cache.shape[3] != nbytes or kv_cache.stride(2) % 2:
            raise ValueError(
                f"int{bits} KV cache rows must be {nbytes} bytes (block_size {bs}, head_dim {d}), "
                f"got shape {tuple(kv_cache.shape)}"
            )
    if kv_cache.stride(-1) != 1:
        raise ValueError("KV cache's last dimension must be contiguous")
    if kv_cache.device != device:
        raise ValueError(f"KV cache on {kv_cache.device} but inputs on {device}")


def _check_rows(name: str, x: torch.Tensor, heads: int | None, head_dim: int) -> None:
    if x.dim() != 3 or x.shape[2] != head_dim or (heads is not None and x.shape[1] != heads):
        want = f"(T, {heads if heads is not None else 'H'}, {head_dim})"
        raise ValueError(f"{name} must be {want}, got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be fp16/bf16/fp32, got {x.dtype}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name}'s last dimension must be contiguous")


def _check_index(name: str, x: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if tuple(x.shape) != shape or x.dtype not in (torch.int32, torch.int64) or x.device != device:
        raise ValueError(
            f"{name} must be int32/int64 {shape} on {device}, got {x.dtype} {tuple(x.shape)} on {x.device}"
        )


def check_store(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    head_dim: int,
    bits: int,
) -> None:
    _check_cache(kv_cache, block_size, head_dim, bits, k.device)
    hkv = kv_cache.shape[1]
    _check_rows("k", k, hkv, head_dim)
    _check_rows("v", v, hkv, head_dim)
    if v.shape != k.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    _check_index("slot_mapping", slot_mapping, (k.shape[0],), k.device)


def check_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    num_decodes: int,
    block_size: int,
    head_dim: int,
    bits: int,
    sliding_window: int | None,
) -> None:
    device = q.device
    _check_cache(kv_cache, block_size, head_dim, bits, device)
    hkv = kv_cache.shape[1]
    _check_rows("q", q, None, head_dim)
    if q.shape[1] % hkv:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({hkv})")
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables must be (B, max_blocks), got {tuple(block_tables.shape)}")
    num_seqs = block_tables.shape[0]
    _check_index("block_tables", block_tables, tuple(block_tables.shape), device)
    _check_index("seq_lens_tensor", seq_lens, (num_seqs,), device)
    _check_index("query_start_loc_tensor", query_start_loc, (num_seqs + 1,), device)
    if not 0 <= num_decodes <= min(num_seqs, q.shape[0]):
        raise ValueError(f"num_decodes must be in [0, {min(num_seqs, q.shape[0])}], got {num_decodes}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")


def check_out(out: torch.Tensor, q: torch.Tensor) -> None:
    if out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)} on {q.device}, last dim contiguous")
