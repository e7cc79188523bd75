"""Device functions shared by the paged decode and prefill kernels: q/out row tiles and the KV loop.

* Quantized blocks are never dequantized into a K tile: ``q . k = scale * (q . codes) + zero * sum(q)``,
  so scores need one dot on the raw codes and a per-token FMA. V tiles are dequantized (``codes * scale +
  zero``) to the query dtype before ``p @ V``. int4 keeps nibbles apart: even and odd columns of q/out are
  separate (BLOCK_M, D/2) halves (``_a``/``_b``), each multiplied with one nibble plane.
* fp32 accumulation, online softmax in base 2 (``scale * log2(e)`` folded into the scores).

Imported by `paged_attention_decode` / `_prefill` (this module needs triton).
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_BIG = tl.constexpr(-1.0e30)  # finite "minus infinity" for running maxima: exp2(NEG_BIG - m) == 0, no NaN


@triton.jit
def load_q(ptr, row_off, row_mask, HEAD_DIM: tl.constexpr, BITS: tl.constexpr):
    """Rows of q (BLOCK_M, D) at ``ptr + row_off``; int4: (even columns, odd columns), else (q, q)."""
    if BITS == 4:
        offs = tl.arange(0, HEAD_DIM // 2)
        q_a = tl.load(ptr + row_off[:, None] + 2 * offs[None, :], mask=row_mask[:, None], other=0.0)
        q_b = tl.load(ptr + row_off[:, None] + 2 * offs[None, :] + 1, mask=row_mask[:, None], other=0.0)
    else:
        offs = tl.arange(0, HEAD_DIM)
        q_a = tl.load(ptr + row_off[:, None] + offs[None, :], mask=row_mask[:, None], other=0.0)
        q_b = q_a
    return q_a, q_b


@triton.jit
def store_rows(ptr, row_off, row_mask, x_a, x_b, HEAD_DIM: tl.constexpr, BITS: tl.constexpr):
    """Inverse of `load_q`: write (BLOCK_M, D) rows, casting to ``ptr``'s element type."""
    if BITS == 4:
        offs = tl.arange(0, HEAD_DIM // 2)
        dst = ptr + row_off[:, None] + 2 * offs[None, :]
        tl.store(dst, x_a.to(ptr.dtype.element_ty), mask=row_mask[:, None])
        tl.store(dst + 1, x_b.to(ptr.dtype.element_ty), mask=row_mask[:, None])
    else:
        offs = tl.arange(0, HEAD_DIM)
        tl.store(ptr + row_off[:, None] + offs[None, :], x_a.to(ptr.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def _load_kv_tile(
    base,  # cache pointer at this (K|V, kv head) plane
    blk,  # (BLOCK_N,) physical block of each token
    slot,  # (BLOCK_N,) position of each token inside its block
    mask,  # (BLOCK_N,) token in range
    stride_cblk,
    stride_cslot,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One tile of tokens: float (x, x, -, -) or quantized (codes_a, codes_b, scale fp32, zero fp32)."""
    row = base + blk.to(tl.int64) * stride_cblk  # (BLOCK_N,) pointers to block rows
    if BITS == 0:
        offs = tl.arange(0, HEAD_DIM)
        x_a = tl.load(
            row[:, None] + slot[:, None] * stride_cslot + offs[None, :], mask=mask[:, None], other=0.0
        )
        x_b = x_a
        scale = tl.zeros([BLOCK_N], tl.float32)
        zero = scale
    else:
        PACKED_DIM: tl.constexpr = HEAD_DIM * BITS // 8
        offs = tl.arange(0, PACKED_DIM)
        codes = tl.load(
            row[:, None] + slot[:, None] * PACKED_DIM + offs[None, :], mask=mask[:, None], other=0
        )
        if BITS == 4:
            x_a = codes & 0xF
            x_b = codes >> 4
        else:
            x_a = codes
            x_b = codes
        scale_ptr = (row + BLOCK_SIZE * PACKED_DIM).to(tl.pointer_type(tl.float16)) + slot
        scale = tl.load(scale_ptr, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(scale_ptr + BLOCK_SIZE, mask=mask, other=0.0).to(tl.float32)
    return x_a, x_b, scale, zero


@triton.jit
def attend_range(
    # this program's query rows (BLOCK_M, DA) x2, sum over D of q (quantized K), absolute position of each row
    q_a,
    q_b,
    q_sum,
    q_pos,
    # running state: accumulators (BLOCK_M, DA) x2 fp32, max and sum (BLOCK_M,) fp32
    acc_a,
    acc_b,
    m_i,
    l_i,
    # paged cache at this KV head (K and V planes) and this sequence's block-table row
    k_base,
    v_base,
    stride_cblk,
    stride_cslot,
    bt_row_ptr,
    # keys [kv_start, kv_end), further masked per row by causality (and the window)
    kv_start,
    kv_end,
    scale_log2e,
    window,
    # meta
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The online-softmax loop over a key range; shared by the decode and the prefill kernels."""
    dt = q_a.dtype
    for start in tl.range(kv_start, kv_end, BLOCK_N):
        # ------------------------------------------------------------ locate this tile's tokens
        k_pos = start + tl.arange(0, BLOCK_N)
        k_in = k_pos < kv_end
        blk = tl.load(bt_row_ptr + k_pos // BLOCK_SIZE, mask=k_in, other=0)
        slot = k_pos % BLOCK_SIZE

        # ------------------------------------------------------------ scores = q K^T (raw codes if quantized)
        k_a, k_b, k_scale, k_zero = _load_kv_tile(
            k_base, blk, slot, k_in, stride_cblk, stride_cslot, HEAD_DIM, BLOCK_SIZE, BITS, BLOCK_N
        )
        s = tl.dot(q_a, tl.trans(k_a.to(dt)), input_precision=DOT_PRECISION)
        if BITS == 4:
            s = tl.dot(q_b, tl.trans(k_b.to(dt)), s, input_precision=DOT_PRECISION)
        if BITS != 0:
            s = s * k_scale[None, :] + q_sum[:, None] * k_zero[None, :]
        s = s * scale_log2e
        visible = k_in[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))

        # ------------------------------------------------------------ online softmax
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
        p = p.to(dt)

        # ------------------------------------------------------------ acc += p V (V dequantized to q's dtype)
        v_a, v_b, v_scale, v_zero = _load_kv_tile(
            v_base, blk, slot, k_in, stride_cblk, stride_cslot, HEAD_DIM, BLOCK_SIZE, BITS, BLOCK_N
        )
        if BITS != 0:
            v_a = v_a.to(tl.float32) * v_scale[:, None] + v_zero[:, None]
        acc_a = tl.dot(p, v_a.to(dt), acc_a * alpha[:, None], input_precision=DOT_PRECISION)
        if BITS == 4:
            v_b = v_b.to(tl.float32) * v_scale[:, None] + v_zero[:, None]
            acc_b = tl.dot(p, v_b.to(dt), acc_b * alpha[:, None], input_precision=DOT_PRECISION)
    return acc_a, acc_b, m_i, l_i
