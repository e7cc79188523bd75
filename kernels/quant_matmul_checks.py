"""Input checks of the quantized-matmul ops, shared by the custom ops, their fake implementations and the
``matmul_int*_triton`` entry points.

They look at dtypes, shapes and devices only, so they also run on fake tensors while tracing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qserve.kernels.quant_matmul_configs import _FLOATS, MAX_ELEMENTS

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
