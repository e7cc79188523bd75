"""Triton store kernel: write new keys/values into their paged-cache slots, quantizing for int8/int4.

``cache[K|V, h, slot // block_size, slot % block_size] = x[t, h]`` for each token ``t`` and KV head ``h``, with
``slot = slot_mapping[t]`` (negative slots are skipped). Float caches get a cast; int8/int4 caches get
the block format of `qserve.kernels.kv_quant` (values, then fp16 scales, then fp16 zeros per row), computed
bit-exactly like `kv_quant.quantize`: fp32 min/max, ``scale = fp16((hi - lo) / qmax)`` with an IEEE
division, ``zero = fp16(lo)``, ``q = clamp(round_half_even((x - zero) / max(scale, 1e-8)), 0, qmax)``.

Imported lazily by `qserve.kernels.paged_attention` (this module needs triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Adding then subtracting 1.5 * 2**23 rounds an fp32 |y| < 2**22 to the nearest integer, ties to even: the
# sum lands in [2**23, 2**24) where the fp32 spacing is 1, so the addition itself does the rounding
# (torch.round's rule). libdevice.rint would too, but the interpreter has no libdevice. Larger |y| only
# occur for constant rows (scale clamped to 1e-8) and stay far outside [0, qmax], so the clamp agrees.
_ROUND_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _scale_zero(lo, hi, QMAX: tl.constexpr):
    """Row min/max (BLOCK_T,) fp32 -> scale, zero (BLOCK_T,) fp16, exactly as `kv_quant.quantize`."""
    scale = tl.math.div_rn(hi - lo, QMAX).to(tl.float16)
    zero = lo.to(tl.float16)
    return scale, zero


@triton.jit
def _codes(x, scale, zero, QMAX: tl.constexpr):
    """x (BLOCK_T, N) fp32 -> uint8 codes in [0, QMAX] against the fp16 scale/zero of each row."""
    s = tl.maximum(scale.to(tl.float32), 1e-8)
    y = tl.math.div_rn(x - zero.to(tl.float32)[:, None], s[:, None])
    y = (y + _ROUND_MAGIC) - _ROUND_MAGIC
    return tl.minimum(tl.maximum(y, 0.0), QMAX).to(tl.uint8)


@triton.jit
def _store_kv_kernel(
    # new keys / values (T, Hkv, D), last dim contiguous
    k_ptr,
    v_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    # destination slots (T,) int64
    slot_ptr,
    num_tokens,
    # cache: float (2, Hkv, num_blocks, BLOCK_SIZE, D) or uint8 (2, Hkv, num_blocks, row_bytes)
    cache_ptr,
    stride_ckv,
    stride_ch,
    stride_cblk,
    stride_cslot,
    # meta
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    PACKED_DIM: tl.constexpr = HEAD_DIM * BITS // 8  # bytes of values per token (quantized caches)
    QMAX: tl.constexpr = (1 << BITS) - 1
    pid_t = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)

    # ---------------------------------------------------------------- locate the slots of this token tile
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.load(slot_ptr + offs_t, mask=offs_t < num_tokens, other=-1).to(tl.int64)
    valid = slots >= 0
    blk = tl.where(valid, slots // BLOCK_SIZE, 0)
    off = tl.where(valid, slots % BLOCK_SIZE, 0)

    for kv in tl.static_range(2):
        if kv == 0:
            src = k_ptr + offs_t.to(tl.int64) * stride_kt + head * stride_kh
        else:
            src = v_ptr + offs_t.to(tl.int64) * stride_vt + head * stride_vh
        row = cache_ptr + kv * stride_ckv + head * stride_ch + blk * stride_cblk  # (BLOCK_T,) block rows

        if BITS == 0:
            # ------------------------------------------------------------ float cache: cast and scatter
            offs_d = tl.arange(0, HEAD_DIM)
            x = tl.load(src[:, None] + offs_d[None, :], mask=valid[:, None])
            dst = row[:, None] + off[:, None] * stride_cslot + offs_d[None, :]
            tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=valid[:, None])
        else:
            # ------------------------------------------------------------ int8 / int4: quantize, pack
            offs_p = tl.arange(0, PACKED_DIM)
            if BITS == 8:
                x = tl.load(src[:, None] + offs_p[None, :], mask=valid[:, None]).to(tl.float32)
                scale, zero = _scale_zero(tl.min(x, axis=1), tl.max(x, axis=1), QMAX)
                packed = _codes(x, scale, zero, QMAX)
            else:
                # element 2j goes to the low nibble of byte j, 2j+1 to the high nibble
                x_lo = tl.load(src[:, None] + 2 * offs_p[None, :], mask=valid[:, None]).to(tl.float32)
                x_hi = tl.load(src[:, None] + 2 * offs_p[None, :] + 1, mask=valid[:, None]).to(tl.float32)
                lo = tl.minimum(tl.min(x_lo, axis=1), tl.min(x_hi, axis=1))
                hi = tl.maximum(tl.max(x_lo, axis=1), tl.max(x_hi, axis=1))
                scale, zero = _scale_zero(lo, hi, QMAX)
                packed = _codes(x_lo, scale, zero, QMAX) | (_codes(x_hi, scale, zero, QMAX) << 4)
            dst = row[:, None] + off[:, None] * PACKED_DIM + offs_p[None, :]
            tl.store(dst, packed, mask=valid[:, None])
            # scales then zeros follow the block's values: BLOCK_SIZE fp16 each
            scale_ptr = (row + BLOCK_SIZE * PACKED_DIM).to(tl.pointer_type(tl.float16)) + off
            tl.store(scale_ptr, scale, mask=valid)
            tl.store(scale_ptr + BLOCK_SIZE, zero, mask=valid)


def launch_store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    bits: int,
    block_t: int = 16,
) -> None:
    """Launch `_store_kv_kernel`; arguments already validated by `paged_attention.store_kv_triton`."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    stride_cslot = kv_cache.stride(3) if bits == 0 else 0
    grid = (triton.cdiv(num_tokens, block_t), num_kv_heads)
    _store_kv_kernel[grid](
        k,
        v,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        slot_mapping,
        num_tokens,
        kv_cache,
        kv_cache.stride(0),
        kv_cache.stride(1),
        kv_cache.stride(2),
        stride_cslot,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BITS=bits,
        BLOCK_T=block_t,
    )
