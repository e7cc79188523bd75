"""Architecture name (config.json "architectures") -> model class."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from qserve.config import SUPPORTED_ARCHITECTURES
from qserve.errors import UnsupportedModelError
from qserve.layers.attention import AttentionMetadata


class CausalLM(Protocol):
    """What the engine needs of a model class: a packed-batch forward and logits for chosen rows."""

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


def supported_architectures() -> tuple[str, ...]:
    return SUPPORTED_ARCHITECTURES


def get_model_class(architecture: str) -> type[nn.Module]:
    from qserve.models.llama import LlamaForCausalLM

    registry: dict[str, type[nn.Module]] = {arch: LlamaForCausalLM for arch in SUPPORTED_ARCHITECTURES}
    if architecture not in registry:
        raise UnsupportedModelError(
            f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return registry[architecture]
