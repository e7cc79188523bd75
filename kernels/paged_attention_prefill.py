"""Triton attention for (chunked) prefill over a paged KV cache.

Sequence ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]``, sitting at the last ``query_len``
positions of its ``seq_len`` tokens of context (the cache already holds all ``seq_len``, this step's
included); causal, optionally with a sliding window. Reads the same block formats as decode.

* Grid (query tiles, KV heads). A tile is BLOCK_Q consecutive queries of one sequence times the GROUP query
  heads of one KV head (rows ``token * GROUP_PAD + head``), so K/V are read once per group. Tiles are found
  without host data: sequence ``i``'s tiles start at ``query_start_loc[i] // BLOCK_Q + i`` (relative to the
  first prefill), a monotone map a binary search inverts; the few ids that fall in gaps exit at once.
* Each tile reads keys up to its last query's position only (causal), from the window's start if any.

Imported lazily by `qserve.kernels.paged_attention` (this module needs triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qserve.kernels.paged_attention_common import NEG_BIG, attend_range, load_q, store_rows


@triton.jit
def _find_seq(qsl_ptr, q_base, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest i in [0, num_seqs) whose first tile ``(qsl[i] - q_base) // BLOCK_Q + i`` is <= tile."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = (tl.load(qsl_ptr + mid) - q_base) // BLOCK_Q + mid
        if first <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _prefill_kernel(
    # packed queries and output (T, Hq, D), last dim contiguous
    q_ptr,
    out_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    # paged cache, block tables (B, max_blocks), context lengths (B,), query offsets (B + 1,)
    cache_ptr,
    stride_ckv,
    stride_ch,
    stride_cblk,
    stride_cslot,
    block_tables_ptr,
    stride_bt,
    seq_lens_ptr,
    qsl_ptr,
    num_seqs,
    # attention
    scale_log2e,
    window,
    # meta
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)

    # ---------------------------------------------------------------- which sequence and queries this tile holds
    q_base = tl.load(qsl_ptr)
    seq = _find_seq(qsl_ptr, q_base, tile, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq)
    q_len = (tl.load(qsl_ptr + seq + 1) - q_start).to(tl.int32)
    q_tile = tile - ((q_start - q_base) // BLOCK_Q + seq).to(tl.int32)
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    ctx_len = seq_len - q_len  # tokens before this step's queries

    # ---------------------------------------------------------------- rows: BLOCK_Q tokens x GROUP_PAD heads
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    r = tl.arange(0, BLOCK_M)
    tok = q_tile * BLOCK_Q + r // GROUP_PAD  # query index inside the sequence
    head = kv_head * GROUP + r % GROUP_PAD
    row_mask = (tok < q_len) & (r % GROUP_PAD < GROUP)
    row = (q_start - q_base + tok).to(tl.int64)  # q/out hold the prefill rows only
    row_off = row * stride_qt + head * stride_qh
    q_a, q_b = load_q(q_ptr, row_off, row_mask, HEAD_DIM, BITS)
    q_sum = tl.sum(q_a.to(tl.float32), axis=1)
    if BITS == 4:
        q_sum += tl.sum(q_b.to(tl.float32), axis=1)
    q_pos = ctx_len + tok

    # ---------------------------------------------------------------- keys this tile can see
    first_pos = ctx_len + q_tile * BLOCK_Q
    kv_end = tl.minimum(seq_len, first_pos + BLOCK_Q)
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(first_pos - window + 1, 0)

    # ---------------------------------------------------------------- attend
    DA: tl.constexpr = HEAD_DIM // 2 if BITS == 4 else HEAD_DIM
    k_base = cache_ptr + kv_head.to(tl.int64) * stride_ch
    acc_a, acc_b, m_i, l_i = attend_range(
        q_a,
        q_b,
        q_sum,
        q_pos,
        tl.zeros([BLOCK_M, DA], tl.float32),
        tl.zeros([BLOCK_M, DA], tl.float32),
        tl.zeros([BLOCK_M], tl.float32) + NEG_BIG,
        tl.zeros([BLOCK_M], tl.float32),
        k_base,
        k_base + stride_ckv,
        stride_cblk,
        stride_cslot,
        block_tables_ptr + seq.to(tl.int64) * stride_bt,
        kv_start,
        kv_end,
        scale_log2e,
        window,
        HEAD_DIM,
        BLOCK_SIZE,
        BITS,
        BLOCK_N,
        USE_WINDOW,
        DOT_PRECISION,
    )

    # ---------------------------------------------------------------- normalise and write
    inv_l = 1.0 / tl.where(row_mask, l_i, 1.0)
    out_off = row * stride_ot + head * stride_oh
    store_rows(out_ptr, out_off, row_mask, acc_a * inv_l[:, None], acc_b * inv_l[:, None], HEAD_DIM, BITS)


def launch_prefill(
    q: torch.Tensor,
    out: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    window: int | None,
    block_size: int,
    bits: int,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> None:
    """Launch prefill attention over packed q/out (T, Hq, D) for the sequences of ``seq_lens`` (B,).

    ``query_start_loc`` (B + 1,): row offsets of the sequences' queries; q/out start at row
    ``query_start_loc[0]`` (any constant offset, e.g. the decodes before them); inputs already validated.
    """
    num_seqs = seq_lens.shape[0]
    num_tokens, hq, d = q.shape
    hkv = kv_cache.shape[1]
    group = hq // hkv
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, block_m // group_pad)
    # sequence i's tiles lie in [qsl_i // BLOCK_Q + i, that + cdiv(q_len_i, BLOCK_Q)): ids below this bound
    max_tiles = num_tokens // block_q + num_seqs
    stride_cslot = kv_cache.stride(3) if bits == 0 else 0
    _prefill_kernel[(max_tiles, hkv)](
        q,
        out,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        kv_cache,
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        stride_cslot,
        block_tables,
        block_tables.stride(0),
        seq_lens,
        query_start_loc,
        num_seqs,
        scale * 1.4426950408889634,
        window or 0,
        HEAD_DIM=d,
        BLOCK_SIZE=block_size,
        BITS=bits,
        GROUP=group,
        GROUP_PAD=group_pad,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        USE_WINDOW=window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
