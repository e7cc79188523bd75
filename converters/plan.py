"""Conversion plan: which source tensors become which output tensors, validated before a byte is written.

A plan is a list of :class:`Unit` in output order (non-layer tensors first, then layer by layer, so the
activation-aware pass can stream through the decoder). Every output's dtype and shape is known here,
which lets the writer lay out shard headers up front.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from qserve.converters.stream import OutputTensor, SourceCheckpoint, TensorInfo
from qserve.errors import QServeError, UnsupportedModelError
from qserve.kernels.packing import QuantSpec

# Decoder projections we quantize (Hugging Face names): attention, dense MLPs, MoE experts
# (`mlp.experts.{e}.*_proj`; Mixtral's `block_sparse_moe.experts.{e}.w1|w2|w3`) and Qwen2-MoE's shared
# expert. Embeddings, norms, lm_head and the MoE routers (`mlp.gate`, `shared_expert_gate`) stay in float.
LINEAR_LEAVES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "w1",
    "w2",
    "w3",
)
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_LINEAR_RE = re.compile(
    r"^(?P<module>.*\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp|block_sparse_moe)\."
    r"(?P<expert>experts\.\d+\.|shared_expert\.)?(?P<leaf>\w+))\.(?P<suffix>\w+)$"
)
_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
_SKIP = ("rotary_emb.inv_freq",)  # buffers some exporters save; recomputed at load
_IMPORTED = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class Target:
    """What to write: int4/int8, group size, and the source's quantization (None: a float checkpoint)."""

    weights: str
    group_size: int  # -1 for int8
    source: QuantSpec | None = None


@dataclass
class Unit:
    """One step of the conversion: source tensors in (by suffix), planned output tensors out."""

    kind: str  # "copy" | "quantize" (float linear weight) | "import" (AutoAWQ / GPTQ linear)
    module: str  # the tensor name (copy) or the linear's module prefix
    inputs: dict[str, str]  # suffix -> source tensor name
    outputs: list[OutputTensor]
    layer: int | None = None
    leaf: str = ""  # q_proj, ... for linears
    source_bytes: int = 0
    meta: dict[str, object] = field(default_factory=dict)


def quantized_outputs(
    module: str, n: int, k: int, weights: str, group: int, scale_dtype: torch.dtype
) -> list[OutputTensor]:
    """Output tensors of one quantized linear in qserve's layout (kernels/packing.py)."""
    if weights == "int8":
        return [
            OutputTensor(f"{module}.qweight", torch.int8, (n, k)),
            OutputTensor(f"{module}.scales", scale_dtype, (n,)),
        ]
    return [
        OutputTensor(f"{module}.qweight", torch.uint8, (n, k // 2)),
        OutputTensor(f"{module}.qzeros", torch.uint8, (n, k // group)),
        OutputTensor(f"{module}.scales", scale_dtype, (n, k // group)),
    ]


def plan(src: SourceCheckpoint, target: Target) -> list[Unit]:
    """Units in output order. Raises QServeError for unsupported dtypes or group sizes."""
    units: list[Unit] = []
    linears: dict[str, dict[str, TensorInfo]] = {}
    for name, info in src.tensors.items():
        if name.endswith(_SKIP):
            continue
        m = _LINEAR_RE.match(name)
        expert_only = m is not None and m["leaf"] in ("w1", "w2", "w3") and not m["expert"]
        if m and m["leaf"] in LINEAR_LEAVES and m["suffix"] != "bias" and not expert_only:
            linears.setdefault(m["module"], {})[m["suffix"]] = info
            continue
        if info.dtype not in FLOAT_DTYPES:
            raise UnsupportedModelError(
                f"unsupported dtype {info.dtype} for {name}: qserve converts F16, BF16 or F32 weights"
            )
        units.append(
            Unit(
                "copy",
                name,
                {"": name},
                [OutputTensor(name, FLOAT_DTYPES[info.dtype], info.shape)],
                _layer(name),
                source_bytes=info.nbytes,
            )
        )
    for module, parts in linears.items():
        units.append(_linear_unit(module, parts, target))
    units.sort(key=lambda u: (-1 if u.layer is None else u.layer, u.module))
    return units


def _layer(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def _linear_unit(module: str, parts: dict[str, TensorInfo], target: Target) -> Unit:
    leaf, layer = module.rpartition(".")[2], _layer(f"{module}.")
    size = sum(p.nbytes for p in parts.values())
    if "qweight" in parts:
        if target.source is None:
            raise QServeError(f"{module} holds quantized tensors but config.json has no quantization_config")
        return _import_unit(module, parts, target.source, leaf, layer, size)
    if set(parts) != {"weight"}:
        raise UnsupportedModelError(f"unexpected tensors for {module}: {', '.join(sorted(parts))}")
    w = parts["weight"]
    if w.dtype not in FLOAT_DTYPES:
        raise UnsupportedModelError(
            f"unsupported dtype {w.dtype} for {w.name}: qserve converts F16, BF16 or F32 weights"
        )
    if len(w.shape) != 2:
        raise UnsupportedModelError(f"{w.name} is not a matrix: shape {w.shape}")
    n, k = w.shape
    if target.weights == "int4" and k % target.group_size:  # (nf4 blocks run over the flattened weight)
        raise QServeError(f"group size {target.group_size} does not divide in_features {k} of {w.name}")
    dtype = FLOAT_DTYPES[w.dtype]
    if target.weights == "nf4":
        from qserve.converters.bnb import nf4_outputs

        outs = nf4_outputs(module, n, k, dtype)
    else:
        outs = quantized_outputs(module, n, k, target.weights, target.group_size, dtype)
    return Unit("quantize", module, {"weight": w.name}, outs, layer, leaf, size, {"shape": [n, k]})


def _import_unit(
    module: str, parts: dict[str, TensorInfo], spec: QuantSpec, leaf: str, layer: int | None, size: int
) -> Unit:
    missing = {"qweight", "qzeros", "scales"} - set(parts)
    extra = set(parts) - set(_IMPORTED)
    if missing or extra:
        raise UnsupportedModelError(
            f"{module}: not a {spec.source} layout (missing {sorted(missing)}, unexpected {sorted(extra)})"
        )
    qweight, scales = parts["qweight"], parts["scales"]
    if qweight.dtype != "I32" or scales.dtype not in FLOAT_DTYPES or len(scales.shape) != 2:
        raise UnsupportedModelError(
            f"{module}: unsupported {spec.source} dtypes qweight {qweight.dtype}, scales {scales.dtype}"
        )
    k = qweight.shape[0] if spec.source == "awq" else qweight.shape[0] * 8
    n = scales.shape[1]
    if k % spec.group_size or scales.shape[0] != k // spec.group_size:
        raise QServeError(
            f"{module}: scales {scales.shape} do not match group size {spec.group_size} of {k} inputs"
        )
    outs = quantized_outputs(module, n, k, "int4", spec.group_size, FLOAT_DTYPES[scales.dtype])
    inputs = {s: p.name for s, p in parts.items()}
    return Unit("import", module, inputs, outs, layer, leaf, size, {"shape": [n, k]})
