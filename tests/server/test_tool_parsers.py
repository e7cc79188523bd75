"""Tool-call parsers and the streamer: final parses, and streamed deltas that add up to the final calls."""

from __future__ import annotations

import json
from typing import Any

import pytest

from qserve.server.protocol import APIError, ChatCompletionRequest
from qserve.server.tool_parsers import HermesParser, Llama3JsonParser, RequiredParser, value_end
from qserve.server.tools import ToolSetup, ToolStreamer, final_message, required_schema, tool_setup

HERMES = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris \\"FR\\"", "days": [1, 2]}}\n'
    '</tool_call>\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": {"c": "}"}}}\n</tool_call>'
)
LLAMA = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "add", "parameters": {"a": 2}}'
REQUIRED = '[{"name": "get_weather", "parameters": {"city": "Rome"}}, {"name": "add", "parameters": {"a": 3, "b": 4}}]'


def test_value_end() -> None:
    s = '{"a": "}", "b": [1, {"c": 2}]} tail'
    assert s[: value_end(s, 0)] == '{"a": "}", "b": [1, {"c": 2}]}'
    assert value_end('{"a": [1, 2', 0) is None
    assert value_end('"x\\"y" z', 0) == 6
    assert value_end("12", 0) is None  # a number may still go on
    assert value_end("12,", 0) == 2


@pytest.mark.parametrize(
    ("parser", "text", "content", "calls"),
    [
        (
            HermesParser(),
            HERMES,
            "Let me check.\n\n",
            [("get_weather", {"city": 'Paris "FR"', "days": [1, 2]}), ("add", {"a": 1, "b": {"c": "}"}})],
        ),
        (Llama3JsonParser(), LLAMA, "", [("get_weather", {"city": "Oslo"}), ("add", {"a": 2})]),
        (RequiredParser(), REQUIRED, "", [("get_weather", {"city": "Rome"}), ("add", {"a": 3, "b": 4})]),
        (HermesParser(), "no calls here <tool", "no calls here <tool", []),
        (Llama3JsonParser(), "plain answer", "plain answer", []),
    ],
)
def test_final_parse_and_streamed_deltas_agree(
    parser: Any, text: str, content: str, calls: list[Any]
) -> None:
    parsed = parser.parse(text, final=True)
    assert parsed.content == content
    done = [(c.name, json.loads(c.arguments)) for c in parsed.calls if c.done]
    assert done == calls
    # stream it a few characters at a time: the deltas must add up to the same content and calls
    streamer = ToolStreamer(ToolSetup(parser=parser))
    got_content = ""
    got: dict[int, dict[str, Any]] = {}
    for k in range(0, len(text), 3):
        delta = streamer.feed(text[k : k + 3], final=k + 3 >= len(text))
        got_content += delta.get("content", "")
        for piece in delta.get("tool_calls", []):
            entry = got.setdefault(piece["index"], {"arguments": ""})
            if "id" in piece:
                assert "id" not in entry and piece["type"] == "function"
                entry.update(id=piece["id"], name=piece["function"]["name"])
            entry["arguments"] += piece.get("function", {}).get("arguments", "")
    assert [(got[i]["name"], json.loads(got[i]["arguments"])) for i in sorted(got)] == calls
    assert all(e["id"].startswith("call_") for e in got.values())
    if not calls:
        assert got_content == content
    else:
        assert got_content.strip() == content.strip()


def test_hermes_holds_back_a_partial_tag_while_streaming() -> None:
    assert HermesParser().parse("Sure <tool_c", final=False).content == "Sure "
    assert HermesParser().parse("Sure <tool_c", final=True).content == "Sure <tool_c"


def test_final_message() -> None:
    msg, reason = final_message(HERMES, "stop", ToolSetup(parser=HermesParser()))
    assert reason == "tool_calls" and msg["content"] == "Let me check.\n\n"
    assert [c["function"]["name"] for c in msg["tool_calls"]] == ["get_weather", "add"]
    msg, reason = final_message(HERMES, "stop", ToolSetup(parser=HermesParser(), parallel=False))
    assert len(msg["tool_calls"]) == 1
    msg, reason = final_message("hello", "stop", ToolSetup(parser=HermesParser()))
    assert msg == {"role": "assistant", "content": "hello"} and reason == "stop"
    # cut short inside a call: no call, the raw text stays content, finish_reason stays
    msg, reason = final_message(
        '<tool_call>{"name": "add", "argu', "length", ToolSetup(parser=HermesParser())
    )
    assert "tool_calls" not in msg and reason == "length"


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
        },
    },
    {"type": "function", "function": {"name": "now"}},
]


def req(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}], **kw})


def test_tool_setup_choices_and_errors() -> None:
    assert tool_setup(req(), None).parser is None
    assert tool_setup(req(tools=TOOLS, tool_choice="none"), None).parser is None
    auto = tool_setup(req(tools=TOOLS), "hermes")
    assert isinstance(auto.parser, HermesParser) and auto.spec is None
    required = tool_setup(req(tools=TOOLS, tool_choice="required", parallel_tool_calls=False), None)
    assert required.spec is not None and required.spec.json == required_schema(required.tools or [], False)
    assert required.spec.json["maxItems"] == 1
    named = tool_setup(req(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "now"}}), None)
    assert named.spec is not None and named.spec.json == {"type": "object"}
    for kw, parser, words in (
        ({"tools": TOOLS}, None, "--tool-call-parser"),
        ({"tool_choice": "required"}, None, "needs 'tools'"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, None, "must be none"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, None, "not in"),
    ):
        with pytest.raises(APIError, match=words):
            tool_setup(req(**kw), parser)
