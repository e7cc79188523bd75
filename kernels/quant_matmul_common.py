"""Triton kernels both weight formats share: the split-K reduction and the dequantize kernel.

``_splitk_reduce_kernel`` sums the (SPLIT_K, M, N) float32 partials of the GEMV / GEMM kernels in slice order
(deterministic, no atomics) and casts; ``_dequant_kernel`` writes the (N, K) float weight for the dequant
path (M >= DEQUANT_MIN_M, float32 activations). Launched by :mod:`qserve.kernels.quant_matmul_launch`;
needs triton (launch imports it only when triton is installed).
"""

from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["SPLIT_K"])
def _splitk_reduce_kernel(
    # pointers
    ws_ptr,  # (SPLIT_K, M*N) float32 partials, contiguous
    c_ptr,  # (M*N,) output, contiguous
    # sizes
    MN,
    SPLIT_K,
    # meta-parameters
    BLOCK: tl.constexpr,
):
    """c = sum over slices of the partials, in slice order (deterministic), cast to c's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.load(ws_ptr + offs, mask=mask, other=0.0)
    for s in range(1, SPLIT_K):
        acc += tl.load(ws_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(
    # pointers
    qw_ptr,
    s_ptr,
    z_ptr,  # int4 only (int8 passes qw_ptr, unread)
    w_ptr,  # (N, K) output
    # sizes
    N,
    K,
    GROUP_SIZE,
    # strides
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    stride_zn,
    stride_zg,
    stride_wn,
    stride_wk,
    # meta-parameters
    W_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """W = dequant(B) in float32, rounded once to w's dtype: bit-exact with QuantizedWeight.dequantize."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if W_BITS == 4:
        packed = tl.load(qw_ptr + offs_n[:, None] * stride_qn + (offs_k[None, :] // 2) * stride_qk, mask=mask)
        q = ((packed >> ((offs_k[None, :] % 2) * 4)) & 0xF).to(tl.float32)
        g = offs_k[None, :] // GROUP_SIZE
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g * stride_sg, mask=mask, other=0.0)
        z = tl.load(z_ptr + offs_n[:, None] * stride_zn + g * stride_zg, mask=mask, other=0)
        w = (q - z.to(tl.float32)) * s.to(tl.float32)
    else:
        q = tl.load(qw_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk, mask=mask, other=0)
        s = tl.load(s_ptr + offs_n * stride_sn, mask=offs_n < N, other=0.0)
        w = q.to(tl.float32) * s.to(tl.float32)[:, None]
    tl.store(
        w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
        w.to(w_ptr.dtype.element_ty),
        mask,
    )
