"""The Triton kernel of the bitsandbytes 4-bit (NF4 / FP4) dequant-matmul: ``C = x @ dequant_bnb(W)^T``.

bitsandbytes' layout (:mod:`qserve.kernels.bnb4_matmul` has the reference): W (N, K) flattened row-major,
element ``f = n K + k`` is code ``f // 2`` of the packed bytes, high nibble when ``f`` is even (K even here, so
a row starts on a byte and a K slice is a (BN, BK/2) byte tile, split into nibbles); its value is
``code[q] * absmax[f // BLOCKSIZE]`` (the 16-entry codebook, one float32 absmax per block). With double
quantization (``NESTED``) absmax itself is 8-bit: ``absmax[b] = code2[a8[b]] * absmax2[b // BLOCKSIZE2]
+ offset``. Each (BN, BK) weight tile is dequantized in float32, rounded once to the dot dtype (what
bitsandbytes' own dequantize returns), and fed to ``tl.dot``; products accumulate in float32.

``ROW_ALIGNED`` (K % BLOCKSIZE == 0 and BLOCKSIZE % BLOCK_K == 0, bitsandbytes' usual blocksize 64 on any
K divisible by 64): a K slice of a row lies in one block, so absmax is one load per row and slice instead of
one per element. Launched by :mod:`qserve.kernels.bnb4_matmul`; needs triton.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------- kernel


@triton.jit(do_not_specialize=["M"])
def _bnb4_gemm_kernel(
    # pointers
    x_ptr,
    qw_ptr,
    code_ptr,
    absmax_ptr,
    code2_ptr,
    absmax2_ptr,
    c_ptr,
    # sizes
    M,
    N,
    K,
    BLOCKSIZE,
    BLOCKSIZE2,
    offset,
    # strides
    stride_xm,
    stride_xk,
    stride_cm,
    stride_cn,
    # meta-parameters
    NESTED: tl.constexpr,  # absmax is uint8 codes of a second, blockwise quantization
    ROW_ALIGNED: tl.constexpr,  # one absmax per (row, K slice): see the module docstring
    DOT_DTYPE: tl.constexpr,  # x's dtype (float32 under the interpreter, which lacks bf16 dots)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[m-tile, n-tile] = x @ dequant(W)^T over all of K, on tensor cores, accumulated in float32."""
    # ------------------------------------------------------------------ program -> tile (grouped order)
    pid = tl.program_id(0)
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
    offs_b = tl.arange(0, BLOCK_K // 2)  # packed bytes of one K slice
    mask_m = offs_m < M
    mask_n = offs_n < N
    row = offs_n.to(tl.int64) * K  # (BN,) flat index of each row's first element (N K may pass 2^31)
    if not ROW_ALIGNED:  # blocks span rows: block of (n, k) = row // BS + (row % BS + k) // BS
        row_blk = row // BLOCKSIZE  # (BN,) int64
        row_rem = (row % BLOCKSIZE).to(tl.int32)  # (BN,)
    q_ptrs = qw_ptr + (row // 2)[:, None] + offs_b[None, :]  # (BN, BK/2): K is even, so rows start on a byte
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BM, BK)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    # ------------------------------------------------------------------ main loop
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k  # (BK,)
        mask_k = k < K
        a = tl.load(x_ptrs + k0 * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BM, BK)
        mask_b = mask_n[:, None] & ((k0 + 2 * offs_b) < K)[None, :]
        packed = tl.load(q_ptrs + k0 // 2, mask=mask_b, other=0)  # (BN, BK/2) uint8
        hi = tl.load(code_ptr + (packed >> 4))  # (BN, BK/2) float32: element 2j (high nibble)
        lo = tl.load(code_ptr + (packed & 0xF))  # element 2j + 1
        w = tl.reshape(tl.join(hi, lo), (BLOCK_N, BLOCK_K))  # (BN, BK) in k order
        # absmax: per row for this K slice (ROW_ALIGNED), else per element
        if ROW_ALIGNED:
            blk = (row + k0) // BLOCKSIZE  # (BN,)
            bmask = mask_n
        else:
            blk = row_blk[:, None] + (row_rem[:, None] + k[None, :]) // BLOCKSIZE  # (BN, BK)
            bmask = mask_n[:, None] & mask_k[None, :]
        if NESTED:
            a8 = tl.load(absmax_ptr + blk, mask=bmask, other=0)  # uint8 codes of absmax
            scale = tl.load(code2_ptr + a8) * tl.load(absmax2_ptr + blk // BLOCKSIZE2, mask=bmask, other=0.0)
            scale = scale + offset
        else:
            scale = tl.load(absmax_ptr + blk, mask=bmask, other=0.0)
        if ROW_ALIGNED:
            w = w * scale[:, None]
        else:
            w = w * scale
        w = tl.where(mask_k[None, :], w, 0.0).to(DOT_DTYPE)  # rounded once, as bitsandbytes' dequantize does
        acc += tl.dot(a.to(DOT_DTYPE), tl.trans(w))  # (BM, BN) float32
    # ------------------------------------------------------------------ epilogue
    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
