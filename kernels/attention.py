"""Paged attention over a floating-point KV cache: the pure-torch reference and the CPU path.

Cache layout, one tensor per layer: ``kv_cache`` of shape (2, num_blocks, block_size, num_kv_heads, head_dim),
index 0 holding keys and 1 values. Token ``t`` of a sequence lives in slot
``block_table[t // block_size] * block_size + t % block_size``.

Queries arrive packed (no padding): sequence ``i`` owns rows ``query_start_loc[i]:query_start_loc[i+1]`` of
``q`` and its queries sit at the last ``query_len`` positions of its ``seq_len`` tokens of context. So one call
covers decode (query_len 1), prefill (query_len == seq_len) and chunked prefill (anything in between).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter new keys/values (T, Hkv, D) into their slots. slot_mapping: (T,) int64."""
    _, nb, bs, hkv, d = kv_cache.shape
    flat = kv_cache.view(2, nb * bs, hkv, d)  # (2, slots, Hkv, D)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def gather_kv(
    kv_cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous (seq_len, Hkv, D) keys and values of one sequence."""
    _, _, bs, hkv, d = kv_cache.shape
    nblk = (seq_len + bs - 1) // bs
    kv = kv_cache[:, block_table[:nblk].long()]  # (2, nblk, bs, Hkv, D)
    kv = kv.reshape(2, nblk * bs, hkv, d)[:, :seq_len]
    return kv[0], kv[1]


def _causal_mask(q_len: int, seq_len: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    # Query row r sits at absolute position seq_len - q_len + r and may see keys at positions <= its own
    # (and, with a sliding window, > position - window).
    qpos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]  # (q_len, 1)
    kpos = torch.arange(seq_len, device=device)[None, :]  # (1, seq_len)
    mask = kpos <= qpos
    if sliding_window is not None:
        mask &= kpos > qpos - sliding_window
    return mask  # (q_len, seq_len) bool, True = attend


def paged_attention_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Reference: out[i] = softmax(q_i K_i^T * scale + causal mask) V_i, per sequence, in float32.

    q: (T, Hq, D); block_tables: (B, max_blocks) int; seq_lens, query_start_loc: host lists of B and B+1 ints.
    Returns (T, Hq, D) in q's dtype.
    """
    out = torch.empty_like(q)
    hq = q.shape[1]
    for i, seq_len in enumerate(seq_lens):
        s, e = query_start_loc[i], query_start_loc[i + 1]
        k, v = gather_kv(kv_cache, block_tables[i], seq_len)  # (L, Hkv, D)
        group = hq // k.shape[1]
        k = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, L, D)
        v = v.float().repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, L, D)
        qi = q[s:e].float().transpose(0, 1)  # (Hq, q_len, D)
        scores = (qi @ k.transpose(1, 2)) * scale  # (Hq, q_len, L)
        mask = _causal_mask(e - s, seq_len, sliding_window, q.device)
        scores = scores.masked_fill(~mask, float("-inf"))
        out[s:e] = (scores.softmax(-1) @ v).transpose(0, 1).to(q.dtype)
    return out


def paged_attention_cpu(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: list[int],
    query_start_loc: list[int],
    num_decodes: int,
    scale: float,
    sliding_window: int | None = None,
    new_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The same contract as `paged_attention_ref`, organised for speed on CPU.

    The first ``num_decodes`` sequences have query_len 1 and run as one padded SDPA call, with the query
    heads of a KV group stacked along the query axis (no K/V repeat for GQA). The rest run one SDPA each;
    a prefill with no earlier context reads the fresh ``new_kv`` (T, Hkv, D) instead of gathering.
    """
    t, hq, d = q.shape
    hkv = kv_cache.shape[3]
    group = hq // hkv
    out = torch.empty_like(q)
    if num_decodes:
        lens = torch.tensor(seq_lens[:num_decodes], device=q.device)
        max_len = int(max(seq_lens[:num_decodes]))
        bs = kv_cache.shape[2]
        nblk = (max_len + bs - 1) // bs
        kv = kv_cache[:, block_tables[:num_decodes, :nblk].long()]  # (2, B, nblk, bs, Hkv, D)
        kv = kv.reshape(2, num_decodes, nblk * bs, hkv, d)[:, :, :max_len].transpose(
            2, 3
        )  # (2, B, Hkv, L, D)
        kpos = torch.arange(max_len, device=q.device)[None, :]
        mask = kpos < lens[:, None]  # (B, L)
        if sliding_window is not None:
            mask &= kpos >= (lens[:, None] - sliding_window)
        qd = q[:num_decodes].view(num_decodes, hkv, group, d)  # (B, Hkv, G, D): heads of a group as queries
        o = F.scaled_dot_product_attention(qd, kv[0], kv[1], attn_mask=mask[:, None, None, :], scale=scale)
        out[:num_decodes] = o.reshape(num_decodes, hq, d)
    for i in range(num_decodes, len(seq_lens)):
        s, e = query_start_loc[i], query_start_loc[i + 1]
        q_len, seq_len = e - s, seq_lens[i]
        if new_kv is not None and q_len == seq_len:
            k, v = new_kv[0][s:e], new_kv[1][s:e]  # whole context is in this batch
        else:
            k, v = gather_kv(kv_cache, block_tables[i], seq_len)
        qi = q[s:e].transpose(0, 1)  # (Hq, q_len, D)
        ki, vi = k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype)  # (Hkv, L, D)
        if q_len == seq_len and sliding_window is None:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=group > 1)
        else:
            mask = _causal_mask(q_len, seq_len, sliding_window, q.device)
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=group > 1)
        out[s:e] = o.transpose(0, 1)
    return out
