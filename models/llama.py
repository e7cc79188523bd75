"""The Llama family: Llama, Mistral, Qwen2 (q/k/v bias) and Qwen3 (q/k RMSNorm) share one decoder; so do
their MoE siblings Mixtral, Qwen2-MoE and Qwen3-MoE, whose sparse layers' MLP is `models/moe.py`'s block.

Parameter names follow Hugging Face's, except that q/k/v and gate/up projections are fused
(``qkv_proj``, ``gate_up_proj``) so a step runs two matmuls fewer per layer; `FUSED_PROJECTIONS`
tells the loader how checkpoint tensors map onto them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from qserve.config import ModelConfig
from qserve.layers.attention import Attention, AttentionMetadata
from qserve.layers.linear import make_linear
from qserve.layers.norm import RMSNorm
from qserve.layers.rotary import RopeTables, RotaryEmbedding
from qserve.models.moe import SparseMoeBlock

if TYPE_CHECKING:
    from qserve.kernels.packing import QuantSpec

# checkpoint module name -> (our fused module name, shard index)
FUSED_PROJECTIONS: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        quant: QuantSpec | None,
        dtype: torch.dtype,
        device: torch.device,
    ):
        super().__init__()
        self.q_size, self.kv_size, self.head_dim = cfg.q_size, cfg.kv_size, cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        out = cfg.q_size + 2 * cfg.kv_size
        self.qkv_proj = make_linear(cfg.hidden_size, out, cfg.attention_bias, quant, dtype, device)
        self.o_proj = make_linear(cfg.q_size, cfg.hidden_size, cfg.o_proj_bias, quant, dtype, device)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device) if cfg.qk_norm else None
        self.rotary = rotary
        self.attn = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.sliding_window)

    def forward(
        self, rope: RopeTables, x: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        t, hq, hkv, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # (T, q_size + 2 kv_size)
        v = qkv[:, self.q_size + self.kv_size :].view(t, hkv, d)  # (T, Hkv, D)
        if self.q_norm is not None and self.k_norm is not None:
            q, k, _ = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = self.rotary.rotate(self.q_norm(q.reshape(t, hq, d)), rope)  # (T, Hq, D)
            k = self.rotary.rotate(self.k_norm(k.reshape(t, hkv, d)), rope)  # (T, Hkv, D)
        else:  # queries and keys rotate in one pass: (T, Hq + Hkv, D)
            qk = self.rotary.rotate(qkv[:, : self.q_size + self.kv_size].view(t, hq + hkv, d), rope)
            q, k = qk.split([hq, hkv], dim=1)
        o = self.attn(q, k, v, meta, kv_cache)  # (T, Hq, D)
        return self.o_proj(o.reshape(t, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        quant: QuantSpec | None,
        dtype: torch.dtype,
        device: torch.device,
        intermediate_size: int | None = None,  # Qwen2-MoE's shared expert has its own
    ):
        super().__init__()
        self.inter = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = make_linear(cfg.hidden_size, 2 * self.inter, cfg.mlp_bias, quant, dtype, device)
        self.down_proj = make_linear(self.inter, cfg.hidden_size, cfg.mlp_bias, quant, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)  # (T, I) each
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        quant: QuantSpec | None,
        dtype: torch.dtype,
        device: torch.device,
        layer: int = 0,
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = LlamaAttention(cfg, rotary, quant, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp: nn.Module
        if cfg.moe is not None and layer in cfg.moe.sparse_layers:
            self.mlp = SparseMoeBlock(cfg, cfg.moe, quant, dtype, device, LlamaMLP)
        else:
            self.mlp = LlamaMLP(cfg, quant, dtype, device)

    def forward(
        self, rope: RopeTables, h: torch.Tensor, meta: AttentionMetadata, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        h = h + self.self_attn(rope, self.input_layernorm(h), meta, kv_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, quant: QuantSpec | None, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope, device)
        self.rotary = rotary
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, rotary, quant, dtype, device, i) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)


class LlamaForCausalLM(nn.Module):
    """Decoder over a packed batch: forward(input_ids (T,), positions (T,)) -> hidden (T, hidden)."""

    def __init__(
        self,
        cfg: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        quant: QuantSpec | None = None,
    ):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, quant, dtype, device)
        # lm_head stays in float even in quantized checkpoints (as AWQ/GPTQ do): it sets the logits' quality.
        self.lm_head = make_linear(cfg.hidden_size, cfg.vocab_size, False, None, dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)  # (T, hidden)
        rope = self.model.rotary.tables(positions, h.dtype)  # once per step, shared by every layer
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            h = layer(rope, h, meta, kv_cache)
        return self.model.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(S, hidden) -> (S, vocab) float32 logits, only for the rows that are sampled."""
        return self.lm_head(hidden).float()
