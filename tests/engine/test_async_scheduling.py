"""Async scheduling (step N+1 launched before step N's outputs are detokenized) against the synchronous
engine: in float32 the same tokens, texts and finish reasons, with chunked prefill, preemption, prefix
caching, stop strings, max_tokens, prompt logprobs, seeded sampling and aborts in flight."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from qserve import LLM, SamplingParams
from qserve.converters import convert
from qserve.types import RequestOutput, TokenLogprob
from tests.engine.test_compiled import ENGINE, tight_kv, workload


def outputs(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple[object, ...]]:
    """Tokens, text, finish reason, and logprobs rounded to 1e-4: a different batch composition (the one
    extra step of a finished sequence changes when preemption strikes) moves float32 sums by an ulp."""
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)

    def r(lps: list[TokenLogprob | None] | None) -> list[tuple[int, float] | None] | None:
        return (
            None if lps is None else [None if x is None else (x.token_id, round(x.logprob, 4)) for x in lps]
        )

    return [(o.token_ids, o.text, o.finish_reason, r(o.logprobs), r(o.prompt_logprobs)) for o in outs]


def pair(path: Path, **kw: object) -> tuple[LLM, LLM]:
    kv = str(kw.pop("kv", "auto"))
    args = {**ENGINE, "kv_cache_dtype": kv, "kv_cache_memory": tight_kv(path, kv), **kw}
    sync = LLM(str(path), enforce_eager=True, async_scheduling=False, **args)  # type: ignore[arg-type]
    overlap = LLM(str(path), enforce_eager=True, async_scheduling=True, **args)  # type: ignore[arg-type]
    return sync, overlap


def stop_workload(llm: LLM) -> tuple[list[list[int]], list[SamplingParams]]:
    """The greedy workload with mixed max_tokens, a stop string from the middle of every other request's
    own greedy output, and logprobs / prompt logprobs on some requests."""
    prompts, _ = workload(seeded=False)
    base = [
        SamplingParams(max_tokens=8 + 3 * i, temperature=0.0, ignore_eos=True) for i in range(len(prompts))
    ]
    out = []
    for i, o in enumerate(llm.generate(prompt_token_ids=prompts, sampling_params=base)):
        text = o.text
        mid = next((k for k in range(len(text) // 2, len(text) - 2) if "\ufffd" not in text[k : k + 2]), None)
        stop = [text[mid : mid + 2]] if i % 2 == 0 and mid is not None else None
        out.append(
            SamplingParams(
                max_tokens=base[i].max_tokens, temperature=0.0, ignore_eos=True, stop=stop,
                logprobs=2 if i % 3 == 0 else None, prompt_logprobs=1 if i == 4 else None,
            )
        )  # fmt: skip
    return prompts, out


@pytest.mark.parametrize("kv", ["auto", "int8"])
def test_async_matches_sync(kv: str, tiny_llama: Path) -> None:
    sync, overlap = pair(tiny_llama, kv=kv)
    prompts, params = workload(seeded=False)
    assert outputs(overlap, prompts, params) == outputs(sync, prompts, params)
    m = overlap.metrics()
    assert m["preemptions_total"] > 0 and m["prefix_cache_hit_rate"] > 0
    prompts, params = stop_workload(sync)
    got, want = outputs(overlap, prompts, params), outputs(sync, prompts, params)
    assert got == want
    assert any(w[2] == "stop" for w in want) and any(w[2] == "length" for w in want)
    seeded = workload(seeded=True)
    assert outputs(overlap, *seeded) == outputs(overlap, *seeded) == outputs(sync, *seeded)
    assert not overlap.engine.has_unfinished_requests() and overlap.engine.kv.block_tables == {}


def test_async_int4_weights(tiny_llama: Path, tmp_path: Path) -> None:
    q4 = convert(tiny_llama, tmp_path / "q4", weights="int4", group_size=32, progress=False)
    sync, overlap = pair(q4)
    prompts, params = workload(seeded=False)
    assert outputs(overlap, prompts, params) == outputs(sync, prompts, params)


def test_abort_in_flight(tiny_llama: Path) -> None:
    """An abort while the next step computes: that request gets nothing more, the rest are unchanged."""
    sync, overlap = pair(tiny_llama)
    prompts, params = workload(seeded=False)
    want = outputs(sync, prompts, params)
    eng = overlap.engine
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        eng.add_request(str(i), None, sp, prompt_token_ids=p)
    seen: dict[str, list[RequestOutput]] = {}
    steps = 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            seen.setdefault(o.request_id, []).append(o)
        steps += 1
        if steps == 6:
            assert eng._inflight is not None  # a step is in flight while the abort lands
            n_before = len(seen.get("3", []))
            eng.abort_request("3")
    assert len(seen.get("3", [])) == n_before and not seen["3"][-1].finished
    for i, w in enumerate(want):
        if i != 3:
            assert seen[str(i)][-1].token_ids == w[0] and seen[str(i)][-1].finished
    assert eng.kv.block_tables == {} and eng.seqs == {} and eng.detok == {}


def test_finished_sequence_never_emits_its_extra_step(tiny_model_factory: Callable[..., Path]) -> None:
    """A stop string finishes its request one step late under async scheduling: the token that step
    computed is dropped, so the outputs (and the number of generated tokens counted) equal sync's."""
    path = tiny_model_factory("qwen3")
    sync, overlap = pair(path)
    prompts, params = stop_workload(sync)
    before = sync.metrics()
    want = outputs(sync, prompts, params)
    assert outputs(overlap, prompts, params) == want
    ms, mo = sync.metrics(), overlap.metrics()
    assert mo["generation_tokens_total"] == ms["generation_tokens_total"] - before["generation_tokens_total"]
    finished = {
        k: v - before["requests_finished_total"].get(k, 0) for k, v in ms["requests_finished_total"].items()
    }
    assert mo["requests_finished_total"] == {k: v for k, v in finished.items() if v}
    assert finished.get("stop", 0) > 0


@pytest.mark.slow
def test_async_compiled_matches_sync(tiny_llama: Path) -> None:
    args = {**ENGINE, "kv_cache_memory": tight_kv(tiny_llama, "auto")}
    sync = LLM(str(tiny_llama), enforce_eager=True, **args)  # type: ignore[arg-type]
    overlap = LLM(str(tiny_llama), enforce_eager=False, async_scheduling=True, **args)  # type: ignore[arg-type]
    prompts, params = workload(seeded=False)
    assert outputs(overlap, prompts, params) == outputs(sync, prompts, params)
    torch._dynamo.reset()
