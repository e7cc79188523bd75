"""The agents' API with the official client against a real `qserve serve demo --tool-call-parser hermes`:
structured outputs, tool calls (required, named, auto, streamed, with tool results in the history), the
sampling fields, and the unknown-field policy."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from qserve.config import resolve_model_path
from qserve.tokenizer import load_tokenizer
from tests.server.conftest import ServerProcess

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 20},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "genre": {"enum": ["drama", "comedy", "horror"]},
        "cast": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 10},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                },
                "required": ["name", "age"],
            },
            "minItems": 1,
            "maxItems": 2,
        },
    },
    "required": ["title", "rating", "genre", "cast"],
}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": -50, "maximum": 50},
    },
    "required": ["a", "b"],
}
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "description": "Adds", "parameters": ADD}},
]
PARAMS = {"get_weather": WEATHER, "add": ADD}
USER: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "agents-server.log"
    srv = ServerProcess(Path("demo"), log, "--tool-call-parser", "hermes", "--max-num-seqs", "16")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(demo_server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=demo_server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def test_response_format_json_schema_over_seeds(client: openai.OpenAI) -> None:
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "movie", "schema": SCHEMA, "strict": True}}
    texts = []
    for seed in (1, 100):  # n=4 per request: choice i samples with seed + i
        r = client.chat.completions.create(
            model="demo", messages=USER, max_tokens=120, temperature=1.0, seed=seed, n=4, response_format=fmt
        )
        for c in r.choices:
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.message.content or ""), SCHEMA)
            texts.append(c.message.content)
    assert len(set(texts)) >= 6
    # streamed: the deltas concatenate to a valid document too
    stream = client.chat.completions.create(
        model="demo", messages=USER, max_tokens=120, temperature=1.0, seed=5, response_format=fmt, stream=True
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_completions_structured_outputs_and_guided_names(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="demo",
        prompt="id:",
        max_tokens=20,
        seed=3,
        n=3,
        extra_body={"structured_outputs": {"regex": r"[A-Z]{3}-\d{4}"}},
    )
    assert all(re.fullmatch(r"[A-Z]{3}-\d{4}", c.text) for c in r.choices)
    r = client.completions.create(
        model="demo", prompt="pick:", max_tokens=8, seed=4, n=4, extra_body={"guided_choice": ["yes", "no"]}
    )
    assert {c.text for c in r.choices} <= {"yes", "no"}
    r = client.completions.create(
        model="demo",
        prompt="{",
        max_tokens=120,
        seed=9,
        stop=["\n\n"],
        extra_body={
            "response_format": {"type": "json_schema", "json_schema": {"name": "m", "schema": SCHEMA}}
        },
    )
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


def check_calls(calls: Any, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_tool_choice_required_and_named(client: openai.OpenAI) -> None:
    for seed in range(3):
        r = client.chat.completions.create(
            model="demo", messages=USER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
            max_tokens=100, seed=seed,
        )  # fmt: skip
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        check_calls(c.message.tool_calls, {"get_weather", "add"})
        assert len(c.message.tool_calls or []) == 1
    # parallel: the demo model keeps calling until max_tokens; every complete call is returned, and valid
    r = client.chat.completions.create(
        model="demo", messages=USER, tools=TOOLS, tool_choice="required", max_tokens=150, seed=1
    )
    assert r.choices[0].finish_reason == "length" and len(r.choices[0].message.tool_calls or []) >= 2
    check_calls(r.choices[0].message.tool_calls, {"get_weather", "add"})
    named: Any = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(
        model="demo", messages=USER, tools=TOOLS, tool_choice=named, max_tokens=80, seed=2, n=2
    )
    for c in r.choices:
        assert c.finish_reason == "tool_calls"
        check_calls(c.message.tool_calls, {"get_weather"})
        assert len(c.message.tool_calls or []) == 1


def collect_stream(stream: Any) -> tuple[dict[int, dict[str, str]], str | None, str]:
    calls: dict[int, dict[str, str]] = {}
    finish, content = None, ""
    for ch in stream:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            if tc.id is not None:
                assert tc.index not in calls and tc.type == "function"
                calls[tc.index] = {
                    "id": tc.id,
                    "name": tc.function.name,
                    "arguments": tc.function.arguments or "",
                }
            else:
                calls[tc.index]["arguments"] += tc.function.arguments or ""
        finish = ch.choices[0].finish_reason or finish
    return calls, finish, content


def test_streamed_tool_calls_send_argument_deltas(client: openai.OpenAI) -> None:
    kw: Any = dict(model="demo", messages=USER, tools=TOOLS, tool_choice="required", max_tokens=150, seed=0)
    calls, finish, _ = collect_stream(client.chat.completions.create(stream=True, **kw))
    assert finish == "length" and len(calls) >= 2
    complete = [calls[i] for i in sorted(calls)][:-1]  # the last one was cut by max_tokens
    for call in complete:
        assert call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), PARAMS[call["name"]])
    # the same request unstreamed makes the same calls (same seed)
    r = client.chat.completions.create(**kw)
    got = [
        (tc.function.name, json.loads(tc.function.arguments)) for tc in r.choices[0].message.tool_calls or []
    ]
    assert got == [(c["name"], json.loads(c["arguments"])) for c in complete]
    one = dict(kw, parallel_tool_calls=False, max_tokens=100)
    calls, finish, content = collect_stream(client.chat.completions.create(stream=True, **one))
    assert finish == "tool_calls" and len(calls) == 1 and content == ""
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMS[calls[0]["name"]])


HERMES_CALL = r'Checking\.\n<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{2,8}", "unit": "c"\}\}\n</tool_call>'


@pytest.mark.parametrize("stream", [False, True])
def test_auto_parses_the_hermes_format(client: openai.OpenAI, stream: bool) -> None:
    """tool_choice auto through the hermes parser, on output forced into the template's call format."""
    kw: Any = dict(
        model="demo",
        messages=USER,
        tools=TOOLS,
        max_tokens=80,
        seed=1,
        extra_body={"structured_outputs": {"regex": HERMES_CALL}},
    )
    if stream:
        calls, finish, content = collect_stream(client.chat.completions.create(stream=True, **kw))
        assert finish == "tool_calls" and content.strip() == "Checking."
        assert [c["name"] for c in calls.values()] == ["get_weather"]
        jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)
    else:
        c = client.chat.completions.create(**kw).choices[0]
        assert c.finish_reason == "tool_calls" and (c.message.content or "").strip() == "Checking."
        check_calls(c.message.tool_calls, {"get_weather"})


