"""RMSNorm, computed in float32 like the Hugging Face reference so fp32 outputs match exactly."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(
        self, dim: int, eps: float, dtype: torch.dtype | None = None, device: torch.device | None = None
    ):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 x * rsqrt(mean(x^2) + eps), back in x's dtype, times the weight: the reference's exact
        # arithmetic (F.rms_norm gives bit-identical results in half the ops)
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)
