"""Per-choice streaming state (stop-string hold-back) and OpenAI's two logprobs formats."""

from __future__ import annotations

import time
from typing import Any

from qserve.server.engine_thread import Delta
from qserve.types import TokenLogprob


class TokenTexts:
    """Token id -> its text, cached (one id at a time is how logprobs name tokens, and it is slow)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.cache[token_id] = str(self.tokenizer.decode([token_id], skip_special_tokens=False))
        return s


def stop_holdback(text: str, stops: list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a stop string: text that a later
    token may still turn into a stop string (which is never sent), so streaming holds it back."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Choice:
    """What the HTTP side knows about one engine request: accumulated from its Deltas."""

    def __init__(self, prompt_ids: list[int], echo_text: str, stops: list[str], echo: bool):
        self.prompt_ids = prompt_ids
        self.echo_text = echo_text  # the prompt's text, prepended to the output when echo is on
        self.stops = stops
        self.echo = echo
        self.text = ""  # output text so far (stop strings cut once finished)
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.num_output_tokens = 0
        self.finish: str | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.token_gap: float | None = None  # seconds since the previous tokens, when the last delta had some
        # streaming progress
        self.sent = 0  # chars of ``text`` already sent
        self.lp_sent = 0  # entries of ``logprobs`` already sent
        self.echoed = False
        self.prompt_lp_sent = False
        self.text_offset = 0  # legacy logprobs: chars of token text already numbered
        self.tools: Any = None  # chat with a tool parser: its ToolStreamer (server/tools.py)

    def update(self, d: Delta) -> None:
        self.text = d.text
        self.token_gap = None
        if d.token_ids:
            now = time.monotonic()
            if self.first_token_time is None:
                self.first_token_time = now
            else:
                assert self.last_token_time is not None
                self.token_gap = now - self.last_token_time
            self.last_token_time = now
        if d.logprobs:
            self.logprobs.extend(d.logprobs)
        if d.prompt_logprobs is not None:
            self.prompt_logprobs = d.prompt_logprobs
        self.num_output_tokens = max(self.num_output_tokens, d.num_output_tokens)
        if d.finished:
            self.finish = d.finish_reason

    def take(self, finished: bool) -> tuple[str, list[TokenLogprob]]:
        """Streaming: the text safe to send now (never any part of a stop string: a tail that may still
        become one is held back until it cannot), and the logprobs not sent yet."""
        end = len(self.text) if finished else len(self.text) - stop_holdback(self.text, self.stops)
        text = self.text[self.sent : end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        tokens = self.logprobs[self.lp_sent :]
        self.lp_sent = len(self.logprobs)
        if self.echo and not self.echoed:
            text = self.echo_text + text
            self.echoed = True
        return text, tokens


def completion_logprobs(
    c: Choice, tt: TokenTexts, tokens: list[TokenLogprob] | None = None
) -> dict[str, Any]:
    """OpenAI's legacy format: ``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``.

    ``tokens`` None formats the whole choice; otherwise one streamed chunk's tokens. With echo the
    prompt's own tokens come first (the first has no logprob: ``None``), once.
    """
    entries: list[tuple[int, TokenLogprob | None]] = []
    if tokens is None:
        c.text_offset = 0
        c.prompt_lp_sent = False
        tokens = c.logprobs
    if c.echo and not c.prompt_lp_sent:
        plp = c.prompt_logprobs or []
        entries += [(t, plp[i] if i < len(plp) else None) for i, t in enumerate(c.prompt_ids)]
        c.prompt_lp_sent = True
    entries += [(lp.token_id, lp) for lp in tokens]
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, lp in entries:
        s = tt(token_id)
        out["tokens"].append(s)
        out["text_offset"].append(c.text_offset)
        c.text_offset += len(s)
        if lp is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        top = {tt(t): v for t, v in lp.top.items()}
        top.setdefault(s, lp.logprob)  # the chosen token is always listed (as vLLM does)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append(top)
    return out


def _chat_entry(tt: TokenTexts, token_id: int, logprob: float) -> dict[str, Any]:
    s = tt(token_id)
    return {"token": s, "logprob": logprob, "bytes": list(s.encode("utf-8"))}


def chat_logprobs(tokens: list[TokenLogprob], tt: TokenTexts) -> dict[str, Any]:
    """The chat format: ``{"content": [{token, logprob, bytes, top_logprobs: [...]}]}``."""
    content = []
    for lp in tokens:
        entry = _chat_entry(tt, lp.token_id, lp.logprob)
        ranked = sorted(lp.top.items(), key=lambda kv: -kv[1])
        entry["top_logprobs"] = [_chat_entry(tt, t, v) for t, v in ranked]
        content.append(entry)
    return {"content": content}
