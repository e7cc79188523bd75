"""Weight-only quantized matmul (W4A16 / W8A16): ``C = A @ dequant(B)^T`` as Triton kernels, beside the reference.

``A`` is the activation ``x`` (M, K) in float16 / bfloat16, ``B`` the quantized (N, K) weight in the layout of
:mod:`qserve.kernels.packing` (read it there: int4 codes two per byte along K with k even in the low nibble,
per-group scales and uint8 zero points; int8 codes with one scale per output channel). ``C`` is (M, N) in
x's dtype; every product is accumulated in float32.

Regimes, chosen by M (the number of tokens in the batch):

* ``M <= GEMV_MAX_M`` (decode): a GEMV-style kernel. Each program owns ``BLOCK_N`` output channels and one
  of ``SPLIT_K`` slices of K; it broadcasts the (<= 4) activation rows against a dequantized (BLOCK_N, BLOCK_K)
  weight tile and reduces along K with FMAs (no tensor cores: the weight read is the whole cost).
* ``GEMV_MAX_M < M < DEQUANT_MIN_M``: a tiled GEMM (``tl.dot``, grouped program order, optional split-K).
* ``M >= DEQUANT_MIN_M`` (large prefill): dequantize once with a Triton kernel and call ``torch.matmul``,
  which is compute-bound there and beats any fused dequant.

Split-K: programs of slice ``s`` write float32 partials into a (SPLIT_K, M, N) workspace, and a small kernel
sums them in a fixed order and casts (deterministic, no atomics). ``SPLIT_K`` comes from :func:`split_k_for`
so that small-N layers still fill the GPU.

int4 inner loop, per ``BLOCK_K`` slice (``BLOCK_K`` divides the group size, so one scale and zero per column):
``dot(a, q) - rowsum(a) * z`` then ``* s``: the zero point and the scale are applied once per (row, column)
per slice, not per weight element, and the integer codes enter the dot exactly (|q| <= 15).

Tuning constants below are defaults until ``bench/kernels.py`` measures them on a GPU (``bench/gpu.sh``).
Autotune configs come from :func:`gemv_configs` / :func:`gemm_configs`, pruned by M, group size and the
register budget (:func:`prune_configs`). ``QSERVE_AUTOTUNE=0`` uses the first surviving config instead
(tests; no tuning time).

Where it runs: on CUDA the Triton kernels; with ``TRITON_INTERPRET=1`` the same kernels in Triton's interpreter
on any device (how the CPU tests exercise them); otherwise (CPU) the pure-torch reference
(:meth:`QuantizedWeight.dequantize` + ``F.linear``). Triton is optional: without it every device takes the
reference path. Limits: N * K < 2**31 elements; float32 activations take the dequantize path (Triton dequant
kernel + torch.matmul in float32).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from qserve.kernels.packing import QuantizedWeight

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a dev / gpu extra
    HAS_TRITON = False

__all__ = [
    "DEQUANT_MIN_M",
    "GEMV_MAX_M",
    "HAS_TRITON",
    "choose_path",
    "dequantize_triton",
    "gemm_configs",
    "gemv_configs",
    "matmul_int4_triton",
    "matmul_int8_triton",
    "prune_configs",
    "quant_matmul",
    "quant_matmul_ref",
    "split_k_for",
]

# ----------------------------------------------------------------------------- tuning constants

GEMV_MAX_M = 4  # largest M for the GEMV kernel (its BLOCK_M is next_pow2(M) <= 4)
DEQUANT_MIN_M = 1024  # from this M on: dequantize once + torch.matmul (bench/kernels.py measures it)
SPLIT_K_MAX = 8  # at most this many K slices
SPLIT_K_MIN_K = 512  # each K slice keeps at least this many inputs
SPLIT_K_NOMINAL_BLOCK_N = 64  # tile width split_k_for assumes (the autotuned one may differ)
SPLIT_K_NOMINAL_BLOCK_M = 16
MAX_ELEMENTS = 2**31  # int32 offsets inside the kernels
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_ACTS = (torch.float16, torch.bfloat16)

Config = dict[str, int]  # BLOCK_* meta-parameters plus num_warps / num_stages


# ----------------------------------------------------------------------------- reference


def quant_matmul_ref(x: Tensor, qweight: QuantizedWeight) -> Tensor:
    """``x @ dequant(W)^T`` through :meth:`QuantizedWeight.dequantize`: the CPU path and the tests' reference."""
    return F.linear(x, qweight.dequantize(x.dtype))


