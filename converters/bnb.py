"""`qserve convert --weights nf4`: quantize through bitsandbytes' own ``quantize_4bit``, written exactly as
transformers saves a ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` model.

Per projection ``P`` of weight (N, K): ``P.weight`` uint8 (ceil(N K / 2), 1) packed nf4 codes, ``P.weight.absmax``
float32 (ceil(N K / 64),), ``P.weight.quant_map`` float32 (16,), ``P.weight.quant_state.bitsandbytes__nf4``
uint8 (the packed JSON of shape, dtype, blocksize 64). Blocksize 64, no double quantization: transformers'
defaults. The result loads in qserve (:class:`qserve.layers.bnb_linear.Bnb4bitLinear`) and in transformers.
"""

from __future__ import annotations

from typing import Any

import torch

from qserve.converters.stream import OutputTensor

BLOCKSIZE = 64  # bitsandbytes' and transformers' default 4-bit block
QUANT_TYPE = "nf4"


def bnb_config(compute_dtype: str) -> dict[str, Any]:
    """The quantization_config transformers writes for BitsAndBytesConfig(load_in_4bit, nf4)."""
    return {
        "quant_method": "bitsandbytes",
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "bnb_4bit_quant_type": QUANT_TYPE,
        "bnb_4bit_use_double_quant": False,
        "bnb_4bit_compute_dtype": compute_dtype,
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
    }


def _state_len(n: int, k: int, dtype: torch.dtype) -> int:
    """Bytes of the packed quant-state JSON of an (n, k) weight (it depends only on shape and dtype)."""
    from qserve.utils import import_bitsandbytes

    QuantState = import_bitsandbytes().functional.QuantState  # noqa: N806 (bitsandbytes' class)
    qs = QuantState(torch.zeros(1), torch.Size([n, k]), torch.zeros(16), BLOCKSIZE, QUANT_TYPE, dtype)
    return int(qs.as_dict(packed=True)[f"quant_state.bitsandbytes__{QUANT_TYPE}"].numel())


def nf4_outputs(module: str, n: int, k: int, dtype: torch.dtype) -> list[OutputTensor]:
    """Planned output tensors of one projection (names, dtypes, shapes), before any quantization runs."""
    elems = n * k
    return [
        OutputTensor(f"{module}.weight", torch.uint8, ((elems + 1) // 2, 1)),
        OutputTensor(f"{module}.weight.absmax", torch.float32, (-(-elems // BLOCKSIZE),)),
        OutputTensor(f"{module}.weight.quant_map", torch.float32, (16,)),
        OutputTensor(
            f"{module}.weight.quant_state.bitsandbytes__{QUANT_TYPE}", torch.uint8, (_state_len(n, k, dtype),)
        ),
    ]


def quantize_nf4(module: str, w: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """bitsandbytes' quantize_4bit of one (N, K) weight -> (output tensors by name, error statistics)."""
    from qserve.utils import import_bitsandbytes

    bnbf = import_bitsandbytes().functional

    packed, qs = bnbf.quantize_4bit(w.contiguous(), blocksize=BLOCKSIZE, quant_type=QUANT_TYPE)
    out = {f"{module}.weight": packed}
    out |= {f"{module}.weight.{k}": v for k, v in qs.as_dict(packed=True).items()}
    wf = w.float()
    diff = bnbf.dequantize_4bit(packed, qs).float() - wf
    norm = float(wf.norm())
    stats = {
        "rel_error": float(diff.norm()) / norm if norm > 0 else 0.0,
        "max_abs_error": float(diff.abs().max()),
    }
    return out, stats
