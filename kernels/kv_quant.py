"""Quantized KV cache (int8 / int4): the block format, quantize-on-write and dequantize-on-read in pure torch.

Asymmetric, per token and per KV head: ``x ~= q * scale + zero`` with ``q`` in [0, 2**bits - 1] and
``scale``, ``zero`` (the row minimum) stored as fp16 **inside the same block** as the values, so a block id
alone locates everything (prefix sharing and moving copy one block).

Per layer the cache is a uint8 tensor (2, Hkv, num_blocks, block_bytes); one (K|V, head, block) row holds::

    [ values: block_size x head_dim*bits/8 bytes | scales: block_size x fp16 | zeros: block_size x fp16 ]

int4 packs two values per byte along head_dim: element 2j in the low nibble, 2j+1 in the high nibble.
These functions are the reference for the Triton kernels and the CPU path.
"""

from __future__ import annotations

import torch

KV_QUANT_BITS: dict[str, int] = {"int8": 8, "int4": 4}


def packed_dim(head_dim: int, bits: int) -> int:
    """Bytes of values per token per head."""
    return head_dim * bits // 8


def block_bytes(block_size: int, head_dim: int, bits: int) -> int:
    """Bytes of one (K|V, head, block) row: values, then fp16 scales, then fp16 zeros."""
    return block_size * (packed_dim(head_dim, bits) + 4)


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (..., D) float -> values uint8 (..., D*bits/8), scale fp16 (...), zero fp16 (...)."""
    xf = x.float()
    lo, hi = xf.amin(-1), xf.amax(-1)  # (...,)
    qmax = (1 << bits) - 1
    scale = ((hi - lo) / qmax).to(torch.float16)
    zero = lo.to(torch.float16)
    # quantize against the fp16-rounded scale/zero that dequantization will use
    s = scale.float().clamp_min(1e-8)[..., None]
    q = ((xf - zero.float()[..., None]) / s).round_().clamp_(0, qmax).to(torch.uint8)  # (..., D)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)  # (..., D/2)
    return q, scale, zero


def unpack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed values (..., D*bits/8) uint8 -> integer codes (..., D) uint8 (int4: two per byte, low first)."""
    return torch.stack((q & 0xF, q >> 4), dim=-1).flatten(-2) if bits == 4 else q


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of `quantize`: (..., D*bits/8) uint8 + (...) fp16 scale/zero -> (..., D) in ``dtype``."""
    codes = unpack_codes(q, bits).float()
    return (codes * scale.float()[..., None] + zero.float()[..., None]).to(dtype)


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """fp16 (...) -> its little-endian bytes (..., 2) uint8, as ``x.view(torch.uint8)`` but through a
    same-size bitcast and shifts, which inductor fuses (a view to a smaller dtype is an extern copy)."""
    bits = x.view(torch.int16)
    return torch.stack((bits & 0xFF, (bits >> 8) & 0xFF), -1).to(torch.uint8)


def fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """Inverse of `fp16_bytes`: (..., 2) uint8 -> (...) fp16, fused by inductor into its consumer."""
    return (b[..., 0].to(torch.int16) | (b[..., 1].to(torch.int16) << 8)).view(torch.float16)


def _split(cache: torch.Tensor, block_size: int, head_dim: int, bits: int) -> tuple[torch.Tensor, ...]:
    """Views of a (..., block_bytes) cache: values (..., bs, Dq), scales (..., bs), zeros (..., bs)."""
    dq = packed_dim(head_dim, bits)
    vbytes = block_size * dq
    values = cache[..., :vbytes].unflatten(-1, (block_size, dq))
    scales = cache[..., vbytes : vbytes + 2 * block_size].view(torch.float16)
    zeros = cache[..., vbytes + 2 * block_size :].view(torch.float16)
    return values, scales, zeros


def read_rows(rows: torch.Tensor, block_size: int, head_dim: int, bits: int) -> tuple[torch.Tensor, ...]:
    """`_split` for reading inside a compiled graph: values (..., bs, Dq) as a view, scales and zeros (..., bs)
    fp16 from their byte pairs (`fp16_from_bytes`), which inductor fuses into the reader; a dtype view of
    the cache would be materialized."""
    vbytes = block_size * packed_dim(head_dim, bits)
    sz = rows[..., vbytes:].unflatten(-1, (2, block_size, 2))  # (..., scale | zero, bs, byte)
    values = rows[..., :vbytes].unflatten(-1, (block_size, vbytes // block_size))
    return values, fp16_from_bytes(sz[..., 0, :, :]), fp16_from_bytes(sz[..., 1, :, :])


def store_kv_quant(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    bits: int,
) -> None:
    """Quantize new keys/values (T, Hkv, D) and write them, with their scales, into their slots.

    One scatter of whole bytes into the cache viewed as (2, Hkv, num_blocks * block_bytes): each token's
    values, then its scale and zero as fp16 byte pairs. (Written this way, torch.compile updates the cache
    in place; assigning through the dtype views of `_split` makes it copy the whole cache.)
    """
    head_dim = k.shape[-1]
    dq, row = packed_dim(head_dim, bits), kv_cache.shape[-1]
    vbytes = block_size * dq
    q, scale, zero = quantize(torch.stack((k, v)).transpose(1, 2), bits)  # (2, Hkv, T, Dq), (2, Hkv, T) x 2
    scale_zero = fp16_bytes(torch.stack((scale, zero), -1)).flatten(-2)  # (2, Hkv, T, 4): scale, zero bytes
    blk, off = slot_mapping // block_size, slot_mapping % block_size
    base = (blk * row)[:, None]  # (T, 1): byte offset of the token's block row
    pair = torch.arange(2, device=slot_mapping.device)
    where = torch.cat(
        (
            base + off[:, None] * dq + torch.arange(dq, device=slot_mapping.device),  # values
            base + vbytes + 2 * off[:, None] + pair,  # fp16 scale
            base + vbytes + 2 * block_size + 2 * off[:, None] + pair,  # fp16 zero
        ),
        -1,
    )  # (T, Dq + 4) byte offsets
    kv_cache.view(2, kv_cache.shape[1], -1)[:, :, where] = torch.cat((q, scale_zero), -1)


def integer_rows(
    rows: torch.Tensor,
    b: int,
    nblk: int,
    hkv: int,
    block_size: int,
    head_dim: int,
    bits: int,
    dtype: torch.dtype,
    centered: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gathered quantized block rows (2 Hkv B nblk, block_bytes), ordered (K/V head, sequence, block), left
    un-dequantized: the integer codes as ``dtype`` (2, Hkv, B, L, D) (exact: at most 255), and scales and
    zeros as float32 (2, Hkv, B, L), with L = nblk * block_size.

    For attention that folds the per-token affine map into its own small tensors instead of dequantizing
    every element: ``q . (s k + z) = s (q . k) + z sum(q)`` and ``sum_t p_t (s_t v_t + z_t) =
    (p s) @ v + sum_t p_t z_t``.

    ``centered``: codes minus 2**(bits-1) (int8: -128..127, int4: -8..7) with the zeros moved up by
    2**(bits-1) * scale; the same values. Matmuls over the codes then carry no common offset of ~128 per
    element: a bf16 matmul rounds its output relative to the output's size, and ``q . codes`` with unsigned
    codes is mostly that offset times ``sum(q)``, which the zero term then cancels (measured: 2.3-2.6x the
    error of dequantize-then-attend in bf16 without centering, on par with it centered).
    """
    values, scales, zeros = _split(rows, block_size, head_dim, bits)
    shape = (2, hkv, b, nblk * block_size)
    codes = unpack_codes(values, bits)  # (..., bs, D) uint8
    scale_f, zero_f = scales.float().reshape(shape), zeros.float().reshape(shape)
    if centered:
        offset = 1 << (bits - 1)
        # 8 bits: flipping the top bit and reading the byte as int8 is c - 128; 4 bits: 0..15 fits int8
        codes = (codes ^ 0x80).view(torch.int8) if bits == 8 else codes.view(torch.int8) - offset
        zero_f = zero_f + offset * scale_f
    return codes.to(dtype).view(*shape, head_dim), scale_f, zero_f