# ----------------------------------------------------------------------------- configs


def gemv_configs() -> list[Config]:
    """GEMV candidates (BLOCK_N x BLOCK_K tiles); the first that survives pruning is the untuned default."""
    shapes = [  # (BLOCK_N, BLOCK_K, num_warps, num_stages)
        (32, 128, 4, 3),
        (64, 128, 4, 3),
        (16, 128, 2, 4),
        (128, 128, 8, 3),
        (32, 256, 4, 3),
        (64, 64, 8, 3),
        (32, 64, 4, 3),
        (16, 64, 2, 4),
    ]
    return [dict(BLOCK_N=n, BLOCK_K=k, num_warps=w, num_stages=s) for n, k, w, s in shapes]


def gemm_configs() -> list[Config]:
    """GEMM candidates (BLOCK_M x BLOCK_N x BLOCK_K tiles); pruned by M, so each M bucket has its own default."""
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
        (16, 64, 128, 4, 4),
        (16, 128, 128, 4, 4),
        (32, 64, 128, 4, 4),
        (32, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 128, 128, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
    ]
    return [
        dict(BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def prune_configs(configs: list[Config], path: str, m: int, group_size: int) -> list[Config]:
    """Keep the configs that suit ``path`` ("gemv" | "gemm") at M = ``m``, in order, without duplicates.

    int4 (``group_size`` > 0): BLOCK_K shrinks to a power of two dividing the group size, so every K slice
    lies inside one group. GEMV: the (BLOCK_M, BLOCK_N, BLOCK_K) product must fit about 64 float32
    registers a thread. GEMM: BLOCK_M between a quarter of next_pow2(M) (at most 64) and next_pow2(M).
    """
    out: list[Config] = []
    bucket = _m_bucket(m)
    for cfg in configs:
        c = dict(cfg)
        if group_size > 0:
            c["BLOCK_K"] = _pow2_divisor(group_size, c["BLOCK_K"])
        if path == "gemv":
            if _next_pow2(m) * c["BLOCK_N"] * c["BLOCK_K"] > 64 * 32 * c["num_warps"]:
                continue
        elif not (min(64, max(16, bucket // 4)) <= c["BLOCK_M"] <= max(16, bucket)):
            continue
        if c not in out:
            out.append(c)
    if not out:  # nothing fits: the smallest tile
        smallest: Config = min(configs, key=_tile_volume).copy()
        if group_size > 0:
            smallest["BLOCK_K"] = _pow2_divisor(group_size, smallest["BLOCK_K"])
        out.append(smallest)
    return out


def _tile_volume(cfg: Config) -> int:
    return cfg.get("BLOCK_M", 1) * cfg["BLOCK_N"] * cfg["BLOCK_K"]


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _m_bucket(m: int) -> int:
    return min(_next_pow2(m), 4096)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_k_for(path: str, m: int, n: int, k: int, num_sms: int) -> int:
    """How many K slices to launch: double while the nominal tile count is below one per SM.

    Stops at SPLIT_K_MAX, or when a slice would cover fewer than SPLIT_K_MIN_K inputs.
    """
    if path == "gemv":
        tiles = _cdiv(n, SPLIT_K_NOMINAL_BLOCK_N)
    else:
        tiles = _cdiv(m, SPLIT_K_NOMINAL_BLOCK_M) * _cdiv(n, 2 * SPLIT_K_NOMINAL_BLOCK_N)
    split = 1
    while split < SPLIT_K_MAX and tiles * split < num_sms and k // (2 * split) >= SPLIT_K_MIN_K:
        split *= 2
    return split


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def choose_path(m: int) -> str:
    """The regime for a batch of ``m`` rows: "gemv", "gemm" or "dequant" (see the module docstring)."""
    if m <= GEMV_MAX_M:
        return "gemv"
    return "gemm" if m < DEQUANT_MIN_M else "dequant"


# ----------------------------------------------------------------------------- kernels

if HAS_TRITON:

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
            packed = tl.load(
                qw_ptr + offs_n[:, None] * stride_qn + (offs_k[None, :] // 2) * stride_qk, mask=mask
            )
            q = ((packed >> ((offs_k[None, :] % 2) * 4)) & 0xF).to(tl.float32)
            g = offs_k[None, :] // GROUP_SIZE
            s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g * stride_sg, mask=mask, other=0.0)
            z = tl.load(z_ptr + offs_n[:, None] * stride_zn + g * stride_zg, mask=mask, other=0)
            w = (q - z.to(tl.float32)) * s.to(tl.float32)
        else:
            q = tl.load(
                qw_ptr + offs_n[:, None] * stride_qn + offs_k[None, :] * stride_qk, mask=mask, other=0
            )
            s = tl.load(s_ptr + offs_n * stride_sn, mask=offs_n < N, other=0.0)
            w = q.to(tl.float32) * s.to(tl.float32)[:, None]
        tl.store(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            w.to(w_ptr.dtype.element_ty),
            mask,
        )

    def _autotuned(kernel: Any, candidates: list[Config], key: list[str]) -> Any:
        """``kernel`` autotuned over ``candidates`` (pruned per call by :func:`_prune_hook`), brief timings."""
        configs = [_to_triton_config(c) for c in candidates]
        prune = {"early_config_prune": _prune_hook}
        import triton.testing

        try:
            bench = functools.partial(triton.testing.do_bench, warmup=5, rep=20)
            return triton.autotune(configs, key=key, prune_configs_by=prune, do_bench=bench)(kernel)
        except TypeError:  # older triton: no do_bench argument
            return triton.autotune(configs, key=key, prune_configs_by=prune, warmup=5, rep=20)(kernel)

    def _to_triton_config(c: Config) -> Any:
        meta = {k: v for k, v in c.items() if k not in ("num_warps", "num_stages")}
        return triton.Config(meta, num_warps=c["num_warps"], num_stages=c["num_stages"])

    def _prune_hook(configs: list[Any], named_args: dict[str, Any], **kwargs: Any) -> list[Any]:
        args = {**named_args, **kwargs}
        path = "gemv" if "M_BUCKET" not in args else "gemm"
        m = args["BLOCK_M"] if path == "gemv" else args["M_BUCKET"]
        plain = [{**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in configs]
        return [_to_triton_config(c) for c in prune_configs(plain, path, m, args.get("GROUP_SIZE", 0))]

    _W4_GEMV = _autotuned(_w4_gemv_kernel, gemv_configs(), ["BLOCK_M", "N", "K", "GROUP_SIZE", "SPLIT_K"])
    _W4_GEMM = _autotuned(_w4_gemm_kernel, gemm_configs(), ["M_BUCKET", "N", "K", "GROUP_SIZE", "SPLIT_K"])
    _W8_GEMV = _autotuned(_w8_gemv_kernel, gemv_configs(), ["BLOCK_M", "N", "K", "SPLIT_K"])
    _W8_GEMM = _autotuned(_w8_gemm_kernel, gemm_configs(), ["M_BUCKET", "N", "K", "SPLIT_K"])


# ----------------------------------------------------------------------------- launching


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _autotuning() -> bool:
    return os.environ.get("QSERVE_AUTOTUNE", "1").strip().lower() not in ("0", "false", "off", "no")


@functools.cache
def _interpreted(kernel: Any) -> Any:
    """The interpreter's version of a kernel, whichever mode triton was imported in."""
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(kernel.fn)


@contextlib.contextmanager
def _interpreter_stdlib() -> Iterator[None]:
    """Let interpreted kernels call ``tl.sum`` even if triton was imported before TRITON_INTERPRET was set.

    Triton's standard library functions (``tl.sum``) are themselves @triton.jit functions, compiled-mode
    objects when triton was imported without TRITON_INTERPRET=1 (e.g. by another module first), and the
    interpreter cannot call those. Swap in interpreted copies for the duration of the launch.
    """
    from triton.runtime.jit import JITFunction

    saved = {}
    for name in ("sum",):
        fn = getattr(tl, name)
        if isinstance(fn, JITFunction):
            saved[name] = fn
            setattr(tl, name, _interpreted(fn))
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(tl, name, fn)


def _launch(
    tuned: Any,
    kernel: Any,
    grid: Callable[[dict[str, Any]], tuple[int, ...]],
    config: Config | None,
    args: list[Any],
    meta: dict[str, Any],
    path: str,
    m: int,
    group_size: int,
) -> None:
    """Run ``kernel`` with an explicit config, the default one (interpreter, QSERVE_AUTOTUNE=0), or autotuned."""
    if config is None and not _interpreting() and _autotuning():
        tuned[grid](*args, **meta)
        return
    cfg = (
        config or prune_configs(gemv_configs() if path == "gemv" else gemm_configs(), path, m, group_size)[0]
    )
    _call(kernel, grid, args, {**meta, **cfg})


def _dot_dtype(x: Tensor) -> Any:
    # The interpreter (numpy) has no bfloat16 matmul: there, bf16 dots run on float32 copies, exactly.
    if _interpreting() and x.dtype == torch.bfloat16:
        return tl.float32
    return tl.float16 if x.dtype == torch.float16 else tl.bfloat16


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    # Under the interpreter (tests) buffers start as NaN, so an element no program writes cannot pass.
    if _interpreting():
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _check_config(config: Config | None, path: str, group_size: int) -> None:
    if config is None:
        return
    need = {"BLOCK_N", "BLOCK_K", "num_warps", "num_stages"} | (
        {"BLOCK_M", "GROUP_M"} if path == "gemm" else set()
    )
    if set(config) != need:
        raise ValueError(f"{path} config needs exactly the keys {sorted(need)}, got {sorted(config)}")
    if group_size > 0 and group_size % config["BLOCK_K"]:
        raise ValueError(f"BLOCK_K {config['BLOCK_K']} must divide the group size {group_size}")
    if path == "gemm" and min(config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]) < 16:
        raise ValueError(f"tl.dot needs BLOCK_M, BLOCK_N, BLOCK_K >= 16, got {config}")


def _run(
    weights: str,
    x: Tensor,
    tensors: tuple[Tensor, ...],
    n: int,
    group_size: int,
    path: str,
    split_k: int | None,
    config: Config | None,
    out: Tensor | None,
) -> Tensor:
    """Shared launcher of the int4 / int8 Triton paths (inputs already validated)."""
    if not HAS_TRITON:
        raise RuntimeError("the Triton path needs triton installed (pip install 'qserve[gpu]')")
    m, k = x.shape
    if out is None:
        out = _alloc((m, n), x.dtype, x.device)
    elif out.shape != (m, n) or out.dtype != x.dtype or out.device != x.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {x.dtype} ({m}, {n}) tensor on {x.device}")
    if m == 0:
        return out
    if path == "auto":
        path = choose_path(m)
        if x.dtype not in _TRITON_ACTS or (weights == "int4" and group_size % 16):
            path = "dequant"  # float32 activations; tiles need 16 | group size, dequantizing takes any
    elif path != "dequant" and x.dtype not in _TRITON_ACTS:
        raise TypeError(f"the {path} kernel takes float16 or bfloat16 activations, got {_name(x.dtype)}")
    if path == "dequant":
        w = dequantize_triton(weights, tensors, n, k, group_size, x.dtype)  # (N, K)
        return torch.matmul(x, w.t(), out=out)
    if path not in ("gemv", "gemm"):
        raise ValueError(f"path must be auto, gemv, gemm or dequant, got {path!r}")
    _check_config(config, path, group_size)
    split = split_k or split_k_for(path, m, n, k, _num_sms(x.device))
    if split < 1:
        raise ValueError(f"split_k must be >= 1, got {split}")
    c = out if split == 1 else _alloc((split, m, n), torch.float32, x.device)  # (S, M, N) partials
    c_strides = (0, *out.stride()) if split == 1 else c.stride()
    if weights == "int4":
        qweight, scales, zeros = tensors
        w_args = [qweight, scales, zeros]
        sizes = [m, n, k, group_size, split]
        w_strides = [*qweight.stride(), *scales.stride(), *zeros.stride()]
    else:
        qweight, scales = tensors
        w_args = [qweight, scales]
        sizes = [m, n, k, split]
        w_strides = [*qweight.stride(), scales.stride(0)]
    meta: dict[str, Any] = {}
    if path == "gemv":
        meta["BLOCK_M"] = _next_pow2(m)
        args = [x, *w_args, c, *sizes, *x.stride(), *w_strides, *c_strides]
        kernel, tuned = (_w4_gemv_kernel, _W4_GEMV) if weights == "int4" else (_w8_gemv_kernel, _W8_GEMV)

        def grid(meta: dict[str, Any]) -> tuple[int, ...]:
            return (_cdiv(n, meta["BLOCK_N"]), split)
    else:
        meta["DOT_DTYPE"] = _dot_dtype(x)
        args = [x, *w_args, c, *sizes, _m_bucket(m), *x.stride(), *w_strides, *c_strides]
        kernel, tuned = (_w4_gemm_kernel, _W4_GEMM) if weights == "int4" else (_w8_gemm_kernel, _W8_GEMM)

        def grid(meta: dict[str, Any]) -> tuple[int, ...]:
            return (_cdiv(m, meta["BLOCK_M"]) * _cdiv(n, meta["BLOCK_N"]), split)

    _launch(tuned, kernel, grid, config, args, meta, path, m, group_size if weights == "int4" else 0)
    if split > 1:  # sum the partials in slice order
        block = 1024
        _call(
            _splitk_reduce_kernel,
            (_cdiv(m * n, block),),
            [c, out, m * n, split],
            dict(BLOCK=block, num_warps=4),
        )
    return out


def _call(kernel: Any, grid: Any, args: list[Any], meta: dict[str, Any]) -> None:
    """Launch a kernel with fixed meta-parameters, in the interpreter when TRITON_INTERPRET=1."""
    if _interpreting():
        with _interpreter_stdlib():
            _interpreted(kernel)[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def dequantize_triton(
    weights: str, tensors: tuple[Tensor, ...], n: int, k: int, group_size: int, dtype: torch.dtype
) -> Tensor:
    """The (N, K) float weight in ``dtype``, by one Triton kernel; bit-exact with QuantizedWeight.dequantize.

    ``tensors`` is (qweight, scales, zeros) for int4 and (qweight, scales) for int8.
    """
    if not HAS_TRITON:
        raise RuntimeError("the Triton path needs triton installed (pip install 'qserve[gpu]')")
    qweight, scales = tensors[0], tensors[1]
    zeros = tensors[2] if weights == "int4" else qweight
    w = _alloc((n, k), dtype, qweight.device)
    if n == 0 or k == 0:
        return w
    bits = 4 if weights == "int4" else 8
    sg = scales.stride(1) if bits == 4 else 0
    zn, zg = zeros.stride() if bits == 4 else (0, 0)
    sizes = [n, k, max(group_size, 1)]
    args = [qweight, scales, zeros, w, *sizes, *qweight.stride(), scales.stride(0), sg, zn, zg, *w.stride()]
    _call(_dequant_kernel, (_cdiv(n, 32), _cdiv(k, 128)), args, dict(W_BITS=bits, BLOCK_N=32, BLOCK_K=128))
    return w


def matmul_int4_triton(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor,
    group_size: int,
    *,
    path: str = "auto",
    split_k: int | None = None,
    config: Config | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """The int4 Triton path of :func:`quant_matmul` with its knobs exposed (tests, benchmarks).

    ``path``: "auto" (by M), "gemv", "gemm" or "dequant"; ``split_k``: K slices (None: :func:`split_k_for`);
    ``config``: explicit meta-parameters instead of autotuning (keys of :func:`gemv_configs` /
    :func:`gemm_configs` entries); ``out``: a contiguous (M, N) tensor of x's dtype to write into.
    """
    _check_int4(x, qweight, scales, zeros, group_size)
    return _run("int4", x, (qweight, scales, zeros), qweight.shape[0], group_size, path, split_k, config, out)


def matmul_int8_triton(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    *,
    path: str = "auto",
    split_k: int | None = None,
    config: Config | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """The int8 Triton path of :func:`quant_matmul`; knobs as in :func:`matmul_int4_triton`."""
    _check_int8(x, qweight, scales)
    return _run("int8", x, (qweight, scales), qweight.shape[0], -1, path, split_k, config, out)


# ----------------------------------------------------------------------------- checks


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_common(op: str, x: Tensor, qweight: Tensor, scales: Tensor) -> None:
    if x.dtype not in _FLOATS:
        raise TypeError(f"{op}: x must be float16, bfloat16 or float32, got {_name(x.dtype)}")
    if x.dim() != 2:
        raise ValueError(
            f"{op}: x must be 2-D (M, K), got shape {tuple(x.shape)}; reshape (..., K) inputs first"
        )
    if scales.dtype not in _FLOATS:
        raise TypeError(f"{op}: scales must be float16, bfloat16 or float32, got {_name(scales.dtype)}")
    if qweight.dim() != 2:
        raise ValueError(f"{op}: qweight must be 2-D, got shape {tuple(qweight.shape)}")
    if qweight.shape[0] * max(x.shape[1], 1) >= MAX_ELEMENTS:
        raise ValueError(f"{op}: N * K must stay below 2**31, got {qweight.shape[0]} x {x.shape[1]}")


def _check_devices(op: str, x: Tensor, *others: Tensor) -> None:
    for t in others:
        if t.device != x.device:
            raise ValueError(
                f"{op}: all tensors must be on one device, got x on {x.device} and a weight on {t.device}"
            )


def _check_int4(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> None:
    op = "quant_matmul_int4"
    _check_common(op, x, qweight, scales)
    if qweight.dtype != torch.uint8 or zeros.dtype != torch.uint8:
        raise TypeError(
            f"{op}: qweight and zeros must be uint8, got {_name(qweight.dtype)} and {_name(zeros.dtype)}"
        )
    m, k = x.shape
    n = qweight.shape[0]
    if group_size <= 0 or k % group_size or k % 2:
        raise ValueError(f"{op}: group size {group_size} must be positive and divide K = {k} (K even)")
    if qweight.shape != (n, k // 2):
        raise ValueError(
            f"{op}: qweight must be (N, K/2) = ({n}, {k // 2}) for x's K = {k}, got {tuple(qweight.shape)}"
        )
    if scales.shape != (n, k // group_size) or zeros.shape != scales.shape:
        raise ValueError(
            f"{op}: scales and zeros must be (N, K/G) = ({n}, {k // group_size}), got "
            f"{tuple(scales.shape)} and {tuple(zeros.shape)}"
        )
    _check_devices(op, x, qweight, scales, zeros)


def _check_int8(x: Tensor, qweight: Tensor, scales: Tensor) -> None:
    op = "quant_matmul_int8"
    _check_common(op, x, qweight, scales)
    if qweight.dtype != torch.int8:
        raise TypeError(f"{op}: qweight must be int8, got {_name(qweight.dtype)}")
    k, n = x.shape[1], qweight.shape[0]
    if qweight.shape[1] != k:
        raise ValueError(f"{op}: qweight must be (N, K) with x's K = {k}, got {tuple(qweight.shape)}")
    if scales.shape != (n,):
        raise ValueError(f"{op}: scales must be (N,) = ({n},), got {tuple(scales.shape)}")
    _check_devices(op, x, qweight, scales)


# ----------------------------------------------------------------------------- custom ops


def _use_triton(x: Tensor) -> bool:
    return HAS_TRITON and (_interpreting() or x.device.type == "cuda")


@torch.library.custom_op("qserve::quant_matmul_int4", mutates_args=())
def quant_matmul_int4(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """(M, K) @ int4 (N, K)^T -> (M, N) in x's dtype. qweight uint8 (N, K/2), scales (N, K/G), zeros uint8 (N, K/G)."""
    _check_int4(x, qweight, scales, zeros, group_size)
    if _use_triton(x):
        return _run(
            "int4", x, (qweight, scales, zeros), qweight.shape[0], group_size, "auto", None, None, None
        )
    n, k = qweight.shape[0], x.shape[1]
    return quant_matmul_ref(x, QuantizedWeight(qweight, scales, zeros, "int4", group_size, k, n))


@quant_matmul_int4.register_fake
def _(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    _check_int4(x, qweight, scales, zeros, group_size)
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.custom_op("qserve::quant_matmul_int8", mutates_args=())
def quant_matmul_int8(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """(M, K) @ int8 (N, K)^T -> (M, N) in x's dtype. qweight int8 (N, K), scales (N,)."""
    _check_int8(x, qweight, scales)
    if _use_triton(x):
        return _run("int8", x, (qweight, scales), qweight.shape[0], -1, "auto", None, None, None)
    n, k = qweight.shape
    return quant_matmul_ref(x, QuantizedWeight(qweight, scales, None, "int8", -1, k, n))


@quant_matmul_int8.register_fake
def _(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    _check_int8(x, qweight, scales)
    return x.new_empty((x.shape[0], qweight.shape[0]))


def quant_matmul(x: Tensor, qweight: QuantizedWeight) -> Tensor:
    """``C = x @ dequant(W)^T`` for the (N, K) weight W that ``qweight`` stands for.

    Args:
        x: (M, K) activations, float16 or bfloat16 (float32 is accepted and takes the dequantize path),
            any strides, on qweight's device. M may be 0.
        qweight: a :class:`QuantizedWeight`: int4 (uint8 codes (N, K/2), scales (N, K/G), uint8 zeros
            (N, K/G); G any divisor of K, 16 | G for the fused kernels) or int8 (int8 codes (N, K), scales (N,)).
            Scales may be float16, bfloat16 or float32, independently of x.

    Returns:
        (M, N) in x's dtype, products accumulated in float32.

    Raises:
        TypeError: qweight is not a QuantizedWeight, or a tensor has the wrong dtype.
        ValueError: shapes disagree (x not 2-D, K mismatch, group size not dividing K), tensors on different
            devices, or N * K >= 2**31.

    Backed by the ``torch.ops.qserve.quant_matmul_int4`` / ``quant_matmul_int8`` custom ops (with fake
    implementations), so models that call it stay ``torch.compile``-able.
    """
    if not isinstance(qweight, QuantizedWeight):
        raise TypeError(f"quant_matmul: qweight must be a QuantizedWeight, got {type(qweight).__name__}")
    if qweight.weights == "int4":
        if qweight.zeros is None:
            raise ValueError("quant_matmul: an int4 QuantizedWeight needs zero points (zeros is None)")
        out: Tensor = torch.ops.qserve.quant_matmul_int4(
            x, qweight.qweight, qweight.scales, qweight.zeros, qweight.group_size
        )
        return out
    if qweight.weights == "int8":
        out = torch.ops.qserve.quant_matmul_int8(x, qweight.qweight, qweight.scales)
        return out
    raise ValueError(f"quant_matmul: unknown weight format {qweight.weights!r} (int4 or int8)")
