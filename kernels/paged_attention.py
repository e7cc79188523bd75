"""Triton paged attention: the public ops, their launch configs, and the decode/prefill dispatch.

Same contract as `qserve.kernels.attention.paged_attention_ref` (the reference) and `store_kv`, on device
tensors: caches laid out as in `qserve.kernels.attention` (float, (2, Hkv, num_blocks, block_size, D)) or
`qserve.kernels.kv_quant` (int8/int4 blocks, uint8 (2, Hkv, num_blocks, block_bytes)).

    store_kv_triton(k, v, kv_cache, slot_mapping, layout)                 # quantize + scatter this step's K/V
    out = paged_attention_triton(q, kv_cache, block_tables, seq_lens, query_start_loc, num_decodes, scale, layout)

Both run through ``torch.library`` custom ops with fake implementations, so models calling them stay
``torch.compile``-able (fullgraph): ``torch.ops.qserve.store_kv`` (mutates kv_cache) and
``torch.ops.qserve.paged_attention`` (returns a new tensor). The ops take plain values: the KVLayout and
AttentionConfig unpacked into ints.

Input checks live in `paged_attention_checks`. The kernels live in `paged_attention_store` / `_decode` /
`_prefill` (sharing `_common`'s KV loop) and are imported on first use, so this module (and everything
importing it) loads without triton. Limits: head_dim a power of two in [16, 256]
(>= 32 for int4); q fp16/bf16/fp32; float caches fp16/bf16/fp32; CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1 (tests). Launch parameters are untuned defaults until measured on a GPU
(bench/attention.py sweeps them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from qserve.kernels.attention import KVLayout
from qserve.kernels.paged_attention_checks import (
    check_attention,
    check_out,
    check_runnable,
    check_store,
    interpreting,
)

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
    """Whether the Triton kernels take this layout (else use the torch path): the layout limits of
    `paged_attention_checks`."""
    d = layout.head_dim
    pow2 = 16 <= d <= 256 and not d & (d - 1)
    return pow2 and layout.bits in (0, 4, 8) and (layout.bits != 4 or d >= 32) and layout.block_size >= 1


# ----------------------------------------------------------------------------- custom ops
# Plain-valued signatures (no KVLayout / AttentionConfig): the launch overrides are AttentionConfig's fields,
# None for the defaults. The fakes run the shape/dtype checks, so bad inputs fail while tracing too.


@torch.library.custom_op("qserve::store_kv", mutates_args=("kv_cache",))
def store_kv_op(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    head_dim: int,
    bits: int,
) -> None:
    """Scatter k/v (T, Hkv, D) into kv_cache's slots, quantizing for int8/int4 (`store_kv_triton`)."""
    check_store(k, v, kv_cache, slot_mapping, block_size, head_dim, bits)
    check_runnable(k.device)
    from qserve.kernels.paged_attention_store import launch_store_kv

    launch_store_kv(k, v, kv_cache, slot_mapping, block_size, bits)


@store_kv_op.register_fake
def _(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    head_dim: int,
    bits: int,
) -> None:
    check_store(k, v, kv_cache, slot_mapping, block_size, head_dim, bits)


@torch.library.custom_op("qserve::paged_attention", mutates_args=())
def paged_attention_op(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    num_decodes: int,
    scale: float,
    block_size: int,
    head_dim: int,
    bits: int,
    sliding_window: int | None = None,
    max_seq_len: int | None = None,
    decode_block_n: int | None = None,
    prefill_block_m: int | None = None,
    prefill_block_n: int | None = None,
    partition_size: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """(T, Hq, D) attention output in q's dtype (`paged_attention_triton`)."""
    index = (block_tables, seq_lens, query_start_loc)
    check_attention(q, kv_cache, *index, num_decodes, block_size, head_dim, bits, sliding_window)
    check_runnable(q.device)
    cfg = default_config(head_dim, bits)
    hkv, num_seqs = kv_cache.shape[1], block_tables.shape[0]
    num_warps = num_warps or cfg.num_warps or 4
    num_stages = num_stages or cfg.num_stages or 2
    # under the interpreter (tests) the output starts as NaN, so an element no program writes cannot pass
    out = torch.full_like(q, float("nan")) if interpreting() else torch.empty_like(q)  # (T, Hq, D)
    if num_decodes:  # flash-decoding: context split, then a reduction
        from qserve.kernels.paged_attention_decode import launch_decode

        block_n = decode_block_n or cfg.decode_block_n or 64
        bound = max_seq_len or block_tables.shape[1] * block_size
        size, splits = decode_partition(num_decodes, hkv, bound, block_n, q.device, partition_size)
        launch_decode(
            q[:num_decodes],
            out[:num_decodes],
            kv_cache,
            block_tables,
            seq_lens,
            scale,
            sliding_window,
            block_size,
            bits,
            size,
            splits,
            block_n,
            num_warps,
            num_stages,
        )
    if num_decodes < num_seqs:  # the causal prefill kernel
        from qserve.kernels.paged_attention_prefill import launch_prefill

        launch_prefill(
            q[num_decodes:],
            out[num_decodes:],
            kv_cache,
            block_tables[num_decodes:],
            seq_lens[num_decodes:],
            query_start_loc[num_decodes:],
            scale,
            sliding_window,
            block_size,
            bits,
            prefill_block_m or cfg.prefill_block_m or 64,
            prefill_block_n or cfg.prefill_block_n or 64,
            num_warps,
            num_stages,
        )
    return out


@paged_attention_op.register_fake
def _(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    num_decodes: int,
    scale: float,
    block_size: int,
    head_dim: int,
    bits: int,
    sliding_window: int | None = None,
    max_seq_len: int | None = None,
    decode_block_n: int | None = None,
    prefill_block_m: int | None = None,
    prefill_block_n: int | None = None,
    partition_size: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    index = (block_tables, seq_lens, query_start_loc)
    check_attention(q, kv_cache, *index, num_decodes, block_size, head_dim, bits, sliding_window)
    return torch.empty_like(q)


# ----------------------------------------------------------------------------- public API


def store_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: KVLayout,
) -> None:
    """Write keys/values (T, Hkv, D) into their slots, quantizing for int8/int4; `attention.store_kv` on GPU.

    slot_mapping: (T,) int64 (or int32), slot = block * block_size + offset; negative slots are skipped.
    int8/int4 blocks are bit-identical to `kv_quant.store_kv_quant`'s. Runs ``torch.ops.qserve.store_kv``.
    """
    torch.ops.qserve.store_kv(k, v, kv_cache, slot_mapping, layout.block_size, layout.head_dim, layout.bits)


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
        out: optional (T, Hq, D) destination in q's dtype (last dim contiguous), filled with a copy of
            the op's result; allocated if None.

    Returns:
        (T, Hq, D) in q's dtype. Decodes run flash-decoding (context split, then a reduction); the rest
        run the causal prefill kernel, which reads the cache only (call `store_kv_triton` first).
        Runs ``torch.ops.qserve.paged_attention``.
    """
    c = config or AttentionConfig()
    if out is not None:
        check_out(out, q)
    result: torch.Tensor = torch.ops.qserve.paged_attention(
        q,
        kv_cache,
        block_tables,
        seq_lens_tensor,
        query_start_loc_tensor,
        num_decodes,
        scale,
        layout.block_size,
        layout.head_dim,
        layout.bits,
        sliding_window,
        max_seq_len,
        c.decode_block_n,
        c.prefill_block_m,
        c.prefill_block_n,
        c.partition_size,
        c.num_warps,
        c.num_stages,
    )
    if out is None:
        return result
    return out.copy_(result)
