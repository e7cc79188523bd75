"""Sampling, stop conditions, logprobs and detokenization through the real engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qserve import LLM, SamplingParams
from qserve.engine.metrics import METRIC_NAMES
from qserve.engine.sampler import apply_top_k_top_p, sample_tensor
from qserve.errors import QServeError
from qserve.tokenizer import IncrementalDetokenizer, load_tokenizer
from tests.tiny_models import EOS_ID

PROMPTS = [[5, 6, 7], [100, 3, 9, 200, 17], [42]]


@pytest.fixture(scope="module")
def llm(tiny_llama: Path) -> LLM:
    return LLM(str(tiny_llama), kv_cache_memory=1 << 20)


def ids(outs) -> list[list[int]]:  # type: ignore[no-untyped-def]
    return [o.token_ids for o in outs]


def test_seed_reproducible_and_batch_independent(llm: LLM) -> None:
    p = SamplingParams(max_tokens=20, temperature=1.0, seed=1234, ignore_eos=True)
    a = ids(llm.generate(prompt_token_ids=PROMPTS, sampling_params=p))
    b = ids(llm.generate(prompt_token_ids=PROMPTS[::-1], sampling_params=p))[::-1]
    alone = ids(llm.generate(prompt_token_ids=PROMPTS[:1], sampling_params=p))
    assert a == b
    assert a[0] == alone[0]
    other = ids(
        llm.generate(
            prompt_token_ids=PROMPTS,
            sampling_params=SamplingParams(max_tokens=20, temperature=1.0, seed=99, ignore_eos=True),
        )
    )
    assert other != a


def test_top_k_one_is_greedy(llm: LLM) -> None:
    greedy = ids(
        llm.generate(
            prompt_token_ids=PROMPTS,
            sampling_params=SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
        )
    )
    topk1 = ids(
        llm.generate(
            prompt_token_ids=PROMPTS,
            sampling_params=SamplingParams(max_tokens=16, temperature=0.8, top_k=1, seed=3, ignore_eos=True),
        )
    )
    tiny_p = ids(
        llm.generate(
            prompt_token_ids=PROMPTS,
            sampling_params=SamplingParams(
                max_tokens=16, temperature=0.8, top_p=1e-6, seed=3, ignore_eos=True
            ),
        )
    )
    assert greedy == topk1 == tiny_p


def test_top_k_top_p_mask() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    assert torch.isinf(apply_top_k_top_p(logits, 2, 1.0)).tolist() == [True, False, False, True]
    # probs ~ [0.087, 0.644, 0.237, 0.032]: top_p 0.7 keeps the two best
    assert torch.isinf(apply_top_k_top_p(logits, 0, 0.7)).tolist() == [True, False, False, True]
    assert torch.isinf(apply_top_k_top_p(logits, 0, 0.5)).tolist() == [True, False, True, True]


def test_unseeded_rows_draw_together_from_their_distribution() -> None:
    """Unseeded random rows share the engine's generator and are drawn in one batched exponential race:
    the token frequencies follow softmax(logits / T), top-k / top-p masks hold, greedy and seeded rows
    in the same batch are unaffected, and the same generator state gives the same tokens."""
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]]))
    params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_k=2),
        SamplingParams(temperature=0.0),  # greedy
    ]
    n = 4000
    counts = torch.zeros(3, 4)
    gen = torch.Generator().manual_seed(7)
    for _ in range(n):
        tokens, _ = sample_tensor(logits, params, [gen, gen, None])
        counts[torch.arange(3), tokens] += 1
    freq = counts / n
    assert torch.allclose(freq[0], torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)
    assert freq[1, 2:].sum() == 0 and abs(freq[1, 0].item() - 4 / 7) < 0.03  # top-k 2: renormalized
    assert freq[2, 3] == 1.0  # greedy
    a = sample_tensor(logits, params, [torch.Generator().manual_seed(3)] * 2 + [None])[0]
    b = sample_tensor(logits, params, [torch.Generator().manual_seed(3)] * 2 + [None])[0]
    assert torch.equal(a, b)
    seeded = SamplingParams(temperature=1.0, seed=11)  # its own generator: drawn on its own, as before
    x = sample_tensor(logits[:1], [seeded], [torch.Generator().manual_seed(11)])[0]
    y = sample_tensor(logits, [seeded, *params[1:]], [torch.Generator().manual_seed(11), gen, None])[0]
    assert x[0] == y[0]


def test_max_tokens_and_eos(llm: LLM) -> None:
    out = llm.generate(
        prompt_token_ids=PROMPTS,
        sampling_params=SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
    )
    assert [len(o.token_ids) for o in out] == [5, 5, 5]
    assert all(o.finish_reason == "length" for o in out)
    # make the first greedy token an eos: it ends the request with reason "stop"
    first = out[0].token_ids[0]
    stopped = llm.generate(
        prompt_token_ids=PROMPTS[:1],
        sampling_params=SamplingParams(max_tokens=5, temperature=0.0, stop_token_ids=[first]),
    )
    assert stopped[0].token_ids == [first] and stopped[0].finish_reason == "stop"
    assert EOS_ID in llm.engine.eos_token_ids


def test_stop_string_cuts_text(llm: LLM) -> None:
    p = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    full = llm.generate("def f(x):", p)[0]
    text = full.text
    k = next(
        i
        for i in range(3, len(text) - 2)
        if "\ufffd" not in text[i : i + 2] and text.find(text[i : i + 2]) == i
    )
    stop = text[k : k + 2]
    cut = llm.generate(
        "def f(x):", SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop])
    )[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[:k]
    assert full.token_ids[: len(cut.token_ids)] == cut.token_ids


def test_logprobs_match_log_softmax(llm: LLM) -> None:
    out = llm.generate(
        prompt_token_ids=PROMPTS[:1],
        sampling_params=SamplingParams(
            max_tokens=3, temperature=0.0, logprobs=2, prompt_logprobs=1, ignore_eos=True
        ),
    )[0]
    assert out.logprobs is not None and len(out.logprobs) == 3
    for lp in out.logprobs:
        assert lp.logprob <= 0.0 and len(lp.top) == 2
        assert max(lp.top.values()) == pytest.approx(lp.logprob)  # greedy: the chosen token is the best
    pl = out.prompt_logprobs
    assert pl is not None and pl[0] is None and len(pl) == 3
    # check against the HF model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(llm.engine.config.model), dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPTS[0]])).logits[0].log_softmax(-1)
    for pos in (1, 2):
        entry = pl[pos]
        assert entry is not None
        assert entry.logprob == pytest.approx(float(logits[pos - 1, PROMPTS[0][pos]]), abs=1e-4)


def test_echo_scoring_with_zero_max_tokens(llm: LLM) -> None:
    out = llm.generate(
        prompt_token_ids=PROMPTS, sampling_params=SamplingParams(max_tokens=0, prompt_logprobs=0)
    )
    assert [o.token_ids for o in out] == [[], [], []]
    assert [len(o.prompt_logprobs or []) for o in out] == [3, 5, 1]


def test_bad_requests_leave_engine_clean(llm: LLM) -> None:
    with pytest.raises(QServeError, match="empty"):
        llm.generate(prompt_token_ids=[[1, 2], []])
    with pytest.raises(QServeError, match="max_model_len"):
        llm.generate(prompt_token_ids=[[1] * 600])
    with pytest.raises(QServeError, match="token ids"):
        llm.generate(prompt_token_ids=[[10**6]])
    with pytest.raises(QServeError, match="temperature"):
        SamplingParams(temperature=-1)
    m = llm.metrics()
    assert m["requests_running"] == 0 and m["requests_waiting"] == 0


def test_metrics_names(llm: LLM) -> None:
    llm.generate(prompt_token_ids=PROMPTS, sampling_params=SamplingParams(max_tokens=4, ignore_eos=True))
    m = llm.metrics()
    assert set(METRIC_NAMES) <= set(m)
    assert m["kv_cache_capacity_tokens"] == (1 << 20) // (2 * 2 * 2 * 16 * 4 * 16) * 16
    assert m["requests_finished_total"]["length"] >= 3
    assert 0.0 < m["device_busy_ratio"] <= 1.0


def test_detokenizer_never_splits_characters(tiny_llama: Path) -> None:
    tok = load_tokenizer(tiny_llama)
    text = "héllo wörld 你好 🙂!"
    token_ids = tok.encode(text)
    assert len(token_ids) == len(text.encode())  # byte-level: one token per byte
    detok = IncrementalDetokenizer(tok, [1, 2, 3])
    deltas = [detok.step([t]) for t in token_ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[-2:] == ["🙂", "!"] and deltas[-3] == ""  # 4-byte emoji arrives whole
