"""Tool-call parsers: model output text -> content + tool calls, complete or while streaming.

Every parser reads the whole text generated so far and returns a :class:`Parsed`: the content that is
certain to be content, and each call's name and raw argument text so far. A streamer diffs consecutive
results, so streamed argument deltas concatenate to exactly the final ``arguments`` string.

Formats (names as vLLM's ``--tool-call-parser``):
  ``hermes``      Hermes / Qwen: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, content around it.
  ``llama3_json`` Llama 3.x: the output is ``{"name": ..., "parameters": {...}}`` (``;``-separated for several),
                  optionally after ``<|python_tag|>``; any other output is content.
Internal ones: ``required`` (a JSON array of calls, what ``tool_choice: required`` constrains the output to) and
``named`` (the output is the arguments of one forced function).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGS = re.compile(r'"(?:arguments|parameters)"\s*:\s*')
_SCALAR = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?|true|false|null")


@dataclass
class CallProgress:
    name: str | None
    arguments: str  # raw JSON text of the arguments so far
    done: bool


@dataclass
class Parsed:
    content: str
    calls: list[CallProgress] = field(default_factory=list)


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\r\n":
        i += 1
    return i


def value_end(s: str, i: int) -> int | None:
    """Index just past the JSON value starting at ``s[i]``, or None while it is incomplete."""
    if i >= len(s):
        return None
    c = s[i]
    if c == '"':
        j = i + 1
        while j < len(s):
            if s[j] == "\\":
                j += 2
                continue
            if s[j] == '"':
                return j + 1
            j += 1
        return None
    if c in "{[":
        depth, in_str, esc = 0, False, False
        for j in range(i, len(s)):
            ch = s[j]
            if in_str:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    return j + 1
        return None
    m = _SCALAR.match(s, i)
    return m.end() if m and m.end() < len(s) else None


def scan_call(s: str, i: int) -> tuple[CallProgress, int | None]:
    """The call in the JSON object at ``s[i]`` (``{"name": ..., "arguments"|"parameters": ...}``) and the
    index past it (None while incomplete)."""
    end = value_end(s, i)
    body = s[i:end] if end is not None else s[i:]
    m_args = _ARGS.search(body)
    m_name = _NAME.search(body, 0, m_args.start() if m_args else len(body))
    if end is not None:
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            args = obj.get("arguments", obj.get("parameters", {}))
            if (
                m_args is not None
                and (a_end := value_end(body, m_args.end())) is not None
                and (not isinstance(args, str))
            ):
                raw = body[m_args.end() : a_end]
            else:
                raw = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
            return CallProgress(obj["name"], raw, True), end
        return CallProgress(None, "", True), end  # not a call: dropped
    name = json.loads(f'"{m_name.group(1)}"') if m_name else None
    if name is None or m_args is None:
        return CallProgress(name, "", False), None
    a_end = value_end(body, m_args.end())
    raw = body[m_args.end() : a_end] if a_end is not None else body[m_args.end() :]
    return CallProgress(name, raw, False), None


def _holdback(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolParser:
    """Base: parse(text, final) -> Parsed."""

    def parse(self, text: str, final: bool) -> Parsed:  # pragma: no cover - interface
        raise NotImplementedError


class HermesParser(ToolParser):
    START, END = "<tool_call>", "</tool_call>"

    def parse(self, text: str, final: bool) -> Parsed:
        out = Parsed("")
        pos = 0
        while True:
            k = text.find(self.START, pos)
            if k < 0:
                tail = text[pos:]
                out.content += tail if final else tail[: len(tail) - _holdback(tail, self.START)]
                return out
            out.content += text[pos:k]
            j = _skip_ws(text, k + len(self.START))
            close = text.find(self.END, j)
            if j < len(text) and text[j] == "{":
                call, end = scan_call(text, j)
                if call.name is not None or not call.done:
                    out.calls.append(call)
            if close < 0:
                return out
            pos = close + len(self.END)


class Llama3JsonParser(ToolParser):
    TAG = "<|python_tag|>"

    def parse(self, text: str, final: bool) -> Parsed:
        i = _skip_ws(text, 0)
        if text.startswith(self.TAG, i):
            i = _skip_ws(text, i + len(self.TAG))
        elif not final and self.TAG.startswith(text[i:]):
            return Parsed("")  # may still become the tag (or nothing but whitespace so far)
        if i >= len(text) or text[i] != "{":
            return Parsed(text if (final or i < len(text)) else "")
        return _calls_from(text, i, sep=";", close=None)


class RequiredParser(ToolParser):
    """``[{"name": ..., "parameters": {...}}, ...]``: the output ``tool_choice: required`` is held to."""

    def parse(self, text: str, final: bool) -> Parsed:
        i = _skip_ws(text, 0)
        if i >= len(text) or text[i] != "[":
            return Parsed("")
        return _calls_from(text, _skip_ws(text, i + 1), sep=",", close="]")


class NamedParser(ToolParser):
    """The whole output is the arguments of the forced function ``name``."""

    def __init__(self, name: str):
        self.name = name

    def parse(self, text: str, final: bool) -> Parsed:
        raw = text.strip() if final else text.lstrip()
        return Parsed("", [CallProgress(self.name, raw, final)])


def _calls_from(text: str, i: int, sep: str, close: str | None) -> Parsed:
    out = Parsed("")
    while i < len(text) and text[i] == "{":
        call, end = scan_call(text, i)
        if call.name is not None or not call.done:
            out.calls.append(call)
        if end is None:
            break
        i = _skip_ws(text, end)
        if i < len(text) and text[i] == sep:
            i = _skip_ws(text, i + 1)
        elif close is not None and i < len(text) and text[i] == close:
            break
    return out


TOOL_PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesParser, "llama3_json": Llama3JsonParser}


def get_parser(name: str) -> ToolParser:
    try:
        return TOOL_PARSERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown tool-call parser {name!r}: choose from {', '.join(TOOL_PARSERS)}"
        ) from None
