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

Tuning constants are defaults until ``bench/kernels.py`` measures them on a GPU (``bench/gpu.sh``).
Autotune configs come from :func:`gemv_configs` / :func:`gemm_configs`, pruned by M, group size and the
register budget (:func:`prune_configs`). ``QSERVE_AUTOTUNE=0`` uses the first surviving config instead
(tests; no tuning time).

Where it runs: on CUDA the Triton kernels; with ``TRITON_INTERPRET=1`` the same kernels in Triton's interpreter
on any device (how the CPU tests exercise them); otherwise (CPU) the pure-torch reference
(:meth:`QuantizedWeight.dequantize` + ``F.linear``). Triton is optional: without it every device takes the
reference path. Limits: N * K < 2**31 elements; float32 activations take the dequantize path (Triton dequant
kernel + torch.matmul in float32).

Where each part lives (this module keeps the reference, the custom ops and :func:`quant_matmul`, and
re-exports every name of ``__all__``):

* ``quant_matmul_configs``: tuning constants, autotune candidates and pruning, :func:`split_k_for`,
  :func:`choose_path`, the autotune wrappers.
* ``quant_matmul_w4`` / ``quant_matmul_w8``: the int4 / int8 GEMV and GEMM Triton kernels;
  ``quant_matmul_common``: the split-K reduction and the dequantize kernel.
* ``quant_matmul_launch``: launching (``_run``, the interpreter), :func:`dequantize_triton`,
  :func:`matmul_int4_triton`, :func:`matmul_int8_triton`.
* ``quant_matmul_checks``: input checks shared by the real and fake implementations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qserve.kernels.packing import QuantizedWeight
from qserve.kernels.quant_matmul_checks import _check_int4, _check_int8
from qserve.kernels.quant_matmul_configs import (
    DEQUANT_MIN_M,
    GEMV_MAX_M,
    HAS_TRITON,
    choose_path,
    gemm_configs,
    gemv_configs,
    prune_configs,
    split_k_for,
)
from qserve.kernels.quant_matmul_launch import (
    _interpreting,
    _run,
    dequantize_triton,
    matmul_int4_triton,
    matmul_int8_triton,
)

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


# ----------------------------------------------------------------------------- reference


def quant_matmul_ref(x: Tensor, qweight: QuantizedWeight) -> Tensor:
    """``x @ dequant(W)^T`` through :meth:`QuantizedWeight.dequantize`: the CPU path and the tests' reference."""
    return F.linear(x, qweight.dequantize(x.dtype))


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
