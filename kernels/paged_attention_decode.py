"""Triton paged decode attention (flash-decoding).

``out[b, h] = softmax(q[b, h] . K_b^T * scale) V_b`` over the ``seq_lens[b]`` tokens of sequence ``b``, one
query per sequence, K/V read from a paged cache (float, or int8/int4 blocks of `qserve.kernels.kv_quant`).

* GQA: one program owns every query head of a KV head (rows of a (BLOCK_M, D) tile, padded to >= 16 for
  tl.dot), so each K/V byte is read once per KV head, not once per query head.
* Split-K over the context: program (b, kv_head, split) covers ``[split * P, (split + 1) * P)`` and writes its
  unnormalised output, running max and sum; `_reduce_kernel` merges the splits. With a single split the
  first kernel writes the normalised output itself and no reduction runs.
* The key loop (`paged_attention_common.attend_range`, shared with prefill) reads quantized blocks
  without dequantizing K, accumulates in fp32, and runs the online softmax in base 2.

Imported lazily by `qserve.kernels.paged_attention` (this module needs triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qserve.kernels.paged_attention_common import NEG_BIG, attend_range, load_q, store_rows


@triton.jit
def _decode_kernel(
    # queries and output (B, Hq, D), last dim contiguous
    q_ptr,
    out_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    # split partials: acc (B, Hq, S, D) fp32 and (max, sum) (B, Hq, S, 2) fp32; unused without SPLIT
    part_acc_ptr,
    part_ml_ptr,
    stride_pa_t,
    stride_pa_h,
    stride_pa_s,
    stride_pm_t,
    stride_pm_h,
    stride_pm_s,
    # paged cache, block tables (B, max_blocks), context lengths (B,)
    cache_ptr,
    stride_ckv,
    stride_ch,
    stride_cblk,
    stride_cslot,
    block_tables_ptr,
    stride_bt,
    seq_lens_ptr,
    # attention
    scale_log2e,
    window,
    partition_size,
    # meta
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    # ---------------------------------------------------------------- this split's key range
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    kv_start = split * partition_size
    if kv_start >= seq_len:
        return
    kv_end = tl.minimum(kv_start + partition_size, seq_len)
    if USE_WINDOW:
        kv_start = tl.maximum(
            kv_start, seq_len - window
        )  # may empty the range: the split then writes m, l = -big, 0

    # ---------------------------------------------------------------- the GROUP query heads of this KV head
    r = tl.arange(0, BLOCK_M)
    row_mask = r < GROUP
    head = kv_head * GROUP + r
    q_a, q_b = load_q(q_ptr + seq.to(tl.int64) * stride_qt, head * stride_qh, row_mask, HEAD_DIM, BITS)
    q_sum = tl.sum(q_a.to(tl.float32), axis=1)
    if BITS == 4:
        q_sum += tl.sum(q_b.to(tl.float32), axis=1)
    q_pos = tl.zeros([BLOCK_M], tl.int32) + (seq_len - 1)

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

    # ---------------------------------------------------------------- write the output or this split's partials
    if SPLIT:
        pa_off = seq.to(tl.int64) * stride_pa_t + head * stride_pa_h + split * stride_pa_s
        store_rows(part_acc_ptr, pa_off, row_mask, acc_a, acc_b, HEAD_DIM, BITS)
        pm = part_ml_ptr + seq.to(tl.int64) * stride_pm_t + head * stride_pm_h + split * stride_pm_s
        tl.store(pm, m_i, mask=row_mask)
        tl.store(pm + 1, l_i, mask=row_mask)
    else:
        inv_l = 1.0 / l_i
        out_off = seq.to(tl.int64) * stride_ot + head * stride_oh
        store_rows(out_ptr, out_off, row_mask, acc_a * inv_l[:, None], acc_b * inv_l[:, None], HEAD_DIM, BITS)


@triton.jit
def _reduce_kernel(
    # split partials, as written by `_decode_kernel`
    part_acc_ptr,
    part_ml_ptr,
    stride_pa_t,
    stride_pa_h,
    stride_pa_s,
    stride_pm_t,
    stride_pm_h,
    stride_pm_s,
    # output (B, Hq, D)
    out_ptr,
    stride_ot,
    stride_oh,
    seq_lens_ptr,
    partition_size,
    HEAD_DIM: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    num_splits = tl.cdiv(seq_len, partition_size)
    offs = tl.arange(0, HEAD_DIM)
    out = out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs
    if seq_len == 0:  # a padding sequence of a padded (CUDA graph) batch: zeros, not unwritten partials
        tl.store(out, tl.zeros([HEAD_DIM], tl.float32).to(out_ptr.dtype.element_ty))
        return
    pa = part_acc_ptr + seq.to(tl.int64) * stride_pa_t + head * stride_pa_h + offs
    pm = part_ml_ptr + seq.to(tl.int64) * stride_pm_t + head * stride_pm_h

    # ---------------------------------------------------------------- merge splits with their running maxima
    m = tl.load(pm)
    l_sum = tl.load(pm + 1)
    acc = tl.load(pa)
    for split in tl.range(1, num_splits):
        m_s = tl.load(pm + split * stride_pm_s)
        l_s = tl.load(pm + split * stride_pm_s + 1)
        acc_s = tl.load(pa + split * stride_pa_s)
        m_new = tl.maximum(m, m_s)
        alpha = tl.math.exp2(m - m_new)
        beta = tl.math.exp2(m_s - m_new)
        acc = acc * alpha + acc_s * beta
        l_sum = l_sum * alpha + l_s * beta
        m = m_new

    tl.store(out, (acc / l_sum).to(out_ptr.dtype.element_ty))


def launch_decode(
    q: torch.Tensor,
    out: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int | None,
    block_size: int,
    bits: int,
    partition_size: int,
    num_splits: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
) -> None:
    """Launch decode attention for q/out (B, Hq, D); inputs already validated by `paged_attention`."""
    b, hq, d = q.shape
    hkv = kv_cache.shape[1]
    group = hq // hkv
    split = num_splits > 1
    if split:
        part_acc = torch.empty(b, hq, num_splits, d, device=q.device, dtype=torch.float32)
        part_ml = torch.empty(b, hq, num_splits, 2, device=q.device, dtype=torch.float32)
    else:
        part_acc = part_ml = out  # never touched
    stride_cslot = kv_cache.stride(3) if bits == 0 else 0
    _decode_kernel[(b, hkv, num_splits)](
        q,
        out,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        part_acc,
        part_ml,
        *(part_acc.stride()[:3] if split else (0, 0, 0)),
        *(part_ml.stride()[:3] if split else (0, 0, 0)),
        kv_cache,
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        stride_cslot,
        block_tables,
        block_tables.stride(0),
        seq_lens,
        scale * 1.4426950408889634,
        window or 0,
        partition_size,
        HEAD_DIM=d,
        BLOCK_SIZE=block_size,
        BITS=bits,
        GROUP=group,
        BLOCK_M=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        SPLIT=split,
        USE_WINDOW=window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if split:
        _reduce_kernel[(b, hq)](
            part_acc,
            part_ml,
            *part_acc.stride()[:3],
            *part_ml.stride()[:3],
            out,
            out.stride(0),
            out.stride(1),
            seq_lens,
            partition_size,
            HEAD_DIM=d,
        )
