"""Greedy outputs of our runtime vs transformers' generate, token for token, in float32."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qserve import LLM, SamplingParams
from tests.tiny_models import rewrite_config

NEW_TOKENS = 64
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


def prompts(n: int, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [3, 17, 40, 5, 1, 33, 64, 9, 2, 25, 48, 7, 12, 30, 4, 21][:n]
    return [torch.randint(0, 256, (length,), generator=g).tolist() for length in lengths]


def hf_greedy(path: Path, batch: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    outs = []
    for p in batch:  # one at a time: no padding in the reference
        ids = model.generate(
            torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        outs.append(ids[0, len(p) :].tolist())
    return outs


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_matches_transformers_batched(arch: str, tiny_model_factory: Callable[..., Path]) -> None:
    path = tiny_model_factory(arch)
    batch = prompts(6)
    llm = LLM(str(path), kv_cache_memory=1 << 20, dtype="float32")
    ours = [o.token_ids for o in llm.generate(prompt_token_ids=batch, sampling_params=GREEDY)]
    assert ours == hf_greedy(path, batch)


def test_alone_equals_among_sixteen(tiny_llama: Path) -> None:
    batch = prompts(16)
    llm = LLM(str(tiny_llama), kv_cache_memory=1 << 20)
    together = [o.token_ids for o in llm.generate(prompt_token_ids=batch, sampling_params=GREEDY)]
    alone = [llm.generate(prompt_token_ids=[p], sampling_params=GREEDY)[0].token_ids for p in batch[:4]]
    assert together[:4] == alone
    assert together[:4] == hf_greedy(tiny_llama, batch[:4])


def test_preemption_keeps_outputs(tiny_llama: Path) -> None:
    batch = prompts(8)
    roomy = LLM(str(tiny_llama), kv_cache_memory=1 << 20)
    expected = [o.token_ids for o in roomy.generate(prompt_token_ids=batch, sampling_params=GREEDY)]
    # 2 layers * 2 (K,V) * 2 heads * 16 dims * 4 bytes = 512 B/token; 16-token blocks: 8 KiB each.
    # 14 blocks = 224 tokens: far less than 8 sequences of up to 128 tokens need.
    tight = LLM(str(tiny_llama), kv_cache_memory=14 * 8192, max_num_batched_tokens=64)
    got = [o.token_ids for o in tight.generate(prompt_token_ids=batch, sampling_params=GREEDY)]
    assert tight.metrics()["preemptions_total"] > 0
    assert got == expected
    m = tight.metrics()
    assert m["requests_running"] == 0 and m["kv_cache_usage_ratio"] == 0.0


def test_chunked_prefill_matches(tiny_llama: Path) -> None:
    batch = prompts(4)
    ref = LLM(str(tiny_llama), kv_cache_memory=1 << 20)
    chunked = LLM(str(tiny_llama), kv_cache_memory=1 << 20, max_num_batched_tokens=7)
    a = [o.token_ids for o in ref.generate(prompt_token_ids=batch, sampling_params=GREEDY)]
    b = [o.token_ids for o in chunked.generate(prompt_token_ids=batch, sampling_params=GREEDY)]
    assert a == b


def test_sharded_bf16_checkpoint(tiny_model_factory: Callable[..., Path]) -> None:
    path = tiny_model_factory("qwen2", dtype=torch.bfloat16, shards=3)
    assert (path / "model.safetensors.index.json").is_file()
    llm = LLM(str(path), kv_cache_memory=1 << 20)
    assert llm.engine.dtype_name == "bfloat16"
    fp32 = LLM(str(path), kv_cache_memory=1 << 20, dtype="float32")
    batch = prompts(2)
    assert [o.token_ids for o in fp32.generate(prompt_token_ids=batch, sampling_params=GREEDY)] == hf_greedy(
        path, batch
    )
    out = llm.generate(prompt_token_ids=batch, sampling_params=GREEDY)
    assert all(len(o.token_ids) == NEW_TOKENS for o in out)


def test_legacy_rope_config_is_equivalent(tiny_model_factory: Callable[..., Path], tmp_path: Path) -> None:
    import shutil

    src = tiny_model_factory("llama")
    legacy = tmp_path / "legacy"
    shutil.copytree(src, legacy)
    # transformers v4 style: rope_theta at top level, rope_scaling with "type"
    rewrite_config(
        legacy,
        rope_parameters=None,
        rope_theta=500000.0,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    batch = prompts(3)
    a = LLM(str(src), kv_cache_memory=1 << 20).generate(prompt_token_ids=batch, sampling_params=GREEDY)
    b = LLM(str(legacy), kv_cache_memory=1 << 20).generate(prompt_token_ids=batch, sampling_params=GREEDY)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
