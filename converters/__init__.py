"""Offline conversion into qserve's quantized format: round-to-nearest and activation-aware (AWQ-style)
quantization of float checkpoints, and bit-exact re-packing of AutoAWQ (GEMM) and GPTQ checkpoints.

The tensor layout lives in :mod:`qserve.kernels.packing` (documented in docs/FORMAT.md).
"""

from __future__ import annotations

if __name__ != "qserve.converters":  # imported as bare `converters` because the repo root is on sys.path
    from qserve.kernels._bare_name import hand_over

    hand_over(__name__, __file__)
else:
    from qserve.converters.convert import convert
    from qserve.converters.rtn import quantize_weight
    from qserve.kernels.packing import QuantizedWeight

    __all__ = ["QuantizedWeight", "convert", "quantize_weight"]
