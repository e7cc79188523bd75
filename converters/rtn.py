"""Round-to-nearest quantization: the public ``quantize_weight`` and per-layer error statistics."""

from __future__ import annotations

import torch

from qserve.errors import QServeError
from qserve.kernels.packing import GROUP_SIZES, QuantizedWeight, quantize

WEIGHT_CHOICES = ("int4", "int8", "nf4")  # nf4: through bitsandbytes (converters/bnb.py)


def check_settings(weights: str, group_size: int) -> None:
    """Raise QServeError unless (weights, group_size) is a format qserve writes."""
    if weights not in WEIGHT_CHOICES:
        raise QServeError(f"unknown --weights {weights!r}: use int4, int8 or nf4")
    if weights == "int4" and group_size not in GROUP_SIZES:
        raise QServeError(f"unsupported --group-size {group_size}: use 32, 64 or 128")


def quantize_weight(
    w: torch.Tensor, weights: str = "int4", group_size: int = 128, scale_dtype: torch.dtype | None = None
) -> QuantizedWeight:
    """Quantize a float (out_features, in_features) weight by round-to-nearest.

    int4: asymmetric, one fp scale and integer zero point per ``group_size`` inputs of each output row.
    int8: symmetric, one scale per output row (``group_size`` ignored). Scales keep ``w``'s float dtype
    unless ``scale_dtype`` says otherwise. ``QuantizedWeight.dequantize()`` returns the weight it stands for.

    Raises:
        QServeError: unknown format, a non-2-D or non-float weight, or a group size that does not divide
            in_features.
    """
    check_settings(weights, group_size)
    if w.dim() != 2 or not w.is_floating_point():
        raise QServeError(
            f"expected a float (out_features, in_features) weight, got {w.dtype} {tuple(w.shape)}"
        )
    if weights == "int4" and w.shape[1] % group_size:
        raise QServeError(f"group size {group_size} does not divide in_features {w.shape[1]}")
    return quantize(w, weights, group_size, scale_dtype)


def weight_error(w: torch.Tensor, qw: QuantizedWeight) -> dict[str, float]:
    """Relative Frobenius error and max abs error of the dequantized weight against ``w``."""
    wf = w.float()
    diff = qw.dequantize(torch.float32) - wf  # (N, K)
    norm = float(wf.norm())
    return {
        "rel_error": float(diff.norm()) / norm if norm > 0 else 0.0,
        "max_abs_error": float(diff.abs().max()),
    }
