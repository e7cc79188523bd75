"""Triton paged attention: the public ops, their checks, launch configs, and the decode/prefill dispatch.

Same contract as `qserve.kernels.attention.paged_attention_ref` (the reference) and `store_kv`, on device
tensors: caches laid out as in `qserve.kernels.attention` (float, (2, Hkv, num_blocks, block_size, D)) or
`qserve.kernels.kv_quant` (int8/int4 blocks, uint8 (2, Hkv, num_blocks, block_bytes)).

    store_kv_triton(k, v, kv_cache, slot_mapping, layout)                 # quantize + scatter this step's K/V
    out = paged_attention_triton(q, kv_cache, block_tables, seq_lens, query_start_loc, num_decodes, scale, layout)

The kernels live in `paged_attention_store` / `_decode` / `_prefill` and are imported on first use, so this
module (and everything importing it) loads without triton. Limits: head_dim a power of two in [16, 256]
(>= 32 for int4); q fp16/bf16/fp32; float caches fp16/bf16/fp32; CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1 (tests). Launch parameters are untuned defaults until measured on a GPU
(bench/attention.py sweeps them).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from qserve.kernels.attention import KVLayout
from qserve.kernels.kv_quant import block_bytes

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_PARTITION = 256  # decode never splits a context into pieces shorter than this (auto mode)


@dataclass(frozen=True)
class AttentionConfig:
    """Launch parameters; None fields take the defaults of `default_config`."""

    decode_block_n: int | None = None  # keys per inner-loop tile, decode
    prefill_block_m: int | None = None  # query rows (tokens x heads of a group) per prefill program
    prefill_block_n: int | None = None  # keys per inner-loop tile, prefill
    partition_size: int | None = None  # decode split length in tokens; None: enough splits to fill the GPU
    num_warps: int | None = None
    num_stages: int | None = None


def default_config(head_dim: int, bits: int) -> AttentionConfig:
    """Untuned defaults: 64-key tiles, 64-row prefill tiles, 4 warps, 2 stages; at head_dim 256 32-key tiles
    and 8 warps (sm_90 builds of the int8/int4 prefill spill registers with 4)."""
    if head_dim > 128:
        return AttentionConfig(32, 64, 32, None, 8, 2)
    return AttentionConfig(64, 64, 64, None, 4, 2)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def decode_partition(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, block_n: int, device: torch.device, size: int | None
) -> tuple[int, int]:
    """(partition_size, num_splits) for decode: split only while (seqs x KV heads) programs underfill the GPU."""
    if size is None:
        want = -(-2 * _num_sms(device) // (num_seqs * num_kv_heads))
        splits = max(1, min(want, -(-max_seq_len // MIN_PARTITION)))
        size = -(-max_seq_len // splits)
    size = -(-size // block_n) * block_n  # whole tiles
    return size, max(1, -(-max_seq_len // size))


def supports(layout: KVLayout) -> bool:
    """Whether the Triton kernels take this layout (else use the torch path): `_check_cache`'s limits."""
    d = layout.head_dim
    pow2 = 16 <= d <= 256 and not d & (d - 1)
    return pow2 and layout.bits in (0, 4, 8) and (layout.bits != 4 or d >= 32) and layout.block_size >= 1


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


def _check_cache(kv_cache: torch.Tensor, layout: KVLayout, device: torch.device) -> None:
    bits, d, bs = layout.bits, layout.head_dim, layout.block_size
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
    if device.type != "cuda" and not _interpreting():
        raise ValueError(f"Triton paged attention needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")


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


def store_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: KVLayout,
) -> None:
    """Write keys/values (T, Hkv, D) into their slots, quantizing for int8/int4; `attention.store_kv` on GPU.

    slot_mapping: (T,) int64 (or int32), slot = block * block_size + offset; negative slots are skipped.
    int8/int4 blocks are bit-identical to `kv_quant.store_kv_quant`'s.
    """
    _check_cache(kv_cache, layout, k.device)
    hkv = kv_cache.shape[1]
    _check_rows("k", k, hkv, layout.head_dim)
    _check_rows("v", v, hkv, layout.head_dim)
    if v.shape != k.shape:
        raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    _check_index("slot_mapping", slot_mapping, (k.shape[0],), k.device)
    from qserve.kernels.paged_attention_store import launch_store_kv

    launch_store_kv(k, v, kv_cache, slot_mapping, layout.block_size, layout.bits)


