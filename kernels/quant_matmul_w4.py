"""Triton kernels of the int4 (W4A16) matmul: the GEMV (M <= GEMV_MAX_M) and the tiled GEMM, both split-K.

Codes two per byte along K (k even in the low nibble), per-group scales and uint8 zero points (layout:
:mod:`qserve.kernels.packing`). Per ``BLOCK_K`` slice (it divides the group size: one scale and zero per
column) ``acc += (dot(a, q) - rowsum(a) * z) * s``. With ``SPLIT_K`` > 1, slice ``s`` writes float32
partials to plane ``s`` of a (SPLIT_K, M, N) workspace. Autotuned and launched by
:mod:`qserve.kernels.quant_matmul_launch`; needs triton (launch imports it only when triton is installed).
"""

from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["SPLIT_K"])
def _w4_gemv_kernel(
    # pointers
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    c_ptr,
    # sizes
    M,
    N,
    K,
    GROUP_SIZE,
    SPLIT_K,
    # strides
    stride_xm,
    stride_xk,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    stride_zn,
    stride_zg,
    stride_cs,
    stride_cm,
    stride_cn,
    # meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[:, n-tile] (+)= x @ dequant(W[n-tile, k-slice])^T for the M <= BLOCK_M rows, FMAs in float32."""
    # ------------------------------------------------------------------ program -> tile
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_b = tl.arange(0, BLOCK_K // 2)  # packed bytes of one K slice
    mask_m = offs_m < M
    mask_n = offs_n < N
    shift = (offs_k % 2) * 4  # k even -> low nibble
    # K slices of this split: BLOCK_K divides GROUP_SIZE divides K, so no K mask
    num_kb = K // BLOCK_K
    per_split = (num_kb + SPLIT_K - 1) // SPLIT_K
    kb_lo = pid_k * per_split
    kb_hi = tl.minimum(kb_lo + per_split, num_kb)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BM, BK)
    q_ptrs = qw_ptr + offs_n[:, None] * stride_qn + offs_b[None, :] * stride_qk  # (BN, BK/2)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    # ------------------------------------------------------------------ main loop
    for kb in range(kb_lo, kb_hi):
        k0 = kb * BLOCK_K
        x = tl.load(x_ptrs + k0 * stride_xk, mask=mask_m[:, None], other=0.0).to(tl.float32)
        packed = tl.load(q_ptrs + (k0 // 2) * stride_qk, mask=mask_n[:, None], other=0)  # uint8
        both = tl.reshape(tl.join(packed, packed), (BLOCK_N, BLOCK_K))  # each byte twice, in k order
        q = ((both >> shift[None, :]) & 0xF).to(tl.float32)  # (BN, BK) codes
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0).to(tl.float32)
        xq = tl.sum(x[:, None, :] * q[None, :, :], axis=2)  # (BM, BN)
        xsum = tl.sum(x, axis=1)  # (BM,)
        acc += (xq - xsum[:, None] * z[None, :]) * s[None, :]
    # ------------------------------------------------------------------ epilogue
    c_ptrs = c_ptr + pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit(do_not_specialize=["M", "M_BUCKET", "SPLIT_K"])
def _w4_gemm_kernel(
    # pointers
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    c_ptr,
    # sizes
    M,
    N,
    K,
    GROUP_SIZE,
    SPLIT_K,
    M_BUCKET,  # autotune key only
    # strides
    stride_xm,
    stride_xk,
    stride_qn,
    stride_qk,
    stride_sn,
    stride_sg,
    stride_zn,
    stride_zg,
    stride_cs,
    stride_cm,
    stride_cn,
    # meta-parameters
    DOT_DTYPE: tl.constexpr,  # x's dtype (float32 only under the interpreter, which lacks bf16 dots)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[m-tile, n-tile] (+)= x @ dequant(W)^T over one K split, on tensor cores, accumulated in float32."""
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
    offs_b = tl.arange(0, BLOCK_K // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    shift = (offs_k % 2) * 4
    num_kb = K // BLOCK_K
    per_split = (num_kb + SPLIT_K - 1) // SPLIT_K
    kb_lo = pid_k * per_split
    kb_hi = tl.minimum(kb_lo + per_split, num_kb)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BM, BK)
    q_ptrs = qw_ptr + offs_n[:, None] * stride_qn + offs_b[None, :] * stride_qk  # (BN, BK/2)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    # ------------------------------------------------------------------ main loop
    for kb in range(kb_lo, kb_hi):
        k0 = kb * BLOCK_K
        a = tl.load(x_ptrs + k0 * stride_xk, mask=mask_m[:, None], other=0.0)  # (BM, BK)
        packed = tl.load(q_ptrs + (k0 // 2) * stride_qk, mask=mask_n[:, None], other=0)
        both = tl.reshape(tl.join(packed, packed), (BLOCK_N, BLOCK_K))
        q = ((both >> shift[None, :]) & 0xF).to(DOT_DTYPE)  # (BN, BK): 0..15, exact in fp16 / bf16
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=mask_n, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * stride_zn + g * stride_zg, mask=mask_n, other=0).to(tl.float32)
        xq = tl.dot(a.to(DOT_DTYPE), tl.trans(q))  # (BM, BN) float32
        xsum = tl.sum(a.to(tl.float32), axis=1)  # (BM,)
        acc += (xq - xsum[:, None] * z[None, :]) * s[None, :]
    # ------------------------------------------------------------------ epilogue
    c_ptrs = c_ptr + pid_k * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