def test_history_with_tool_calls_and_results(client: openai.OpenAI) -> None:
    history: list[Any] = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    r = client.chat.completions.create(
        model="demo", messages=history, tools=TOOLS, max_tokens=8, temperature=0
    )
    base = client.chat.completions.create(
        model="demo", messages=USER, tools=TOOLS, max_tokens=8, temperature=0
    )
    assert r.usage and base.usage and r.usage.prompt_tokens > base.usage.prompt_tokens + 15
    tok = load_tokenizer(resolve_model_path("demo"))
    text = tok.apply_chat_template(history, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert '{"city": "Paris", "unit": "c"}' in text and "18 degrees, sunny" in text and "get_weather" in text
    assert r.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))


def test_sampling_fields_over_http(client: openai.OpenAI) -> None:
    tok = load_tokenizer(resolve_model_path("demo"))
    target = tok.encode(" the", add_special_tokens=False)[0]
    r = client.completions.create(
        model="demo", prompt="x", max_tokens=5, temperature=1.0, logit_bias={str(target): 100}
    )
    assert r.choices[0].text == tok.decode([target] * 5)
    r = client.chat.completions.create(
        model="demo", messages=USER, max_tokens=12, temperature=0, presence_penalty=1.5, frequency_penalty=1.0,
        extra_body={"repetition_penalty": 1.3, "min_p": 0.05, "min_tokens": 10, "bad_words": ["the"], "stop_token_ids": [0]},
    )  # fmt: skip
    assert r.usage and r.usage.completion_tokens >= 10
    eos = tok.eos_token_id
    r = client.completions.create(
        model="demo",
        prompt="x",
        max_tokens=20,
        temperature=0,
        logit_bias={str(eos): 100},
        extra_body={"min_tokens": 6},
    )
    assert r.usage and r.usage.completion_tokens == 7 and r.choices[0].finish_reason == "stop"


def test_bad_inputs_get_400_with_the_parser_message(
    client: openai.OpenAI, demo_server: ServerProcess
) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, "response_format", "nonsense"),
        ({"extra_body": {"structured_outputs": {"regex": "[a-"}}}, "structured_outputs", "Unclosed"),
        ({"extra_body": {"structured_outputs": {"grammar": "root ::= nothing_here"}}}, "structured_outputs", "nothing_here"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["a"]}}}, "structured_outputs", "exactly one"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "guided_regex", "only one"),
        ({"extra_body": {"mirostat": 2}}, "mirostat", "not supported"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ({"presence_penalty": 3.0}, "presence_penalty", "presence_penalty"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not in 'tools'"),
    ]  # fmt: skip
    for kw, param, words in cases:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="demo", messages=USER, max_tokens=4, **kw)
        body: Any = e.value.body
        assert words in body["message"] and body["param"] == param, (kw, body)
    # an unknown field passes, with one warning per name
    for _ in range(2):
        client.chat.completions.create(
            model="demo", messages=USER, max_tokens=2, extra_body={"my_vendor_flag": 1}
        )
    assert demo_server.output().count("'my_vendor_flag'") == 1
