"""Triton kernels of the int8 (W8A16) matmul: the GEMV (M <= GEMV_MAX_M) and the tiled GEMM, both split-K.

int8 codes (N, K) with one scale per output channel, applied once after the K loop (layout:
:mod:`qserve.kernels.packing`). K need not be a multiple of ``BLOCK_K`` (masked). With ``SPLIT_K`` > 1, slice
``s`` writes float32 partials to plane ``s`` of a (SPLIT_K, M, N) workspace. Autotuned and launched by
:mod:`qserve.kernels.quant_matmul_launch`; needs triton (launch imports it only when triton is installed).
"""

from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["SPLIT_K"])
def _w8_gemv_kernel(
    # pointers
    x_ptr,
    qw_ptr,
    s_ptr,
    c_ptr,
    # sizes
    M,
    N,
    K,
    SPLIT_K,
    # strides
    stride_xm,
    stride_xk,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_cs,
    stride_cm,
    stride_cn,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[:, n-tile] (+)= (x @ q[n-tile, k-slice]^T) * s for the M <= BLOCK_M rows, FMAs in float32."""
    # ------------------------------------------------------------------ program -> tile
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    num_kb = (K + BLOCK_K - 1) // BLOCK_K
    per_split = (num_kb + SPLIT_K - 1) // SPLIT_K
    kb_lo = pid_k * per_split
    kb_hi = tl.minimum(kb_lo + per_split, num_kb)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BM, BK)
    q_ptrs = qw_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk  # (BN, BK)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    # ------------------------------------------------------------------ main loop
    for kb in range(kb_lo, kb_hi):
        k0 = kb * BLOCK_K
        mask_k = (k0 + offs_k) < K
        x = tl.load(x_ptrs + k0 * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q = tl.load(q_ptrs + k0 * stride_qk, mask=mask_n[:, None] & mask_k[None, :], other=0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * q.to(tl.float32)[None, :, :], axis=2)  # (BM, BN)
    # ------------------------------------------------------------------ epilogue
    s = tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    c_ptrs = c_ptr + pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M", "M_BUCKET", "SPLIT_K"])
def _w8_gemm_kernel(
    # pointers
    x_ptr,
    qw_ptr,
    s_ptr,
    c_ptr,
    # sizes
    M,
    N,
    K,
    SPLIT_K,
    M_BUCKET,  # autotune key only
    # strides
    stride_xm,
    stride_xk,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_cs,
    stride_cm,
    stride_cn,
    # meta-parameters
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[m-tile, n-tile] (+)= (x @ q^T) * s over one K split, on tensor cores, accumulated in float32."""
    # ------------------------------------------------------------------ program -> tile (grouped order)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    num_kb = (K + BLOCK_K - 1) // BLOCK_K
    per_split = (num_kb + SPLIT_K - 1) // SPLIT_K
    kb_lo = pid_k * per_split
    kb_hi = tl.minimum(kb_lo + per_split, num_kb)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BM, BK)
    q_ptrs = qw_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk  # (BN, BK)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    # ------------------------------------------------------------------ main loop
    for kb in range(kb_lo, kb_hi):
        k0 = kb * BLOCK_K
        mask_k = (k0 + offs_k) < K
        a = tl.load(x_ptrs + k0 * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        q = tl.load(q_ptrs + k0 * stride_qk, mask=mask_n[:, None] & mask_k[None, :], other=0)
        acc = tl.dot(a.to(DOT_DTYPE), tl.trans(q.to(DOT_DTYPE)), acc)  # int8 codes exact in fp16 / bf16
    # ------------------------------------------------------------------ epilogue
    s = tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
    acc = acc * s[None, :]
    c_ptrs = c_ptr + pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
