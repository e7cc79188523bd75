"""Configuration: frozen dataclasses parsed once, then unpacked into plain values for the components.

`ModelConfig.from_pretrained` reads a Hugging Face `config.json` (transformers 4.x or 5.x style) without
importing transformers, so `qserve plan` and the converter can use it cheaply.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qserve.errors import QServeError, UnsupportedModelError

# Architectures we implement (models/registry.py maps them to classes). Order matters only for messages.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
)
# Of those, the ones whose attention biases q/k/v but not o_proj.
_QKV_BIAS_ONLY = ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")

_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def resolve_model_path(model: str | Path) -> Path:
    """Map a MODEL argument to a local directory. The word ``demo`` names the bundled demo model."""
    if str(model) == "demo":
        from qserve.demo import MODEL_DIR

        if not (MODEL_DIR / "config.json").is_file():
            raise QServeError(f"the bundled demo model is missing from {MODEL_DIR} (broken install?)")
        return MODEL_DIR
    path = Path(model).expanduser()
    if not path.exists():
        raise QServeError(
            f"model directory not found: {path} (give a local Hugging Face directory or 'demo')"
        )
    if not path.is_dir():
        raise QServeError(f"model must be a directory, got a file: {path}")
    if not (path / "config.json").is_file():
        raise QServeError(f"no config.json in {path}: not a Hugging Face model directory")
    return path


def canonical_dtype(name: str) -> str:
    """Normalise 'bf16', 'torch.bfloat16', 'half' ... to 'bfloat16' | 'float16' | 'float32'."""
    key = str(name).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise QServeError(f"unsupported dtype {name!r}: use float32, float16 or bfloat16")
    return _DTYPES[key]


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters, normalised from `rope_theta`/`rope_scaling` or v5 `rope_parameters`."""

    theta: float = 10000.0
    scaling_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position: int = 8192  # llama3 only
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class MoEConfig:
    """Sparse mixture-of-experts MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE), normalised from their configs.

    Routing, for every token: ``p = softmax(router_logits in float32)``, the ``top_k`` largest ``p``,
    divided by their sum when ``norm_topk_prob`` (always for Mixtral); Qwen casts those weights to the model
    dtype before scaling the expert outputs (``weights_in_float32`` False), Mixtral keeps them float32.
    """

    num_experts: int
    top_k: int
    intermediate_size: int  # of one expert (Mixtral: intermediate_size; Qwen: moe_intermediate_size)
    norm_topk_prob: bool
    weights_in_float32: bool
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: a dense expert every token takes, sigmoid-gated
    sparse_layers: tuple[int, ...] = ()  # decoder layers whose MLP is the MoE block; the rest are dense

    def __post_init__(self) -> None:
        if not 1 <= self.top_k <= self.num_experts:
            raise QServeError(
                f"num_experts_per_tok {self.top_k} must be in [1, num_experts {self.num_experts}]"
            )


def _num_experts(text: dict[str, Any], default: int) -> int:
    # Hub configs say num_experts (Qwen) or num_local_experts (Mixtral); transformers v5 writes the latter
    # for Qwen3-MoE too.
    return int(text.get("num_experts", text.get("num_local_experts", default)) or 0)


def _parse_moe(arch: str, text: dict[str, Any]) -> MoEConfig | None:
    if arch == "MixtralForCausalLM":
        layers = int(text["num_hidden_layers"])
        return MoEConfig(
            num_experts=_num_experts(text, 8),
            top_k=int(text.get("num_experts_per_tok", 2)),
            intermediate_size=int(text["intermediate_size"]),
            norm_topk_prob=True,
            weights_in_float32=True,
            sparse_layers=tuple(range(layers)),
        )
    if arch not in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        return None
    layers, experts = int(text["num_hidden_layers"]), _num_experts(text, 0)
    step = int(text.get("decoder_sparse_step", 1) or 1)
    dense_only = set(text.get("mlp_only_layers") or [])
    # transformers: layer i is sparse iff i not in mlp_only_layers and num_experts > 0 and (i + 1) % step == 0
    sparse = tuple(i for i in range(layers) if i not in dense_only and experts > 0 and (i + 1) % step == 0)
    if not sparse:
        return None
    shared = int(text.get("shared_expert_intermediate_size", 0) or 0) if arch == "Qwen2MoeForCausalLM" else 0
    return MoEConfig(
        num_experts=experts,
        top_k=int(text.get("num_experts_per_tok", 1)),
        intermediate_size=int(text["moe_intermediate_size"]),
        norm_topk_prob=bool(text.get("norm_topk_prob", False)),
        weights_in_float32=False,
        shared_expert_intermediate_size=shared,
        sparse_layers=sparse,
    )


