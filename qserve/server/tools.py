"""Tool calling for chat completions: tool_choice -> constraint and parser, history -> template messages,
output -> OpenAI ``tool_calls`` (whole, or as streamed deltas).

``tool_choice``: ``none`` renders the tools but parses nothing; ``auto`` (the default with tools) parses the
output with the server's ``--tool-call-parser``; ``required`` constrains the output to a JSON array of
``{"name", "parameters"}`` calls, one of the given tools each (at most one without ``parallel_tool_calls``);
a named function constrains the output to that function's parameter schema.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from qserve.server.protocol import APIError, ChatCompletionRequest, ChatMessage
from qserve.server.tool_parsers import (
    NamedParser,
    Parsed,
    RequiredParser,
    ToolParser,
    get_parser,
)
from qserve.types import StructuredOutputsParams

ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class ToolSetup:
    """How one chat request handles tools: ``parser`` None means plain content."""

    tools: list[dict[str, Any]] | None = None  # for the chat template
    parser: ToolParser | None = None
    spec: StructuredOutputsParams | None = None  # the constraint required / named choices impose
    parallel: bool = True


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """JSON schema of a non-empty array of calls to the given tools (vLLM's shape for ``required``)."""
    items = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t["function"]["name"]]},
                "parameters": t["function"].get("parameters") or ANY_OBJECT,
            },
            "required": ["name", "parameters"],
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def tool_setup(req: ChatCompletionRequest, parser_name: str | None) -> ToolSetup:
    """The request's tools, checked (400 on a bad choice), with the constraint and parser they need."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise APIError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return ToolSetup()
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    for t in tools:
        if t["type"] != "function":
            raise APIError(400, f"tool type {t['type']!r} is not supported (only 'function')", param="tools")
    names = [t["function"]["name"] for t in tools]
    parallel = req.parallel_tool_calls is not False
    setup = ToolSetup(tools=tools, parallel=parallel)
    if choice is None:
        choice = "auto"
    if isinstance(choice, str):
        if choice == "none":
            return setup
        if choice == "auto":
            if parser_name is None:
                raise APIError(
                    400,
                    "'tool_choice': 'auto' needs the server started with --tool-call-parser "
                    "(hermes, llama3_json); 'required' or a named function work without one",
                    param="tool_choice",
                )
            setup.parser = get_parser(parser_name)
            return setup
        if choice == "required":
            setup.parser = RequiredParser()
            setup.spec = StructuredOutputsParams(json=required_schema(tools, parallel))
            return setup
        raise APIError(
            400,
            f"'tool_choice' must be none, auto, required or a function, got {choice!r}",
            param="tool_choice",
        )
    name = choice.function.name
    if name not in names:
        raise APIError(400, f"'tool_choice' names {name!r}, which is not in 'tools'", param="tool_choice")
    params = tools[names.index(name)]["function"].get("parameters") or ANY_OBJECT
    setup.parser = NamedParser(name)
    setup.spec = StructuredOutputsParams(json=params)
    return setup


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Chat messages as chat templates read them: text content, assistant ``tool_calls`` with their arguments
    as objects (what Hermes / Qwen / Llama templates expect), tool results with their ``tool_call_id``."""
    out: list[dict[str, Any]] = []
    for m in messages:
        if isinstance(m.content, list):
            if any(part.type != "text" for part in m.content):
                raise APIError(400, "only text content parts are supported", param="messages")
            content = "".join(part.text or "" for part in m.content)
        else:
            content = m.content or ""
        msg: dict[str, Any] = {"role": m.role, "content": content}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                args: Any = c.function.arguments
                if isinstance(args, str):
                    try:
                        args = json.loads(args) if args.strip() else {}
                    except ValueError:
                        raise APIError(
                            400, f"tool call {c.function.name!r}: 'arguments' is not JSON", param="messages"
                        ) from None
                call = {"type": "function", "function": {"name": c.function.name, "arguments": args}}
                calls.append({"id": c.id, **call} if c.id else call)
            msg["tool_calls"] = calls
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _done_calls(parsed: Parsed, parallel: bool) -> list[dict[str, Any]]:
    calls = [c for c in parsed.calls if c.done and c.name is not None]
    if not parallel:
        calls = calls[:1]
    return [
        {"id": call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in calls
    ]


def final_message(text: str, finish: str | None, setup: ToolSetup) -> tuple[dict[str, Any], str | None]:
    """The assistant message of a finished choice and its finish_reason ("tool_calls" when it made calls)."""
    if setup.parser is None:
        return {"role": "assistant", "content": text}, finish
    parsed = setup.parser.parse(text, final=True)
    calls = _done_calls(parsed, setup.parallel)
    if not calls:
        return {"role": "assistant", "content": text}, finish
    content = parsed.content if parsed.content.strip() else None
    reason = "tool_calls" if finish == "stop" else finish
    return {"role": "assistant", "content": content, "tool_calls": calls}, reason


@dataclass
class ToolStreamer:
    """Turns a choice's growing text into OpenAI chat deltas: content, then per call a header delta
    (index, id, type, name, empty arguments) and argument fragments, as OpenAI streams them."""

    setup: ToolSetup
    text: str = ""
    content_sent: int = 0
    ids: list[str] = field(default_factory=list)
    args_sent: list[int] = field(default_factory=list)

    @property
    def made_calls(self) -> bool:
        return bool(self.ids)

    def feed(self, new_text: str, final: bool) -> dict[str, Any]:
        """The delta for ``new_text`` (empty dict if nothing can be sent yet)."""
        assert self.setup.parser is not None
        self.text += new_text
        parsed = self.setup.parser.parse(self.text, final)
        delta: dict[str, Any] = {}
        content = parsed.content
        if len(content) > self.content_sent and not (self.ids and not content[self.content_sent :].strip()):
            delta["content"] = content[self.content_sent :]
            self.content_sent = len(content)
        calls = [c for c in parsed.calls if c.name is not None]
        if not self.setup.parallel:
            calls = calls[:1]
        pieces = []
        for k, c in enumerate(calls):
            piece: dict[str, Any] = {"index": k}
            if k >= len(self.ids):
                self.ids.append(call_id())
                self.args_sent.append(0)
                piece.update(id=self.ids[k], type="function")
                piece["function"] = {"name": c.name, "arguments": ""}
            frag = c.arguments[self.args_sent[k] :]
            if frag:
                piece.setdefault("function", {})["arguments"] = frag
                self.args_sent[k] = len(c.arguments)
            if len(piece) > 1:
                pieces.append(piece)
        if pieces:
            delta["tool_calls"] = pieces
        return delta
