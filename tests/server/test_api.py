"""The OpenAI-compatible API through the official `openai` client against a real server process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from openai.types import Completion
from openai.types.chat import ChatCompletionMessageParam

from qserve.engine.metrics import METRIC_NAMES
from tests.server.conftest import API_KEY, CHAT_TEMPLATE, ServerProcess, httpx, metric

METRICS = METRIC_NAMES


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def greedy(client: openai.OpenAI, prompt: str, max_tokens: int = 24, **kw: Any) -> Completion:
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def test_models_health_metrics(server: ServerProcess, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    text = httpx.get(server.url + "/metrics").text
    for name in METRICS:
        assert f"qserve_{name}" in text, name
    assert metric(text, "qserve_kv_cache_capacity_tokens") > 0
    # the start-up plan
    out = server.output()
    for word in ("weights", "B/token", "tokens", "sequences at max_model_len", "max_num_seqs",
                 "step          buffers ", "no CUDA graphs (CPU)"):  # fmt: skip
        assert word in out


def test_completion_and_usage(client: openai.OpenAI) -> None:
    r = greedy(client, "def f(x):", max_tokens=12, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == "tiny"
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (9, 12, 21)
    # a batch of prompts, as strings and as token ids (byte-level: id == byte)
    ids = list(b"def f(x):")
    eos = {"ignore_eos": True}
    by_ids = client.completions.create(
        model="tiny", prompt=[ids, ids[:3]], max_tokens=12, temperature=0, extra_body=eos
    )
    by_text = client.completions.create(
        model="tiny", prompt=["def f(x):", "def"], max_tokens=12, temperature=0, extra_body=eos
    )
    assert by_ids.choices[0].text == by_text.choices[0].text == r.choices[0].text
    assert by_ids.choices[1].text == by_text.choices[1].text
    assert [c.index for c in by_text.choices] == [0, 1]


def test_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    full = greedy(client, "import os", max_tokens=20, extra_body={"ignore_eos": True})
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="import os",
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20


def test_stop_strings_never_streamed(client: openai.OpenAI) -> None:
    full = greedy(client, "hello", max_tokens=48, extra_body={"ignore_eos": True}).choices[0].text
    # a 3-character stop string from the middle of the greedy output, clear of undecodable bytes
    k = next(i for i in range(8, len(full) - 3) if "\ufffd" not in full[i : i + 3])
    stop = full[k : k + 3]
    want = full[: full.index(stop)]
    r = greedy(client, "hello", max_tokens=48, stop=[stop, "\x00never"], extra_body={"ignore_eos": True})
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    for extra_stop in ([], ["zq" + stop[0]]):  # a prefix that starts matching but never completes
        stream = client.completions.create(
            model="tiny",
            prompt="hello",
            max_tokens=48,
            temperature=0,
            stop=[stop, *extra_stop],
            stream=True,
            extra_body={"ignore_eos": True},
        )
        pieces = [c.choices[0].text for c in stream]
        assert "".join(pieces) == want  # no piece of the stop string was ever sent
        assert stop not in "".join(pieces)


def test_seed_reproducible_and_n(client: openai.OpenAI) -> None:
    kw = dict(model="tiny", prompt="x = ", max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.completions.create(seed=7, **kw)  # type: ignore[call-overload]
    b = client.completions.create(seed=7, **kw)  # type: ignore[call-overload]
    c = client.completions.create(seed=8, **kw)  # type: ignore[call-overload]
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].text != c.choices[0].text
    many = client.completions.create(seed=7, n=3, **kw)  # type: ignore[call-overload]
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert many.choices[0].text == a.choices[0].text  # choice i samples with seed + i
    assert many.choices[1].text == c.choices[0].text
    assert many.usage is not None and many.usage.completion_tokens == 48
    assert many.usage.prompt_tokens == 4  # the prompt counts once


def test_echo_logprobs_scores_the_prompt(client: openai.OpenAI, chat_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    prompt = "def add(a, b):"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=3)
    ch = r.choices[0]
    assert ch.text == prompt
    lp = ch.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    assert "".join(lp.tokens) == prompt and lp.text_offset == list(range(len(prompt)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(3 <= len(t) <= 4 for t in lp.top_logprobs[1:])  # top 3 (+ the actual token)
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 0)
    # the same numbers as transformers computes
    hf = AutoModelForCausalLM.from_pretrained(str(chat_model), dtype=torch.float32)
    ids = torch.tensor([list(prompt.encode())])
    with torch.no_grad():
        ref = torch.log_softmax(hf(ids).logits[0].float(), -1)
    want = [ref[i - 1, ids[0, i]].item() for i in range(1, ids.shape[1])]
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-3)
    # echo with generation: prompt text + generated text, logprobs for both
    r2 = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=4, echo=True, logprobs=1, temperature=0
    )
    assert r2.choices[0].text.startswith(prompt)
    assert r2.choices[0].logprobs is not None and len(r2.choices[0].logprobs.tokens or []) == len(prompt) + 4


def test_chat_uses_the_template(client: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    rendered = "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    assert r.usage is not None and r.usage.prompt_tokens == len(rendered.encode())
    assert "<|assistant|>" in CHAT_TEMPLATE
    # the chat answer is the completion of the rendered prompt
    assert greedy(client, rendered, max_tokens=10).choices[0].text == r.choices[0].message.content
    # streaming chat: a role delta first, then content, then finish_reason
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    # logprobs in the chat format
    r3 = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    assert r3.choices[0].logprobs is not None
    content = r3.choices[0].logprobs.content
    assert content is not None and len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
