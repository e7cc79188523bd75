"""Paged attention over a floating-point KV cache: the pure-torch reference and the CPU path.

Cache layout, one tensor per layer: ``kv_cache`` of shape (2, num_kv_heads, num_blocks, block_size, head_dim),
index 0 holding keys and 1 values. Token ``t`` of a sequence lives in slot
``block_table[t // block_size] * block_size + t % block_size`` of every head. Heads lead so that gathering
a sequence's blocks yields (Hkv, L, D) views that matmul reads without another copy.

Queries arrive packed (no padding): sequence ``i`` owns rows ``query_start_loc[i]:query_start_loc[i+1]`` of
``q`` and its queries sit at the last ``query_len`` positions of its ``seq_len`` tokens of context. So one call
covers decode (query_len 1), prefill (query_len == seq_len) and chunked prefill (anything in between).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qserve.kernels.kv_quant import integer_rows, store_kv_quant


@dataclass(frozen=True)
class KVLayout:
    """How a layer's cache tensor is laid out: float (bits 0) or int8/int4 blocks (qserve.kernels.kv_quant)."""

    block_size: int
    head_dim: int
    bits: int = 0


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: KVLayout | None = None,
) -> None:
    """Scatter new keys/values (T, Hkv, D) into their slots (quantizing for int8/int4). slot_mapping: (T,) int64."""
    if layout is not None and layout.bits:
        store_kv_quant(k, v, kv_cache, slot_mapping, layout.block_size, layout.bits)
        return
    bs = kv_cache.shape[3]
    # one scatter for K and V; under torch.compile it updates the cache in place (index_copy_ on a view
    # of it makes inductor copy the whole cache)
    kv_cache[:, :, slot_mapping // bs, slot_mapping % bs] = (
        torch.stack((k, v)).transpose(1, 2).to(kv_cache.dtype)
    )  # (2, Hkv, T, D)


