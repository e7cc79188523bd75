"""The engine with prefix caching on and off gives identical outputs, for every KV dtype and chunk size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def shared_prefix_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    system = torch.randint(0, 256, (37,), generator=g).tolist()  # 2 full blocks + 5 tokens of 16
    return [system + torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 20, 1, 45)]


@pytest.mark.parametrize("kv_dtype", ["auto", "int8", "int4"])
@pytest.mark.parametrize("chunk", [2048, 16])
def test_prefix_caching_on_off_identical(tiny_llama: Path, kv_dtype: str, chunk: int) -> None:
    prompts = shared_prefix_prompts()
    outs = {}
    for caching in (False, True):
        llm = LLM(
            str(tiny_llama),
            kv_cache_memory=1 << 20,
            kv_cache_dtype=kv_dtype,
            enable_prefix_caching=caching,
            max_num_batched_tokens=chunk,
        )
        first = llm.generate(prompt_token_ids=prompts[:1], sampling_params=GREEDY)  # warms the cache
        rest = llm.generate(prompt_token_ids=prompts[1:], sampling_params=GREEDY)
        outs[caching] = [o.token_ids for o in first + rest]
        hit_rate = llm.metrics()["prefix_cache_hit_rate"]
        if caching:
            assert [o.num_cached_tokens for o in rest] == [32, 32, 32]
            assert hit_rate > 0.3
        else:
            assert hit_rate == 0.0
    assert outs[True] == outs[False]
