"""KV capacity: exact bytes per token and block for every KV dtype, and what the engine allocates."""

from __future__ import annotations

from pathlib import Path

import pytest

from qserve import LLM
from qserve.cache.kv_cache import KVCacheSpec


@pytest.mark.parametrize(
    ("dtype", "per_token"),
    [
        ("fp32", 2 * 32 * 8 * 128 * 4),
        ("fp16", 131072),
        ("bf16", 131072),
        ("int8", 2 * 32 * 8 * (128 + 4)),
        ("int4", 2 * 32 * 8 * (64 + 4)),
    ],
)
def test_llama31_8b_bytes_per_token(dtype: str, per_token: int) -> None:
    spec = KVCacheSpec(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=dtype)
    assert spec.bytes_per_token == per_token
    assert spec.bytes_per_block == 16 * per_token
    budget = 10 * 2**30 + 12345
    assert spec.num_blocks(budget) == budget // (16 * per_token)


@pytest.mark.parametrize(("head_dim", "min_ratio"), [(128, 3.5), (64, 3.0)])
def test_int4_holds_several_times_fp16(head_dim: int, min_ratio: float) -> None:
    budget = 8 * 2**30
    tokens = {
        dt: KVCacheSpec(32, 8, head_dim, 16, dt).num_blocks(budget) * 16 for dt in ("fp16", "int8", "int4")
    }
    assert tokens["int4"] >= min_ratio * tokens["fp16"]
    assert tokens["int8"] >= 1.8 * tokens["fp16"]


@pytest.mark.parametrize("kv_dtype", ["fp32", "int8", "int4"])
def test_engine_allocates_exactly_budget_over_block_bytes(tiny_llama: Path, kv_dtype: str) -> None:
    budget = 300_000
    llm = LLM(str(tiny_llama), kv_cache_memory=budget, kv_cache_dtype=kv_dtype)
    spec = llm.engine.kv_spec
    blocks = budget // spec.bytes_per_block
    assert llm.metrics()["kv_cache_capacity_tokens"] == blocks * 16
    caches = llm.engine.runner.kv_caches
    assert sum(c.numel() * c.element_size() for c in caches) == blocks * spec.bytes_per_block
