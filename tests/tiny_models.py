"""Builders for tiny random Hugging Face checkpoints (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

EOS_ID = 256  # byte-level tokenizer below: ids 0..255 are bytes, 256 is <|endoftext|>

BASE: dict[str, Any] = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    initializer_range=0.2,  # peaky logits, so fp32 argmax ties between implementations are unlikely
    tie_word_embeddings=False,
    eos_token_id=EOS_ID,
    bos_token_id=None,
)

ARCH_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(
        architectures=["LlamaForCausalLM"],
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        rope_theta=500000.0,
    ),
    "mistral": dict(architectures=["MistralForCausalLM"], num_key_value_heads=1, sliding_window=None),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True),
    "qwen3": dict(
        architectures=["Qwen3ForCausalLM"], head_dim=32, rope_scaling=dict(rope_type="linear", factor=2.0)
    ),
    # MoE: every layer sparse, 4 experts, top-2, always renormalised
    "mixtral": dict(architectures=["MixtralForCausalLM"], num_local_experts=4, num_experts_per_tok=2),
    # shared expert + sigmoid gate, no renormalisation, layer 1 dense (mlp_only_layers), q/k/v bias
    "qwen2_moe": dict(
        architectures=["Qwen2MoeForCausalLM"],
        num_hidden_layers=3,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=64,
        mlp_only_layers=[1],
        norm_topk_prob=False,
    ),
    # norm_topk_prob, top-3, decoder_sparse_step 2 (layers 1 and 3 sparse), q/k norm
    "qwen3_moe": dict(
        architectures=["Qwen3MoeForCausalLM"],
        num_hidden_layers=4,
        head_dim=32,
        num_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=32,
        decoder_sparse_step=2,
        norm_topk_prob=True,
    ),
}
MODEL_TYPES = {a: a for a in ARCH_CONFIGS}  # our short names are transformers' model_type


def write_byte_tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_unicode = pre_tokenizers.ByteLevel.alphabet()
    alphabet = sorted(byte_to_unicode)
    # order the vocab by the byte each symbol stands for, so token id == byte value
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.add_special_tokens({"eos_token": "<|endoftext|>"})
    assert fast.eos_token_id == EOS_ID, fast.eos_token_id
    fast.save_pretrained(str(out))


def _bytes_to_unicode() -> dict[int, str]:
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def make_tiny_model(
    out: Path,
    arch: str = "llama",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    shards: int = 1,
    **overrides: Any,
) -> Path:
    """Write a random tiny model of ``arch`` (a key of ARCH_CONFIGS) as a Hugging Face directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {**BASE, **ARCH_CONFIGS[arch], **overrides}
    model_type = MODEL_TYPES[arch]
    config = AutoConfig.for_model(model_type, **raw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # biases default to zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    model = model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    shard_size = total // shards + 1 if shards > 1 else "5GB"
    model.save_pretrained(str(out), max_shard_size=shard_size)
    write_byte_tokenizer(out)
    return out


def rewrite_config(path: Path, **changes: Any) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