def block_rows(kv_cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """Row ids of the blocks in ``block_tables`` (B, nblk), for every K/V head, in the cache viewed as
    (2 Hkv num_blocks, block_row): (2 Hkv B nblk,) int64, ordered (K/V head, sequence, block).

    One flat gather over the outermost dimension copies whole contiguous rows (2-2.5x faster on CPU than
    index_select along the block dimension of a (2 Hkv, num_blocks, row) view)."""
    heads, nb = kv_cache.shape[0] * kv_cache.shape[1], kv_cache.shape[2]
    offsets = torch.arange(heads, device=block_tables.device)[:, None] * nb  # (2 Hkv, 1)
    return (offsets + block_tables.reshape(1, -1).long()).reshape(-1)


def gather_rows(kv_cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The cache's block rows ``rows`` (from `block_rows`): (len(rows), block_row), one copy."""
    return kv_cache.reshape(kv_cache.shape[0] * kv_cache.shape[1] * kv_cache.shape[2], -1).index_select(
        0, rows
    )


def gather_kv(
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_len: int,
    layout: KVLayout | None = None,
    dtype: torch.dtype | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keys and values of sequences sharing a block-table width: (2, Hkv, B, seq_len, D).

    block_tables: (B, nblk) with nblk * block_size >= seq_len; positions past a sequence's own length
    hold stale data and must be masked by the caller. Quantized caches come back dequantized to ``dtype``.
    ``rows``: `block_rows(kv_cache, block_tables)` when the caller already has it.
    """
    b, nblk = block_tables.shape
    hkv = kv_cache.shape[1]
    if rows is None:
        rows = block_rows(kv_cache, block_tables)
    picked = gather_rows(kv_cache, rows)  # (2 Hkv B nblk, block_row)
    if layout is not None and layout.bits:
        assert dtype is not None
        codes, scales, zeros = integer_rows(
            picked, b, nblk, hkv, layout.block_size, layout.head_dim, layout.bits, torch.float32
        )  # `kv_quant.dequantize`'s float32 arithmetic, on (2, Hkv, B, L, D)
        kv = (codes * scales[..., None] + zeros[..., None]).to(dtype)
    else:
        kv = picked.view(2, hkv, b, nblk * kv_cache.shape[3], kv_cache.shape[4])
    return kv[:, :, :, :seq_len]


def _causal_mask(q_len: int, seq_len: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    # Query row r sits at absolute position seq_len - q_len + r and may see keys at positions <= its own
    # (and, with a sliding window, > position - window).
    qpos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]  # (q_len, 1)
    kpos = torch.arange(seq_len, device=device)[None, :]  # (1, seq_len)
    mask = kpos <= qpos
    if sliding_window is not None:
        mask &= kpos > qpos - sliding_window
    return mask  # (q_len, seq_len) bool, True = attend


def _blocks_for(block_table: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    return block_table[: (seq_len + block_size - 1) // block_size][None]  # (1, nblk)


def paged_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    scale: float,
    layout: KVLayout,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Reference: out[i] = softmax(q_i K_i^T * scale + causal mask) V_i, per sequence, in float32.

    q: (T, Hq, D); block_tables: (B, max_blocks) int; seq_lens, query_start_loc: host lists of B and B+1 ints.
    Returns (T, Hq, D) in q's dtype.
    """
    out = torch.empty_like(q)
    hq, bs = q.shape[1], layout.block_size
    for i, seq_len in enumerate(seq_lens):
        s, e = query_start_loc[i], query_start_loc[i + 1]
        table = _blocks_for(block_tables[i], seq_len, bs)
        kv = gather_kv(kv_cache, table, seq_len, layout, torch.float32)[:, :, 0].float()  # (2, Hkv, L, D)
        group = hq // kv.shape[1]
        k = kv[0].repeat_interleave(group, dim=0)  # (Hq, L, D)
        v = kv[1].repeat_interleave(group, dim=0)  # (Hq, L, D)
        qi = q[s:e].float().transpose(0, 1)  # (Hq, q_len, D)
        scores = (qi @ k.transpose(1, 2)) * scale  # (Hq, q_len, L)
        mask = _causal_mask(e - s, seq_len, sliding_window, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        out[s:e] = (scores.softmax(-1) @ v).transpose(0, 1).to(q.dtype)
    return out


@dataclass(frozen=True)
class DecodePlan:
    """What CPU decode attention needs about a step's decode sequences, the same in every layer: built once
    per step (`decode_plan`) and reused by each layer through the metadata's plan cache."""

    nblk: int  # blocks of the longest sequence: everyone is gathered to this width
    rows: torch.Tensor  # (2 Hkv B nblk,) int64: `block_rows` of the decode block tables
    bias: torch.Tensor  # (B, 1, nblk * block_size) float32: 0 where a key is attended, -inf elsewhere


def decode_plan(
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    block_size: int,
    sliding_window: int | None = None,
) -> DecodePlan:
    nblk = (max(seq_lens) + block_size - 1) // block_size
    max_len = (
        nblk * block_size
    )  # whole blocks: the gathered K/V stay contiguous, so matmul reads them in place
    lens = torch.tensor(seq_lens, device=kv_cache.device)[:, None]  # (B, 1)
    kpos = torch.arange(max_len, device=kv_cache.device)[None, :]  # (1, L)
    masked = kpos >= lens
    if sliding_window is not None:
        masked |= kpos < lens - sliding_window
    bias = torch.zeros(masked.shape, device=kv_cache.device).masked_fill_(masked, float("-inf"))
    rows = block_rows(kv_cache, block_tables[:, :nblk])
    return DecodePlan(nblk, rows, bias[:, None, :])


def decode_attention_cpu(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    scale: float,
    layout: KVLayout,
    sliding_window: int | None = None,
    plan: DecodePlan | None = None,
) -> torch.Tensor:
    """One query per sequence, all sequences in one batched matmul pair. q: (B, Hq, D) -> (B, Hq, D).

    The query heads of a KV group ride along the query axis, so GQA needs no K/V repeat. ``plan``: this
    step's `decode_plan` when the caller shares one between layers.
    """
    b, hq, d = q.shape
    hkv, bs = kv_cache.shape[1], layout.block_size
    group = hq // hkv
    if plan is None:
        plan = decode_plan(kv_cache, block_tables, seq_lens, bs, sliding_window)
    qh = q.view(b, hkv, group, d).transpose(0, 1)  # (Hkv, B, G, D)
    if layout.bits:
        return _decode_quantized(qh, kv_cache, plan, scale, layout).transpose(0, 1).reshape(b, hq, d)
    kv = gather_kv(kv_cache, block_tables[:, : plan.nblk], plan.nblk * bs, layout, q.dtype, rows=plan.rows)
    kv = kv.to(q.dtype)  # (2, Hkv, B, L, D); a no-op unless the cache stores another float dtype
    scores = torch.matmul(qh, kv[0].transpose(-1, -2)).float()  # (Hkv, B, G, L)
    scores.mul_(scale).add_(plan.bias)  # bias (B, 1, L) masks keys past each length
    probs = scores.softmax(-1).to(q.dtype)
    out = torch.matmul(probs, kv[1])  # (Hkv, B, G, D)
    return out.transpose(0, 1).reshape(b, hq, d)


def _decode_quantized(
    qh: torch.Tensor, kv_cache: torch.Tensor, plan: DecodePlan, scale: float, layout: KVLayout
) -> torch.Tensor:
    """Decode attention straight from int8/int4 codes: the per-token scale and zero are applied to the
    scores and probabilities, (Hkv, B, G, L), rather than to every element of K and V, (Hkv, B, L, D).
    qh: (Hkv, B, G, D) -> (Hkv, B, G, D)."""
    hkv, b = qh.shape[0], qh.shape[1]
    codes, scales, zeros = integer_rows(
        gather_rows(kv_cache, plan.rows),
        b,
        plan.nblk,
        hkv,
        layout.block_size,
        layout.head_dim,
        layout.bits,
        qh.dtype,
        centered=True,  # bf16 matmul outputs round relative to their size: keep q . codes small
    )  # (2, Hkv, B, L, D), (2, Hkv, B, L) x 2
    raw = torch.matmul(qh, codes[0].transpose(-1, -2)).float()  # (Hkv, B, G, L): q . k_codes
    qsum = qh.float().sum(-1, keepdim=True)  # (Hkv, B, G, 1)
    scores = raw * scales[0][:, :, None, :] + qsum * zeros[0][:, :, None, :]  # q . (s k + z)
    scores.mul_(scale).add_(plan.bias)
    probs = scores.softmax(-1)  # (Hkv, B, G, L) float32
    weighted = (probs * scales[1][:, :, None, :]).to(qh.dtype)  # p_t s_t
    out = torch.matmul(weighted, codes[1]).float()  # (Hkv, B, G, D)
    out += (probs * zeros[1][:, :, None, :]).sum(-1, keepdim=True)  # + sum_t p_t z_t
    return out.to(qh.dtype)


def paged_attention_cpu(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    num_decodes: int,
    scale: float,
    layout: KVLayout,
    sliding_window: int | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    plans: dict[tuple[int, ...], DecodePlan] | None = None,
) -> torch.Tensor:
    """The same contract as `paged_attention_ref`, organised for speed on CPU.

    The first ``num_decodes`` sequences have query_len 1 and run batched (`decode_attention_cpu`). The rest
    run one SDPA each; a prefill with no earlier context reads the fresh ``new_kv`` (T, Hkv, D) instead of
    gathering from the cache, when the cache stores exactly those values (same dtype: not for int8/int4 or a
    cast, where reading back is what makes a prefix computed now equal to one reused later). ``plans``: a
    dict that lives for one step, in which the first layer leaves its `DecodePlan` for the others.
    """
    hq, bs = q.shape[1], layout.block_size
    group = hq // kv_cache.shape[1]
    out = torch.empty_like(q)
    if num_decodes:
        tables, lens = block_tables[:num_decodes], seq_lens[:num_decodes]
        plan = None
        if plans is not None:  # layers of one step share block tables: one plan per cache shape and window
            key = (*kv_cache.shape, sliding_window or 0)
            plan = plans.get(key)
            if plan is None:
                plan = plans[key] = decode_plan(kv_cache, tables, lens, bs, sliding_window)
        out[:num_decodes] = decode_attention_cpu(
            q[:num_decodes], kv_cache, tables, lens, scale, layout, sliding_window, plan
        )
    for i in range(num_decodes, len(seq_lens)):
        s, e = query_start_loc[i], query_start_loc[i + 1]
        q_len, seq_len = e - s, seq_lens[i]
        if new_kv is not None and q_len == seq_len and kv_cache.dtype == q.dtype:
            k, v = new_kv[0][s:e].transpose(0, 1), new_kv[1][s:e].transpose(0, 1)  # (Hkv, L, D), all fresh
        else:
            table = _blocks_for(block_tables[i], seq_len, bs)
            kv = gather_kv(kv_cache, table, seq_len, layout, q.dtype)[:, :, 0]
            k, v = kv[0], kv[1]  # (Hkv, L, D)
        # 4-D inputs with K/V repeated to every query head take torch's flash kernel on CPU (enable_gqa and
        # 3-D inputs fall back to the math path: 1.5-3x slower at prompt lengths 144-1024)
        qi = q[s:e].transpose(0, 1)[None]  # (1, Hq, q_len, D)
        k, v = k.to(q.dtype), v.to(q.dtype)
        if group > 1:
            k, v = k.repeat_interleave(group, dim=0), v.repeat_interleave(group, dim=0)  # (Hq, L, D)
        if q_len == seq_len and sliding_window is None:
            o = F.scaled_dot_product_attention(qi, k[None], v[None], is_causal=True, scale=scale)
        else:
            mask = _causal_mask(q_len, seq_len, sliding_window, q.device)
            o = F.scaled_dot_product_attention(qi, k[None], v[None], attn_mask=mask, scale=scale)
        out[s:e] = o[0].transpose(0, 1)
    return out
