"""The weight bytes `qserve serve` prints count what the engine really holds, packed layouts included."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from qserve.config import EngineConfig
from qserve.engine.llm_engine import LLMEngine
from qserve.server.plan_info import weight_bytes


def checkpoint_elements(path: Path) -> int:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118


def test_prepacked_bf16_linears_are_counted(tiny_model_factory: Callable[..., Path]) -> None:
    path = tiny_model_factory("llama", dtype=torch.bfloat16, tie_word_embeddings=False)
    engine = LLMEngine(EngineConfig(model=str(path), dtype="bfloat16"))
    packed = [m for m in engine.model.modules() if getattr(m, "_packed", None) is not None]
    assert packed  # the CPU path really prepacked, so the state dict alone would miss these weights
    assert weight_bytes(engine.model) == checkpoint_elements(path) * 2
