"""The Triton kernel of the fused MoE: one grouped GEMM over (token, expert) assignments sorted by expert.

``C[id] = A[id // TOP_K] @ dequant(W[e])^T (* routing weight[id])`` for every assignment ``id`` of a block of
``BLOCK_M`` sorted assignments that all belong to expert ``e`` (:func:`qserve.kernels.fused_moe.align_blocks`
pads each expert's run to whole blocks; padding ids are ``>= num_valid`` and masked; blocks past the last
expert have expert id -1 and return at once). Weights: float (E, N, K); int8 (E, N, K) codes with one scale
per output channel, applied after the K loop; int4 qserve layout (E, N, K/2) uint8, k even in the low nibble,
scales / uint8 zero points (E, N, K/G), dequantized per tile in float32 and rounded once to the dot dtype
(as :meth:`QuantizedWeight.dequantize` does). Products accumulate in float32. Launched by
:mod:`qserve.kernels.fused_moe`; needs triton (imported there only when triton is installed).
"""

from __future__ import annotations

import triton
import triton.language as tl

FLOAT, INT8, INT4 = 0, 1, 2  # WEIGHTS constexpr values


@triton.jit
def _fused_moe_kernel(
    # pointers
    a_ptr,
    w_ptr,
    s_ptr,
    z_ptr,
    c_ptr,
    tw_ptr,
    sorted_ids_ptr,
    expert_ids_ptr,
    # sizes
    N,
    K,
    num_valid,
    GROUP_SIZE,
    # strides
    stride_am,
    stride_ak,
    stride_we,
    stride_wn,
    stride_wk,
    stride_se,
    stride_sn,
    stride_sk,
    stride_ze,
    stride_zn,
    stride_zk,
    stride_cm,
    stride_cn,
    # meta-parameters
    TOP_K: tl.constexpr,  # A's row of assignment id is id // TOP_K (1: A is indexed by assignment)
    WEIGHTS: tl.constexpr,  # FLOAT | INT8 | INT4
    MUL_ROUTED: tl.constexpr,  # scale each row by its routing weight tw[id]
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """C[ids, n-tile] = A[ids // TOP_K] @ dequant(W[e, n-tile])^T for one block of sorted assignments."""
    # ------------------------------------------------------------------ program -> block, expert
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(expert_ids_ptr + pid_m)
    if e < 0:  # a block past every expert's run
        return
    e = e.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ids = tl.load(sorted_ids_ptr + offs_m)  # (BM,) assignment ids, padding >= num_valid
    mask_m = ids < num_valid
    rows = tl.where(mask_m, ids // TOP_K, 0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    w_base = w_ptr + e * stride_we

    # ------------------------------------------------------------------ K loop
    acc = tl.full(
        (BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32
    )  # not tl.zeros: a jit function the interpreter cannot call
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a_ptrs = a_ptr + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
        a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # (BM, BK)
        wmask = mask_k[:, None] & mask_n[None, :]
        if WEIGHTS == 2:
            byte_ptrs = w_base + offs_n[None, :] * stride_wn + (offs_k[:, None] // 2) * stride_wk
            byte = tl.load(byte_ptrs, mask=wmask, other=0).to(tl.int32)  # (BK, BN)
            q = (byte >> ((offs_k[:, None] % 2) * 4)) & 0xF
            g = offs_k[:, None] // GROUP_SIZE
            s = tl.load(
                s_ptr + e * stride_se + offs_n[None, :] * stride_sn + g * stride_sk, mask=wmask, other=0.0
            )
            z = tl.load(
                z_ptr + e * stride_ze + offs_n[None, :] * stride_zn + g * stride_zk, mask=wmask, other=0
            )
            w = (q.to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)  # (BK, BN) float32, rounded below
        else:
            w = tl.load(
                w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk, mask=wmask, other=0
            )
            w = w.to(tl.float32)  # int8 codes are exact in any float
        acc += tl.dot(a.to(DOT_DTYPE), w.to(a.dtype).to(DOT_DTYPE))

    # ------------------------------------------------------------------ epilogue
    if WEIGHTS == 1:
        scale = tl.load(s_ptr + e * stride_se + offs_n * stride_sn, mask=mask_n, other=0.0)  # (BN,)
        acc = acc * scale.to(tl.float32)[None, :]
    if MUL_ROUTED:
        tw = tl.load(tw_ptr + ids, mask=mask_m, other=0.0)  # (BM,)
        acc = acc * tw.to(tl.float32)[:, None]
    c_ptrs = c_ptr + ids[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
