"""Decode attention in plain torch ops, for inductor to fuse into the compiled decode step (CPU).

The custom op (`qserve.kernels.cpu_ops.paged_attention_cpu_op`) serves every step shape, but it is opaque to
inductor and costs ~200 us of Python per layer (host lists, the plan, the glue), which at batch 1 is most of
a token. A decode-only step has a fixed shape: B sequences, one query each, every block table cut to the same
width. Written as tensor ops over those shapes, the KV write, the block gather (an indirect load, never a
copy), the dequantization of int8/int4 codes, the masked softmax and both reductions compile into a few
fused C++ loops with no Python per layer.

Same contract as `paged_attention_ref` for a batch of decodes, with the batch padded: padding token rows have
slot -1 and padding sequences length 0 (their output is 0).
"""

from __future__ import annotations

import torch

from qserve.kernels.attention import KVLayout, store_kv
from qserve.kernels.kv_quant import read_rows, unpack_codes


def store_kv_graph(
    k: torch.Tensor,  # (T, Hkv, D)
    v: torch.Tensor,  # (T, Hkv, D)
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # (T,) int64, -1 on padding rows
    layout: KVLayout,
) -> None:
    """`store_kv` with padding rows at a fixed shape: a padding row repeats row 0's slot and values, so the
    scatter writes nothing new (duplicate writes of one value are deterministic) and no shape depends on
    how many rows are real. Row 0 is real in every step that has one."""
    valid = slot_mapping >= 0  # (T,)
    slots = torch.where(valid, slot_mapping, slot_mapping[:1])
    k = torch.where(valid[:, None, None], k, k[:1])
    v = torch.where(valid[:, None, None], v, v[:1])
    store_kv(k, v, kv_cache, slots, layout)


def _gathered_kv(kv_cache: torch.Tensor, tables: torch.Tensor, layout: KVLayout) -> torch.Tensor:
    """K and V of the blocks in ``tables`` (B, nblk) as float32 (2, Hkv, B, nblk * block_size, D)."""
    b, nblk = tables.shape
    hkv, bs, d = kv_cache.shape[1], layout.block_size, layout.head_dim
    if not layout.bits:
        return kv_cache[:, :, tables].float().reshape(2, hkv, b, nblk * bs, d)
    # Gather the step's block rows as bytes first, then split them for reading (`read_rows`). Splitting the
    # whole cache through its fp16 dtype views made inductor materialize them for every block after the KV
    # store: a copy of the whole cache per layer, 4x the step time at batch 1.
    rows = kv_cache[:, :, tables]  # (2, Hkv, B, nblk, block_bytes) uint8
    values, scales, zeros = read_rows(rows, bs, d, layout.bits)  # (..., bs, Dq), (..., bs) fp16 x 2
    codes = unpack_codes(values, layout.bits).float()  # (2, Hkv, B, nblk, bs, D)
    s, z = scales.float(), zeros.float()  # (2, Hkv, B, nblk, bs)
    # `kv_quant.dequantize`'s float32 arithmetic, so the values equal what the other paths attend to
    return (codes * s[..., None] + z[..., None]).reshape(2, hkv, b, nblk * bs, d)


def decode_attention_graph(
    q: torch.Tensor,  # (B, Hq, D), RoPE applied
    kv_cache: torch.Tensor,  # one layer's cache, this step's K/V already stored
    block_tables: torch.Tensor,  # (B, nblk) int32, cut to the widest real sequence's blocks
    seq_lens: torch.Tensor,  # (B,) int32, 0 for padding sequences
    scale: float,
    layout: KVLayout,
    sliding_window: int = 0,  # 0: none
) -> torch.Tensor:
    """softmax(q K^T * scale, keys past each length masked) V per sequence, in float32: (B, Hq, D)."""
    b, hq, d = q.shape
    hkv = kv_cache.shape[1]
    kv = _gathered_kv(kv_cache, block_tables.long(), layout)  # (2, Hkv, B, L, D)
    length = kv.shape[3]
    qh = q.float().view(b, hkv, hq // hkv, d).transpose(0, 1)  # (Hkv, B, G, D): GQA needs no K/V repeat
    # elementwise product + sum rather than a bmm: inductor fuses it with the gather into one reduction
    scores = (qh[:, :, :, None, :] * kv[0][:, :, None, :, :]).sum(-1) * scale  # (Hkv, B, G, L)
    lens = seq_lens.long()[:, None]  # (B, 1)
    kpos = torch.arange(length, device=q.device)[None, :]  # (1, L)
    # a padding sequence (length 0) attends to key 0 so its softmax stays finite; its output is zeroed
    masked = kpos >= lens.clamp_min(1)  # (B, L)
    if sliding_window:
        masked |= kpos <= lens - 1 - sliding_window
    scores = scores.masked_fill(masked[None, :, None, :], float("-inf"))
    probs = scores.softmax(-1)  # (Hkv, B, G, L)
    out = (probs[..., None] * kv[1][:, :, None, :, :]).sum(-2)  # (Hkv, B, G, D)
    out = out * (lens > 0)[None, :, :, None]
    return out.transpose(0, 1).reshape(b, hq, d).to(q.dtype)


def decode_table_width(max_seq_len: int, block_size: int, max_blocks: int) -> int:
    """Blocks every table of a decode step is cut to: enough for the longest sequence, at least 2 (torch
    specializes size-1 dimensions, which would compile a second graph at serving time), at most the table."""
    return min(max(-(-max_seq_len // block_size), 2), max_blocks)
