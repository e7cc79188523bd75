"""The batched logits processors against a per-token reference of vLLM's formulas, and through the engine."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from qserve import LLM, SamplingParams
from qserve.engine.logits_processors import apply_logits_processors, banned_bad_words, prepare_logits
from qserve.engine.sequence import Sequence
from qserve.errors import QServeError
from qserve.kernels.cpu_ops import step_plans
from tests.tiny_models import EOS_ID


def ref_process(logits: list[float], p: SamplingParams, prompt: list[int], out: list[int],
                banned: list[int]) -> list[float]:  # fmt: skip
    """vLLM's order and formulas, one token at a time: bans, logit_bias, penalties, then min_p."""
    v = len(logits)
    x = list(logits)
    for t in banned:
        x[t] = -math.inf
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    for t in range(v):
        count = out.count(t)
        if t in prompt or count:
            r = p.repetition_penalty
            x[t] = x[t] / r if x[t] > 0 else x[t] * r
        x[t] -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
    if p.min_p > 0 and not p.greedy:
        scaled = [y / p.temperature for y in x]
        m = max(scaled)
        z = sum(math.exp(y - m) for y in scaled)
        probs = [math.exp(y - m) / z for y in scaled]
        top = max(probs)
        x = [y if q >= p.min_p * top else -math.inf for y, q in zip(x, probs, strict=True)]
    return x


def make_seq(i: int, prompt: list[int], out: list[int], p: SamplingParams, stop_ids: list[int]) -> Sequence:
    seq = Sequence(i, f"r{i}", None, prompt + out, len(prompt), p, 10_000)
    seq.min_tokens_stop_ids = stop_ids if p.min_tokens else []
    return seq


def random_params(rng: random.Random, v: int) -> SamplingParams:
    kw: dict = {"max_tokens": 64, "temperature": rng.choice([0.0, 0.7, 1.0, 1.5])}
    if rng.random() < 0.6:
        kw["presence_penalty"] = rng.uniform(-2, 2)
    if rng.random() < 0.6:
        kw["frequency_penalty"] = rng.uniform(-2, 2)
    if rng.random() < 0.6:
        kw["repetition_penalty"] = rng.uniform(0.5, 2.0)
    if rng.random() < 0.5:
        kw["logit_bias"] = {rng.randrange(v): rng.uniform(-100, 100) for _ in range(rng.randint(1, 4))}
    if rng.random() < 0.5:
        kw["min_p"] = rng.uniform(0.0, 0.3)
    if rng.random() < 0.3:
        kw["min_tokens"] = rng.randint(1, 10)
    return SamplingParams(**kw)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("v", [17, 64, 259])
def test_batch_matches_reference(seed: int, v: int) -> None:
    rng = random.Random(seed * 1000 + v)
    torch.manual_seed(seed)
    s = rng.randint(1, 7)
    logits = torch.randn(s, v) * 4
    seqs, refs = [], []
    for i in range(s):
        p = random_params(rng, v)
        prompt = [rng.randrange(v) for _ in range(rng.randint(1, 12))]
        out = [rng.randrange(v) for _ in range(rng.randint(0, 12))]
        stop_ids = [v - 1, 3]
        seqs.append(make_seq(i, prompt, out, p, stop_ids))
        banned = stop_ids if len(out) < p.min_tokens else []
        refs.append(ref_process(logits[i].tolist(), p, prompt, out, banned))
    batch = prepare_logits(seqs, v, logits.device)
    got = logits if batch is None else apply_logits_processors(logits, batch)
    want = torch.tensor(refs)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = ~torch.isinf(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-4)


def test_plain_rows_take_the_fast_path_and_input_is_untouched() -> None:
    seqs = [make_seq(0, [1, 2], [3], SamplingParams(), []), make_seq(1, [4], [], SamplingParams(top_k=3), [])]
    assert prepare_logits(seqs, 10, torch.device("cpu")) is None
    logits = torch.randn(2, 10)
    before = logits.clone()
    seqs[1].params = SamplingParams(presence_penalty=1.0)
    batch = prepare_logits(seqs, 10, torch.device("cpu"))
    assert batch is not None and batch.penalty_rows is not None and batch.penalty_rows.tolist() == [1]
    out = apply_logits_processors(logits, batch)
    assert torch.equal(logits, before)  # logprobs keep reading the model's own distribution
    assert torch.equal(out[0], logits[0])


def test_bad_words_rule() -> None:
    words = [[7], [1, 2, 3], [5, 6]]
    assert banned_bad_words(words, []) == [7]
    assert banned_bad_words(words, [9, 1, 2]) == [7, 3]
    assert banned_bad_words(words, [1, 2, 5]) == [7, 6]
    assert banned_bad_words(words, [2, 1]) == [7]


