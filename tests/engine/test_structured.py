"""Constrained decoding on the demo model: every sampled output follows its grammar, over many seeds."""

from __future__ import annotations

import json
import re
from concurrent.futures import Future
from typing import Any

import jsonschema
import pytest

from qserve import LLM, SamplingParams
from qserve.engine.logits_processors import bad_words_token_ids
from qserve.errors import QServeError
from qserve.types import StructuredOutputsParams as Spec

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 1, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "zip": {"type": "integer", "minimum": 1000, "maximum": 9999},
            },
            "required": ["city", "zip"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
}
PROMPTS = ["The user record:", "def parse(data):", "{"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("demo")


def run(llm: LLM, prompt: str, params: list[SamplingParams]) -> list[Any]:
    return llm.generate([prompt] * len(params), params)


def sampled(spec: Spec, n: int, max_tokens: int = 160, **kw: Any) -> list[SamplingParams]:
    return [
        SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=s, structured_outputs=spec, **kw)
        for s in range(n)
    ]


def test_json_schema_outputs_validate_over_seeds(llm: LLM) -> None:
    params = sampled(Spec(json=SCHEMA), 16)
    outs = llm.generate([PROMPTS[i % 3] for i in range(16)], params)
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)
    assert len({o.text for o in outs}) > 8  # sampled, not one fixed answer


def test_schema_as_text_json_object_regex_choice_grammar(llm: LLM) -> None:
    as_text = run(llm, PROMPTS[0], sampled(Spec(json=json.dumps(SCHEMA)), 2))
    for o in as_text:
        jsonschema.validate(json.loads(o.text), SCHEMA)
    for o in run(llm, PROMPTS[1], sampled(Spec(json_object=True), 4, max_tokens=60)):
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)
        else:
            assert o.text.startswith("{")
    regex = r"[a-z]{2,6}-\d{3}(\.[a-z]+)?"
    for o in run(llm, PROMPTS[1], sampled(Spec(regex=regex), 12)):
        assert re.fullmatch(regex, o.text), o.text
    choices = ["red", "green", "blue sky"]
    got = {o.text for o in run(llm, PROMPTS[0], sampled(Spec(choice=choices), 16))}
    assert got <= set(choices) and len(got) >= 2
    ebnf = 'root ::= "(" num (" + " num)* ")"\nnum ::= [1-9] [0-9]?'
    for o in run(llm, PROMPTS[2], sampled(Spec(grammar=ebnf), 8, max_tokens=60)):
        if o.finish_reason == "stop":
            assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", o.text), o.text


def test_seeded_constrained_output_is_reproducible_and_batch_independent(llm: LLM) -> None:
    spec = Spec(json=SCHEMA)
    alone = llm.generate(
        PROMPTS[0], SamplingParams(max_tokens=30, temperature=1.0, seed=7, structured_outputs=spec)
    )
    mixed = llm.generate(
        [PROMPTS[1], PROMPTS[0], PROMPTS[2]],
        [
            SamplingParams(max_tokens=20, temperature=1.0, seed=1),
            SamplingParams(max_tokens=30, temperature=1.0, seed=7, structured_outputs=spec),
            SamplingParams(max_tokens=25, temperature=0.0, presence_penalty=1.0),
        ],
    )
    assert mixed[1].token_ids == alone[0].token_ids and len(alone[0].token_ids) == 30


def test_bad_specs_raise_before_anything_is_queued(llm: LLM) -> None:
    for spec, words in (
        (Spec(json={"type": "nonsense"}), "invalid JSON schema"),
        (Spec(json="{not json"), "not JSON"),
        (Spec(regex="[a-"), "invalid regex"),
        (Spec(grammar="root ::= undefined_rule"), "invalid grammar"),
    ):
        with pytest.raises(QServeError, match=words):
            llm.generate("x", SamplingParams(structured_outputs=spec))
        assert not llm.engine.has_unfinished_requests()
    with pytest.raises(QServeError, match="exactly one"):
        Spec(regex="a", choice=["a"])
    with pytest.raises(QServeError, match="exactly one"):
        Spec()


