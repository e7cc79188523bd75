"""What `qserve plan` knows of a model and a GPU before loading anything.

* Offline presets: well-known models as their published ``config.json`` essentials (parsed by the same
  :meth:`qserve.config.ModelConfig.from_dict` as a real checkpoint) and GPUs with memory, bandwidth, FLOP/s.
* :class:`WeightInventory`: the projections' shapes and the float rest, from a config or, for a local
  directory, from its safetensors headers (only the header JSON of each shard is read, never the data),
  so a checkpoint's bytes are exact and a qserve-converted one counts its real packed bytes.
* :func:`linear_bytes`: the bytes of one projection in qserve's weight layout (docs/FORMAT.md).
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qserve.config import ModelConfig, resolve_model_path
from qserve.errors import QServeError

GROUP_SIZE = 128  # int4 group size assumed for what-if plans (qserve convert's default)
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
# attention, dense MLP, MoE experts (Qwen: mlp.experts.{e}; Mixtral: block_sparse_moe.experts.{e}) and the
# shared expert; group 1 says whether the projection is a routed expert's
_LINEAR_RE = re.compile(
    r"\.layers\.\d+\.(?:self_attn|mlp|block_sparse_moe)\.(experts\.\d+\.|shared_expert\.)?(\w+)\.(\w+)$"
)
if TYPE_CHECKING:
    from qserve.kernels.packing import QuantSpec

FLOAT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp32": 4, "fp16": 2, "bf16": 2}

_LLAMA = {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16", "rope_theta": 500000.0}
_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "torch_dtype": "bfloat16", "rope_theta": 1000000.0}
_QWEN3 = {"architectures": ["Qwen3ForCausalLM"], "torch_dtype": "bfloat16", "rope_theta": 1000000.0}
_MIXTRAL = {"architectures": ["MixtralForCausalLM"], "torch_dtype": "bfloat16", "rope_theta": 1000000.0}
_QWEN3_MOE = {"architectures": ["Qwen3MoeForCausalLM"], "torch_dtype": "bfloat16", "rope_theta": 1000000.0}


def _cfg(base: dict[str, Any], h: int, i: int, layers: int, heads: int, kv: int, d: int, vocab: int,
         tie: bool, max_pos: int) -> dict[str, Any]:  # fmt: skip
    return {
        **base,
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": d,
        "vocab_size": vocab,
        "tie_word_embeddings": tie,
        "max_position_embeddings": max_pos,
    }


# Hugging Face Hub name -> config.json essentials. Instruct variants share their base model's shapes.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.2-1B": _cfg(_LLAMA, 2048, 8192, 16, 32, 8, 64, 128256, True, 131072),
    "meta-llama/Llama-3.2-3B": _cfg(_LLAMA, 3072, 8192, 28, 24, 8, 128, 128256, True, 131072),
    "meta-llama/Llama-3.1-8B": _cfg(_LLAMA, 4096, 14336, 32, 32, 8, 128, 128256, False, 131072),
    "meta-llama/Llama-3.1-70B": _cfg(_LLAMA, 8192, 28672, 80, 64, 8, 128, 128256, False, 131072),
    "mistralai/Mistral-7B-v0.3": {
        **_cfg(_LLAMA, 4096, 14336, 32, 32, 8, 128, 32768, False, 32768),
        "architectures": ["MistralForCausalLM"],
        "rope_theta": 1000000.0,
    },
    "Qwen/Qwen2.5-7B": _cfg(_QWEN2, 3584, 18944, 28, 28, 4, 128, 152064, False, 131072),
    "Qwen/Qwen2.5-14B": _cfg(_QWEN2, 5120, 13824, 48, 40, 8, 128, 152064, False, 131072),
    "Qwen/Qwen2.5-32B": _cfg(_QWEN2, 5120, 27648, 64, 40, 8, 128, 152064, False, 131072),
    "Qwen/Qwen2.5-72B": _cfg(_QWEN2, 8192, 29568, 80, 64, 8, 128, 152064, False, 131072),
    "Qwen/Qwen3-8B": _cfg(_QWEN3, 4096, 12288, 36, 32, 8, 128, 151936, False, 40960),
    "Qwen/Qwen3-32B": _cfg(_QWEN3, 5120, 25600, 64, 64, 8, 128, 151936, False, 40960),
    # MoE: 8 experts of 14336, top-2 (46.7B total, 12.9B active)
    "mistralai/Mixtral-8x7B-v0.1": {
        **_cfg(_MIXTRAL, 4096, 14336, 32, 32, 8, 128, 32000, False, 32768),
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    },
    # MoE: 128 experts of 768, top-8, renormalised (30.5B total, 3.3B active)
    "Qwen/Qwen3-30B-A3B": {
        **_cfg(_QWEN3_MOE, 2048, 6144, 48, 32, 4, 128, 151936, False, 40960),
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    },
}
_MODEL_ALIASES = {"mistral-7b": "mistral-7b-v0.3", "mixtral-8x7b": "mixtral-8x7b-v0.1"}


@dataclass(frozen=True)
class GPUPreset:
    """One accelerator: its memory as the driver reports it, and its roofline ceilings."""

    name: str
    memory_bytes: int  # total device memory (nvidia-smi's MiB figure)
    bandwidth: float  # bytes/s, peak DRAM bandwidth
    flops: float  # dense fp16/bf16 tensor-core FLOP/s (no sparsity)


_MIB = 1 << 20
GPU_PRESETS: dict[str, GPUPreset] = {
    g.name.lower(): g
    for g in (
        GPUPreset("H100-80GB", 81559 * _MIB, 3.35e12, 989e12),  # SXM5
        GPUPreset("H200", 143771 * _MIB, 4.8e12, 989e12),  # 141 GB HBM3e
        GPUPreset("A100-40GB", 40960 * _MIB, 1.555e12, 312e12),
        GPUPreset("A100-80GB", 81920 * _MIB, 2.039e12, 312e12),  # SXM4
        GPUPreset("L40S", 46068 * _MIB, 0.864e12, 362e12),
        GPUPreset("L4", 23034 * _MIB, 0.3e12, 121e12),
        GPUPreset("RTX-4090", 24564 * _MIB, 1.008e12, 165e12),
    )
}
_GPU_ALIASES = {"h100": "h100-80gb", "4090": "rtx-4090", "rtx4090": "rtx-4090"}


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", "-", name.strip().lower())


def short_name(hub_name: str) -> str:
    """'meta-llama/Llama-3.1-8B' -> 'llama-3.1-8b'."""
    return hub_name.rpartition("/")[2].lower()


def model_preset_names() -> list[str]:
    return [short_name(n) for n in MODEL_PRESETS]


def find_model_preset(name: str) -> tuple[str, dict[str, Any]] | None:
    """Hub name or short name (case-insensitive; ``-Instruct`` variants allowed) -> (hub name, config)."""
    key = _key(name).replace("-instruct", "")
    key = _MODEL_ALIASES.get(key, key)
    for hub, cfg in MODEL_PRESETS.items():
        if key in (hub.lower(), short_name(hub)):
            return hub, cfg
    return None


def find_gpu(name: str) -> GPUPreset:
    key = _key(name)
    gpu = GPU_PRESETS.get(_GPU_ALIASES.get(key, key))
    if gpu is None:
        known = ", ".join(g.name for g in GPU_PRESETS.values())
        raise QServeError(f"unknown GPU {name!r}; known: {known}")
    return gpu


# ----------------------------------------------------------------------------- weight bytes


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def linear_bytes(n: int, k: int, weights: str, group_size: int = GROUP_SIZE, scale_bytes: int = 2) -> int:
    """Bytes of one (out_features n, in_features k) projection stored as ``weights`` (docs/FORMAT.md)."""
    if weights == "int8":
        return n * k + n * scale_bytes  # int8 codes + one scale per output channel
    if weights == "int4":
        return n * cdiv(k, 2) + n * cdiv(k, group_size) * (scale_bytes + 1)  # codes + scale + uint8 zero
    return n * k * FLOAT_BYTES[weights]


@dataclass(frozen=True)
class WeightInventory:
    """What weight bytes depend on: the projections' shapes, the float rest, and the bytes as stored."""

    linears: tuple[tuple[int, int], ...]  # (out, in) of every quantizable projection, routed experts included
    float_elems: int  # embeddings, lm_head, norms, biases, MoE routers: always float
    stored: str  # how the checkpoint holds its projections: float32 | float16 | bfloat16 | int8 | int4
    stored_bytes: int  # exact bytes the engine holds for weights="auto"
    # MoE: the routed experts' projections (a subset of `linears`), and the share a token multiplies through
    expert_linears: tuple[tuple[int, int], ...] = ()
    active_fraction: float = 1.0  # top_k / num_experts
    stored_expert_bytes: int = 0  # exact stored bytes of the routed experts (weights="auto")

    def nbytes(self, weights: str) -> int:
        if weights == "auto":
            return self.stored_bytes
        return sum(linear_bytes(n, k, weights) for n, k in self.linears) + 2 * self.float_elems

    def expert_nbytes(self, weights: str) -> int:
        """Bytes of all routed experts as ``weights`` (0 for a dense model): resident, every one of them."""
        if weights == "auto":
            return self.stored_expert_bytes
        return sum(linear_bytes(n, k, weights) for n, k in self.expert_linears)

    def active_expert_nbytes(self, weights: str) -> int:
        """Routed-expert bytes one token reads: top_k of num_experts in every sparse layer."""
        return int(self.expert_nbytes(weights) * self.active_fraction)

    @property
    def num_params(self) -> int:
        return sum(n * k for n, k in self.linears) + self.float_elems

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies through (= num_params for a dense model)."""
        experts = sum(n * k for n, k in self.expert_linears)
        return self.num_params - experts + int(experts * self.active_fraction)


def inventory_from_config(cfg: ModelConfig) -> WeightInventory:
    """Parameter shapes of a Llama-family decoder (dense or MoE), from its config alone."""
    h, i, q, kv, d = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size, cfg.head_dim
    attn = [(q, h), (kv, h), (kv, h), (h, q)]
    extra = 2 * h + (2 * d if cfg.qk_norm else 0) + ((q + 2 * kv) if cfg.attention_bias else 0)
    extra += (2 * i + h) if cfg.mlp_bias else 0
    float_elems = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2) + h + cfg.num_layers * extra
    linears: list[tuple[int, int]] = []
    experts: list[tuple[int, int]] = []
    moe = cfg.moe
    for layer in range(cfg.num_layers):
        linears += attn
        if moe is None or layer not in moe.sparse_layers:
            linears += [(i, h), (i, h), (h, i)]
            continue
        e_i = moe.intermediate_size
        experts += [(e_i, h), (e_i, h), (h, e_i)] * moe.num_experts
        float_elems += moe.num_experts * h  # the router
        if moe.shared_expert_intermediate_size:
            s_i = moe.shared_expert_intermediate_size
            linears += [(s_i, h), (s_i, h), (h, s_i)]
            float_elems += h  # shared_expert_gate
    linears += experts
    params = sum(n * k for n, k in linears) + float_elems
    fb = FLOAT_BYTES[cfg.dtype]
    active = moe.top_k / moe.num_experts if moe else 1.0
    expert_bytes = sum(n * k for n, k in experts) * fb
    return WeightInventory(
        tuple(linears), float_elems, cfg.dtype, params * fb, tuple(experts), active, expert_bytes
    )


def read_safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON); data is not read."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise QServeError(f"{file} is not a safetensors file (too short)")
        (length,) = struct.unpack("<Q", raw)
        if length > 100 << 20:
            raise QServeError(f"{file} is not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise QServeError(f"{file} has a corrupt safetensors header") from None
    header.pop("__metadata__", None)
    return dict(header)


def inventory_from_dir(path: Path, cfg: ModelConfig) -> WeightInventory:
    """Exact stored bytes from the safetensors headers; shapes of the projections for what-if plans."""
    from qserve.kernels.packing import QuantSpec
    from qserve.models.loader import checkpoint_files

    if not list(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
        return inventory_from_config(cfg)
    try:
        quant = QuantSpec.from_config(cfg.quantization)
    except ValueError as e:
        raise QServeError(str(e)) from None
    linears: list[tuple[int, int]] = []
    experts: list[tuple[int, int]] = []
    float_elems = float_bytes = stored_bytes = expert_bytes = 0
    for file in checkpoint_files(path):
        for name, t in read_safetensors_header(file).items():
            if name.endswith("rotary_emb.inv_freq"):
                continue
            shape, nbytes = t["shape"], t["data_offsets"][1] - t["data_offsets"][0]
            m = _LINEAR_RE.search(name)
            kind, leaf, suffix = (m.group(1) or "", m.group(2), m.group(3)) if m else ("", "", "")
            routed = kind.startswith("experts.")
            if leaf in LINEAR_LEAVES and suffix in ("weight", "qweight"):
                linears.append(_linear_shape(shape, suffix, quant))
                if routed:
                    experts.append(linears[-1])
            elif not (leaf in LINEAR_LEAVES and suffix in ("scales", "qzeros", "g_idx")):
                float_elems += math.prod(shape)
                float_bytes += nbytes
            stored_bytes += nbytes
            expert_bytes += nbytes if routed and leaf in LINEAR_LEAVES else 0
    if quant and quant.source == "bnb":  # packed (N K / 2, 1) codes: shapes from the config, bytes as stored
        shapes = inventory_from_config(cfg)
        linears, experts, float_elems = list(shapes.linears), list(shapes.expert_linears), shapes.float_elems
    elif quant and quant.source != "qserve":  # AutoAWQ / GPTQ: re-packed into qserve's layout at load
        stored_bytes = float_bytes + sum(linear_bytes(n, k, "int4", quant.group_size) for n, k in linears)
        expert_bytes = sum(linear_bytes(n, k, "int4", quant.group_size) for n, k in experts)
    moe = cfg.moe
    active = moe.top_k / moe.num_experts if moe else 1.0
    stored = quant.weights if quant else cfg.dtype
    return WeightInventory(
        tuple(linears), float_elems, stored, stored_bytes, tuple(experts), active, expert_bytes
    )


def _linear_shape(shape: list[int], suffix: str, quant: QuantSpec | None) -> tuple[int, int]:
    if suffix == "weight" or quant is None or quant.weights == "int8" and quant.source == "qserve":
        return shape[0], shape[1]
    if quant.source == "awq":  # int32 (K, N / 8)
        return shape[1] * 8, shape[0]
    if quant.source == "gptq":  # int32 (K / 8, N)
        return shape[1], shape[0] * 8
    return shape[0], shape[1] * 2  # qserve int4: uint8 (N, K / 2)


@dataclass(frozen=True)
class ModelSource:
    """A model to plan for: a local directory (exact header bytes) or an offline preset."""

    name: str  # the directory, or the preset's Hugging Face name
    kind: str  # "directory" | "preset"
    config: ModelConfig
    inventory: WeightInventory


def load_model_source(model: str) -> ModelSource:
    """A model directory, 'demo', or a preset name (Hub-style or short, case-insensitive)."""
    if model == "demo" or Path(model).expanduser().exists():
        path = resolve_model_path(model)
        cfg = ModelConfig.from_pretrained(path)
        return ModelSource(str(path), "directory", cfg, inventory_from_dir(path, cfg))
    found = find_model_preset(model)
    if found is None:
        raise QServeError(
            f"unknown model {model!r}: not a local directory and not a preset "
            f"(presets: {', '.join(model_preset_names())})"
        )
    cfg = ModelConfig.from_dict(found[1])
    return ModelSource(found[0], "preset", cfg, inventory_from_config(cfg))