def test_param_validation() -> None:
    for kw in (
        {"min_p": 1.5},
        {"presence_penalty": 2.5},
        {"frequency_penalty": -3.0},
        {"repetition_penalty": 0.0},
        {"logit_bias": {3: 101.0}},
        {"logit_bias": {-1: 1.0}},
        {"min_tokens": 20, "max_tokens": 10},
        {"min_tokens": -1},
    ):
        with pytest.raises(QServeError):
            SamplingParams(**kw)


# ---------------------------------------------------------------------------------------- through the engine
@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> LLM:
    return LLM(str(tiny_llama), kv_cache_memory=1 << 20)


PROMPTS = [[5, 6, 7], [100, 3, 9, 200, 17], [42]]


def test_logit_bias_forces_and_forbids(llm: LLM) -> None:
    forced = llm.generate(
        prompt_token_ids=PROMPTS,
        sampling_params=SamplingParams(
            max_tokens=6, temperature=1.0, seed=1, logit_bias={77: 100.0}, ignore_eos=True
        ),
    )
    assert [o.token_ids for o in forced] == [[77] * 6] * 3
    greedy = llm.generate(
        prompt_token_ids=PROMPTS, sampling_params=SamplingParams(max_tokens=1, temperature=0)
    )
    firsts = [o.token_ids[0] for o in greedy]
    banned = llm.generate(
        prompt_token_ids=PROMPTS,
        sampling_params=[SamplingParams(max_tokens=1, temperature=0, logit_bias={t: -100.0}) for t in firsts],
    )
    assert all(o.token_ids[0] != t for o, t in zip(banned, firsts, strict=True))


def test_penalties_greedy_match_reference_loop(llm: LLM) -> None:
    """Greedy with penalties == argmax of the reference formulas applied to the model's raw logits each step."""
    p = SamplingParams(max_tokens=12, temperature=0, presence_penalty=0.8, frequency_penalty=0.6,
                       repetition_penalty=1.4, ignore_eos=True)  # fmt: skip
    got = llm.generate(prompt_token_ids=PROMPTS, sampling_params=p)
    for prompt, o in zip(PROMPTS, got, strict=True):
        toks = list(prompt)
        for _ in range(p.max_tokens):
            raw = teacher_logits(llm, toks)
            ref = ref_process(raw, p, list(prompt), toks[len(prompt) :], [])
            toks.append(max(range(len(ref)), key=ref.__getitem__))
        assert o.token_ids == toks[len(prompt) :]


def teacher_logits(llm: LLM, toks: list[int]) -> list[float]:
    """The model's raw next-token logits after ``toks`` (a fresh prefill through the engine's runner)."""
    eng = llm.engine
    seq = eng.add_request("teacher", None, SamplingParams(max_tokens=1, temperature=0), prompt_token_ids=toks)
    so = eng.scheduler.schedule()
    batch = eng.runner._prepare(so)
    with torch.inference_mode(), step_plans():
        hidden = eng.model(batch.ids, batch.positions, batch.meta, eng.runner.kv_caches)
        logits = eng.model.compute_logits(hidden[batch.logits_rows])  # (1, V)
    eng.abort_request(seq.request_id)
    return logits[0].float().tolist()


def test_min_tokens_holds_against_eos_and_stop_strings(llm: LLM) -> None:
    eos_bias = {EOS_ID: 100.0}  # without min_tokens the model would end at once
    out = llm.generate(
        prompt_token_ids=PROMPTS,
        sampling_params=SamplingParams(max_tokens=20, temperature=0, logit_bias=eos_bias, min_tokens=7),
    )
    assert [len(o.token_ids) for o in out] == [8, 8, 8]
    assert all(o.token_ids[-1] == EOS_ID and o.finish_reason == "stop" for o in out)
    stop_ids = llm.generate(
        prompt_token_ids=PROMPTS,
        sampling_params=SamplingParams(
            max_tokens=20, temperature=0, logit_bias={9: 100.0}, stop_token_ids=[9], min_tokens=4
        ),  # fmt: skip
    )
    assert [o.token_ids for o in stop_ids] == [[*[t for t in o.token_ids[:4]], 9] for o in stop_ids]
    # a stop string is not looked for before min_tokens (vLLM): force "a" (byte tokenizer) and stop on it
    tok = llm.tokenizer
    a = tok.encode("a", add_special_tokens=False)[-1]
    forced = {a: 100.0}
    early = llm.generate(
        prompt_token_ids=PROMPTS[:1],
        sampling_params=SamplingParams(
            max_tokens=10, temperature=0, logit_bias=forced, stop="a", ignore_eos=True
        ),
    )
    held = llm.generate(
        prompt_token_ids=PROMPTS[:1],
        sampling_params=SamplingParams(
            max_tokens=10, temperature=0, logit_bias=forced, stop="a", ignore_eos=True, min_tokens=5
        ),  # fmt: skip
    )
    assert len(early[0].token_ids) == 1 and early[0].finish_reason == "stop"
    assert len(held[0].token_ids) == 5 and held[0].finish_reason == "stop"
