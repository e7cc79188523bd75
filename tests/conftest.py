from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.tiny_models import make_tiny_model

# Engines built by tests (and the servers they start) run eager: compiling each tiny model would cost
# 10-60 s on the 2-core CI machine. tests/engine/test_compiled.py builds compiled engines explicitly.
os.environ.setdefault("QSERVE_ENFORCE_EAGER", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make(arch, **overrides) -> directory of a tiny random HF checkpoint (cached per arguments)."""
    cache: dict[str, Path] = {}

    def make(arch: str = "llama", **kw: Any) -> Path:
        key = f"{arch}-{sorted(kw.items())}"
        if key not in cache:
            cache[key] = make_tiny_model(tmp_path_factory.mktemp(arch), arch, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory: Callable[..., Path]) -> Path:
    return tiny_model_factory("llama")
