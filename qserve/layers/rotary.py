"""Rotary position embeddings (neox / rotate-half layout, as Hugging Face Llama checkpoints expect)."""

from __future__ import annotations

import math

import torch
from torch import nn

from qserve.config import RopeConfig

RopeTables = tuple[torch.Tensor, torch.Tensor]  # cos, signed sin at a step's positions: (T, 1, rot) each


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
    """RoPE for packed (T, H, D) queries and keys at explicit positions.

    A step looks its positions' cos/sin up once (`tables`) and every layer applies them (`rotate`): the
    lookup is the same in all layers. The sine table carries rotate-half's sign, so rotating is
    ``x * cos + roll(x, half) * sin_signed``: bit-identical to ``x * cos + rotate_half(x) * sin``.
    """

    cos: torch.Tensor  # (max_positions, rot_dim) float32
    sin: torch.Tensor  # (max_positions, rot_dim) float32, first half negated

    def __init__(
        self, head_dim: int, max_positions: int, rope: RopeConfig, device: torch.device | None = None
    ):
        super().__init__()
        self.rot_dim = int(head_dim * rope.partial_rotary_factor)
        self.head_dim = head_dim
        inv_freq = rope_inv_freq(rope, self.rot_dim).to(device)
        freqs = torch.arange(max_positions, device=device).float()[:, None] * inv_freq[None, :]  # (P, rot/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, rot)
        half = self.rot_dim // 2
        sign = torch.cat((-torch.ones(half, device=device), torch.ones(half, device=device)))  # (rot,)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin() * sign, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTables:
        """cos and signed sin of ``positions`` (T,): two (T, 1, rot_dim) tensors in ``dtype``."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]

    def rotate(self, x: torch.Tensor, tables: RopeTables) -> torch.Tensor:
        """x (T, H, D) -> x rotated (a new tensor); queries and keys may go through in one call."""
        cos, sin = tables
        full = self.rot_dim == self.head_dim
        rot = x if full else x[..., : self.rot_dim]  # partial rotary: the tail passes through
        out = rot * cos + rot.roll(self.rot_dim // 2, dims=-1) * sin
        return out if full else torch.cat((out, x[..., self.rot_dim :]), dim=-1)
