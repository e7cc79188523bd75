"""Config parsing: architectures, head_dim, GQA/MQA, RoPE in both config styles, sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qserve.config import ModelConfig, resolve_model_path
from qserve.errors import QServeError, UnsupportedModelError
from qserve.layers.rotary import rope_inv_freq
from qserve.utils import parse_size

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "num_hidden_layers": 32,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "eos_token_id": [128001, 128008, 128009],
    "tie_word_embeddings": False,
}


def test_llama31_legacy_and_v5_rope_agree() -> None:
    legacy = ModelConfig.from_dict(LLAMA31_8B)
    v5 = dict(LLAMA31_8B)
    v5.pop("rope_theta")
    v5["rope_parameters"] = {**v5.pop("rope_scaling"), "rope_theta": 500000.0}
    new = ModelConfig.from_dict(v5)
    assert legacy == new
    assert (
        legacy.rope.scaling_type == "llama3" and legacy.rope.factor == 8.0 and legacy.rope.theta == 500000.0
    )
    assert (legacy.head_dim, legacy.num_kv_heads, legacy.dtype) == (128, 8, "bfloat16")
    assert legacy.eos_token_ids == (128001, 128008, 128009)


def test_llama3_inv_freq_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = LlamaConfig(**{k: v for k, v in LLAMA31_8B.items() if k != "architectures"})
    hf_inv, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = rope_inv_freq(ModelConfig.from_dict(LLAMA31_8B).rope, 128)
    assert ours.tolist() == hf_inv.tolist()


def test_explicit_head_dim_qk_norm_and_qwen2_window() -> None:
    qwen3 = ModelConfig.from_dict(
        {**LLAMA31_8B, "architectures": ["Qwen3ForCausalLM"], "head_dim": 256, "rope_scaling": None}
    )
    assert qwen3.head_dim == 256 and qwen3.qk_norm and qwen3.q_size == 32 * 256
    qwen2 = ModelConfig.from_dict(
        {
            **LLAMA31_8B,
            "architectures": ["Qwen2ForCausalLM"],
            "rope_scaling": None,
            "sliding_window": 4096,
            "use_sliding_window": False,
        }
    )
    assert qwen2.attention_bias and qwen2.sliding_window is None
    mistral = ModelConfig.from_dict(
        {
            **LLAMA31_8B,
            "architectures": ["MistralForCausalLM"],
            "num_key_value_heads": 1,
            "rope_scaling": None,
            "sliding_window": 4096,
        }
    )
    assert mistral.num_kv_heads == 1 and mistral.sliding_window == 4096


def test_unknown_architecture_names_supported_ones() -> None:
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        ModelConfig.from_dict({**LLAMA31_8B, "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(UnsupportedModelError, match="rope type 'yarn'"):
        ModelConfig.from_dict({**LLAMA31_8B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_missing_config_field_is_named(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64})
    )
    with pytest.raises(QServeError, match="has no 'num_attention_heads'"):
        ModelConfig.from_pretrained(tmp_path)


def test_resolve_model_path_errors(tmp_path: Path) -> None:
    with pytest.raises(QServeError, match="not found"):
        resolve_model_path(tmp_path / "nope")
    with pytest.raises(QServeError, match="no config.json"):
        resolve_model_path(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(QServeError, match="not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B))
    assert ModelConfig.from_pretrained(tmp_path).num_layers == 32


@pytest.mark.parametrize(
    ("text", "value"),
    [("64MiB", 64 << 20), ("24GiB", 24 << 30), ("1.5GB", 1_500_000_000), ("4096", 4096), ("2 kib", 2048)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "12 parsecs", "-1GiB", "0"])
def test_parse_size_errors(text: str) -> None:
    with pytest.raises(QServeError):
        parse_size(text)