def test_compile_cache_shares_one_compile(llm: LLM) -> None:
    cache = llm.engine.grammars
    spec = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}
    a = cache.submit(Spec(json=spec))
    b = cache.submit(Spec(json=json.dumps(spec)))  # the same schema as text: the same key
    assert a is b
    a.result()
    n = len(cache.compile_seconds)
    assert cache.submit(Spec(json=spec)).done()
    assert len(cache.compile_seconds) == n  # a hit: no second compile


def test_request_waits_for_its_grammar_while_others_run(llm: LLM) -> None:
    eng = llm.engine
    real_submit = eng.grammars.submit
    pending: Future[Any] = Future()
    eng.grammars.submit = lambda spec: pending  # type: ignore[method-assign]
    try:
        eng.add_request(
            "slow",
            "a",
            SamplingParams(max_tokens=8, temperature=0, structured_outputs=Spec(regex="[0-9]{8}")),
        )
    finally:
        eng.grammars.submit = real_submit  # type: ignore[method-assign]
    eng.add_request("free", "b", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    done: dict[str, str] = {}
    for _ in range(10):
        for out in eng.step():
            assert out.request_id == "free"
            if out.finished:
                done[out.request_id] = out.text
    assert "free" in done and eng.seqs["slow"].num_output_tokens == 0
    pending.set_result(real_submit(Spec(regex="[0-9]{8}")).result())
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.text
    assert re.fullmatch(r"[0-9]{8}", done["slow"])


def test_constrained_outputs_survive_preemption() -> None:
    small = LLM("demo", kv_cache_memory=20 * 32768, max_num_seqs=8)  # 20 blocks of 16 tokens for 8 sequences
    outs = run(small, PROMPTS[0], sampled(Spec(json=SCHEMA), 8, max_tokens=130))
    assert small.metrics()["preemptions_total"] > 0
    for o in outs:
        if o.finish_reason == "stop":
            jsonschema.validate(json.loads(o.text), SCHEMA)
    assert sum(o.finish_reason == "stop" for o in outs) >= 6


def test_bad_words_never_generated(llm: LLM) -> None:
    p = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    free = llm.generate(PROMPTS[1], p)[0]
    word = llm.tokenizer.decode(free.token_ids[3:5]).strip()
    banned = bad_words_token_ids(llm.tokenizer, [word])
    out = llm.generate(
        PROMPTS[1], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, bad_words=[word])
    )[0]
    for bad in banned:
        k = len(bad)
        assert all(out.token_ids[j : j + k] != bad for j in range(len(out.token_ids))), (word, bad)
    assert out.token_ids != free.token_ids


@pytest.mark.parametrize(("s", "v"), [(1, 5), (3, 64), (4, 100), (16, 4096)])
def test_cpu_bitmask_matches_xgrammar(s: int, v: int) -> None:
    import torch
    import xgrammar as xgr

    from qserve.engine.structured import apply_bitmask

    g = torch.Generator().manual_seed(s * v)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (s, (v + 31) // 32), dtype=torch.int32, generator=g)
    logits = torch.randn(s, v, generator=g)
    want = logits.clone()
    xgr.apply_token_bitmask_inplace(want, bitmask, backend="cpu")
    apply_bitmask(logits, bitmask)
    assert torch.equal(logits, want)


def test_bans_that_would_leave_the_grammar_no_token_are_dropped() -> None:
    """bad_words / min_tokens against a grammar that allows only those tokens: the grammar wins, no NaN."""
    import torch

    from qserve.engine.logits_processors import LogitsBatch, apply_logits_processors

    v = 40
    bitmask = torch.zeros(2, 2, dtype=torch.int32)
    bitmask[:, 0] = (1 << 5) | (1 << 7)  # both rows' grammars allow tokens 5 and 7 only
    batch = LogitsBatch(
        bitmask=bitmask,
        banned_rows=torch.tensor([0, 0, 1]),
        banned_cols=torch.tensor([5, 7, 5]),  # row 0: both banned; row 1: one banned
    )
    logits = torch.randn(2, v)
    out = apply_logits_processors(logits, batch)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [5, 7]  # the bans were dropped for row 0
    assert torch.isfinite(out[1]).nonzero().flatten().tolist() == [7]  # but kept where the grammar survives