def paged_attention_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens_tensor: torch.Tensor,
    query_start_loc_tensor: torch.Tensor,
    num_decodes: int,
    scale: float,
    layout: KVLayout,
    sliding_window: int | None = None,
    *,
    max_seq_len: int | None = None,
    config: AttentionConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`paged_attention_ref` on the GPU: out[i] = softmax(q_i K_i^T * scale + causal mask) V_i per sequence.

    Args:
        q: (T, Hq, D) packed queries, fp16/bf16/fp32, RoPE applied; Hq a multiple of Hkv.
        kv_cache: one layer's cache (float or int8/int4 blocks, per ``layout``).
        block_tables: (B, max_blocks) int32 physical block ids, rows padded with any valid id.
        seq_lens_tensor: (B,) int context length of each sequence, this step's tokens included.
        query_start_loc_tensor: (B + 1,) int row offsets of each sequence's queries in q.
        num_decodes: the first num_decodes sequences have exactly one query (query_start_loc[i] == i).
        scale: softmax scale (usually head_dim ** -0.5).
        layout: block size, head dim and bits of the cache.
        sliding_window: keys at positions > query position - window only; None for full attention.
        max_seq_len: host upper bound on the decodes' seq_lens (sizes the context split); default
            max_blocks * block_size. Must not be below any decode's seq_len.
        config: launch overrides (tests, tuning).
        out: optional (T, Hq, D) destination in q's dtype (last dim contiguous); allocated if None.

    Returns:
        (T, Hq, D) in q's dtype. Decodes run flash-decoding (context split, then a reduction); the rest
        run the causal prefill kernel, which reads the cache only (call `store_kv_triton` first).
    """
    device = q.device
    _check_cache(kv_cache, layout, device)
    hkv = kv_cache.shape[1]
    _check_rows("q", q, None, layout.head_dim)
    if q.shape[1] % hkv:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of KV heads ({hkv})")
    if block_tables.dim() != 2:
        raise ValueError(f"block_tables must be (B, max_blocks), got {tuple(block_tables.shape)}")
    num_seqs = block_tables.shape[0]
    _check_index("block_tables", block_tables, tuple(block_tables.shape), device)
    _check_index("seq_lens_tensor", seq_lens_tensor, (num_seqs,), device)
    _check_index("query_start_loc_tensor", query_start_loc_tensor, (num_seqs + 1,), device)
    if not 0 <= num_decodes <= min(num_seqs, q.shape[0]):
        raise ValueError(f"num_decodes must be in [0, {min(num_seqs, q.shape[0])}], got {num_decodes}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")

    cfg = default_config(layout.head_dim, layout.bits)
    over = config or AttentionConfig()
    num_warps = over.num_warps or cfg.num_warps or 4
    num_stages = over.num_stages or cfg.num_stages or 2
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != device or out.stride(-1) != 1:
        raise ValueError(f"out must be {q.dtype} {tuple(q.shape)} on {device}, last dim contiguous")
    if num_decodes:
        from qserve.kernels.paged_attention_decode import launch_decode

        block_n = over.decode_block_n or cfg.decode_block_n or 64
        bound = max_seq_len or block_tables.shape[1] * layout.block_size
        size, splits = decode_partition(num_decodes, hkv, bound, block_n, device, over.partition_size)
        launch_decode(
            q[:num_decodes],
            out[:num_decodes],
            kv_cache,
            block_tables,
            seq_lens_tensor,
            scale,
            sliding_window,
            layout.block_size,
            layout.bits,
            size,
            splits,
            block_n,
            num_warps,
            num_stages,
        )
    if num_decodes < num_seqs:
        from qserve.kernels.paged_attention_prefill import launch_prefill

        launch_prefill(
            q[num_decodes:],
            out[num_decodes:],
            kv_cache,
            block_tables[num_decodes:],
            seq_lens_tensor[num_decodes:],
            query_start_loc_tensor[num_decodes:],
            scale,
            sliding_window,
            layout.block_size,
            layout.bits,
            over.prefill_block_m or cfg.prefill_block_m or 64,
            over.prefill_block_n or cfg.prefill_block_n or 64,
            num_warps,
            num_stages,
        )
    return out
