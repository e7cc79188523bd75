"""Rotary position embeddings (neox / rotate-half layout, as Hugging Face Llama checkpoints expect)."""

from __future__ import annotations

import math

import torch
from torch import nn

from qserve.config import RopeConfig


def rope_inv_freq(rope: RopeConfig, rot_dim: int) -> torch.Tensor:
    """Inverse frequencies (rot_dim // 2,) in float32 for default, linear and llama3 RoPE."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).float() / rot_dim))
    if rope.scaling_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.scaling_type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, and the band between interpolated.
        low_wavelen = rope.original_max_position / rope.low_freq_factor
        high_wavelen = rope.original_max_position / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Applies RoPE to packed (T, H, D) queries and keys at explicit positions."""

    cos: torch.Tensor  # (max_positions, rot_dim) float32
    sin: torch.Tensor

    def __init__(
        self, head_dim: int, max_positions: int, rope: RopeConfig, device: torch.device | None = None
    ):
        super().__init__()
        self.rot_dim = int(head_dim * rope.partial_rotary_factor)
        inv_freq = rope_inv_freq(rope, self.rot_dim).to(device)
        freqs = torch.arange(max_positions, device=device).float()[:, None] * inv_freq[None, :]  # (P, rot/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, rot)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos = self.cos[positions].to(q.dtype)[:, None, :]  # (T, 1, rot)
        sin = self.sin[positions].to(q.dtype)[:, None, :]
        return _apply(q, cos, sin, self.rot_dim), _apply(k, cos, sin, self.rot_dim)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot_dim: int) -> torch.Tensor:
    rot, rest = x[..., :rot_dim], x[..., rot_dim:]
    half = rot_dim // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)