@dataclass(frozen=True)
class ModelConfig:
    """What the runtime needs to know about a decoder-only checkpoint."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # < num_heads: GQA; == 1: MQA
    head_dim: int  # explicit in Qwen3/Mistral-Nemo configs; else hidden_size // num_heads
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # Qwen2: q/k/v carry a bias
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    sliding_window: int | None
    dtype: str  # the checkpoint's own float dtype
    hidden_act: str = "silu"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    quantization: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    moe: MoEConfig | None = None  # sparse MoE MLPs (Mixtral, Qwen2-MoE, Qwen3-MoE); None: dense

    @property
    def o_proj_bias(self) -> bool:
        """Qwen2 (and Qwen2-MoE) bias q/k/v only; Llama (attention_bias) and Qwen3 bias o_proj alike."""
        return self.attention_bias and self.architecture not in _QKV_BIAS_ONLY

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        path = resolve_model_path(path)
        try:
            raw = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise QServeError(f"{path / 'config.json'} is not valid JSON: {e}") from None
        gen = path / "generation_config.json"
        gen_raw = json.loads(gen.read_text()) if gen.is_file() else {}
        try:
            return cls.from_dict(raw, gen_raw)
        except KeyError as e:
            raise QServeError(f"{path / 'config.json'} has no {e.args[0]!r}, which the model needs") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], generation: dict[str, Any] | None = None) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            got = ", ".join(archs) or f"model_type={raw.get('model_type')!r}"
            raise UnsupportedModelError(
                f"unsupported architecture {got}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        text = raw.get("text_config") or raw
        num_heads = int(text["num_attention_heads"])
        hidden = int(text["hidden_size"])
        head_dim = text.get("head_dim") or hidden // num_heads
        act = text.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(
                f"unsupported hidden_act {act!r}: qserve implements silu (SwiGLU) MLPs"
            )
        dtype = canonical_dtype(text.get("torch_dtype") or text.get("dtype") or "float32")
        sliding = text.get("sliding_window")
        if arch.startswith("Qwen") and not text.get("use_sliding_window", False):
            sliding = None  # Qwen configs carry a window but only apply it when use_sliding_window is true
        eos: Any = (generation or {}).get("eos_token_id", text.get("eos_token_id"))
        eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
        return cls(
            architecture=arch,
            vocab_size=int(text["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(text["intermediate_size"]),
            num_layers=int(text["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(text.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope=_parse_rope(text),
            max_position_embeddings=int(text.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            attention_bias=bool(
                text.get("qkv_bias", True)
                if arch == "Qwen2MoeForCausalLM"
                else text.get("attention_bias", arch == "Qwen2ForCausalLM")
            ),
            mlp_bias=bool(text.get("mlp_bias", False)),
            qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            sliding_window=int(sliding) if sliding else None,
            dtype=dtype,
            hidden_act=act,
            eos_token_ids=eos_ids,
            bos_token_id=text.get("bos_token_id"),
            quantization=raw.get("quantization_config"),
            moe=_parse_moe(arch, text),
        )


def _parse_rope(text: dict[str, Any]) -> RopeConfig:
    # transformers v5 writes {"rope_parameters": {"rope_type", "rope_theta", "factor", ...}};
    # v4 writes rope_theta at top level and an optional rope_scaling dict.
    params = dict(text.get("rope_parameters") or {})
    scaling = dict(text.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = float(merged.get("rope_theta", text.get("rope_theta", 10000.0)))
    rtype = merged.get("rope_type") or merged.get("type") or "default"
    if rtype not in ("default", "linear", "llama3"):
        raise UnsupportedModelError(
            f"unsupported rope type {rtype!r}: qserve implements default, linear, llama3"
        )
    factor = float(merged.get("factor", 1.0)) if rtype != "default" else 1.0
    if not math.isfinite(factor) or factor <= 0:
        raise QServeError(f"invalid rope scaling factor {factor}")
    return RopeConfig(
        theta=theta,
        scaling_type=rtype,
        factor=factor,
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position=int(merged.get("original_max_position_embeddings", 8192)),
        partial_rotary_factor=float(
            merged.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0))
        ),
    )


@dataclass(frozen=True)
class EngineConfig:
    """Everything an LLMEngine is built from; unpacked into plain values for each component."""

    model: str
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto = the checkpoint's own float dtype
    kv_cache_dtype: str = "auto"
    kv_cache_memory: int | None = None  # bytes for the KV pool; None: sized from max_num_seqs x max_model_len
    max_num_seqs: int = 256  # most sequences decoding at once
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_batched_tokens: int = 2048  # per-step token budget; longer prompts are prefilled in chunks
    block_size: int = 16  # tokens per KV block
    seed: int = 0  # for requests without their own seed
    enable_prefix_caching: bool = True  # share KV blocks of identical prompt prefixes across requests
    # True: run every step eagerly (no torch.compile). Default from QSERVE_ENFORCE_EAGER=1, else False.
    enforce_eager: bool = field(default_factory=lambda: os.environ.get("QSERVE_ENFORCE_EAGER") == "1")
    # True: schedule and launch step N+1 before step N's outputs are detokenized and sent (vLLM's name)
    async_scheduling: bool = field(default_factory=lambda: os.environ.get("QSERVE_ASYNC_SCHEDULING") == "1")

    def __post_init__(self) -> None:
        """Check every value before anything loads; a SIZE string for kv_cache_memory becomes bytes
        (``"2GiB"``, as the CLI takes it)."""
        check_choice("device", self.device, DEVICES)
        if self.dtype != "auto":
            canonical_dtype(self.dtype)
        kv = str(self.kv_cache_dtype).lower()
        if kv not in KV_CACHE_DTYPES and kv not in KV_DTYPE_ALIASES:
            check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        mem = self.kv_cache_memory
        if isinstance(mem, str):
            from qserve.utils import parse_size

            object.__setattr__(self, "kv_cache_memory", parse_size(mem))
        elif mem is not None and (isinstance(mem, bool) or not isinstance(mem, int) or mem <= 0):
            raise QServeError(
                f"kv_cache_memory must be a positive byte count or a size such as 2GiB, got {mem!r}"
            )
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            check_positive(name, getattr(self, name))
        if self.max_model_len is not None:
            check_positive("max_model_len", self.max_model_len)


DEVICES = ("auto", "cpu", "cuda")
KV_CACHE_DTYPES = ("auto", "fp16", "bf16", "fp32", "int8", "int4")
KV_DTYPE_ALIASES = ("float32", "float16", "half", "bfloat16")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise QServeError(f"unsupported {name} {value!r}: choose from {', '.join(choices)}")


def check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise QServeError(f"{name} must be a positive integer, got {value!r}")


def check_max_model_len(config: EngineConfig) -> None:
    """Refuse a max_model_len beyond the model's positions (reads only config.json): the engine would
    otherwise clamp it silently."""
    if config.max_model_len is None:
        return
    limit = ModelConfig.from_pretrained(config.model).max_position_embeddings
    if config.max_model_len > limit:
        raise QServeError(
            f"max_model_len {config.max_model_len} is more than the model's {limit} positions "
            f"(max_position_embeddings in config.json)"
        )
