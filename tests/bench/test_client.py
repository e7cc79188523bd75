"""The streaming client on canned server answers (httpx MockTransport): token counting and error types."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import Any

from qserve.bench.client import BenchClient, RequestResult
from qserve.bench.workloads import RequestSpec
from tests.server.conftest import httpx


def sse(*chunks: Any) -> bytes:
    return "".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks).encode()


def run(
    handler: Callable[[httpx.Request], httpx.Response], endpoint: str = "completions"
) -> tuple[RequestResult, list[dict[str, Any]]]:
    bodies: list[dict[str, Any]] = []

    def record(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return handler(request)

    ticks = itertools.count()

    async def go() -> RequestResult:
        async with BenchClient(
            "http://server", "m", clock=lambda: float(next(ticks)), endpoint=endpoint,
            transport=httpx.MockTransport(record),
        ) as client:  # fmt: skip
            return await client.send(RequestSpec([5, 6, 7], 4, session="s1", turn=2), 3)

    return asyncio.run(go()), bodies


def test_token_ids_usage_and_request_body() -> None:
    stream = sse(
        {"choices": [{"index": 0, "text": "a", "token_ids": [11]}]},
        {"choices": [{"index": 0, "text": "bc", "token_ids": [12, 13]}]},
        {"choices": [{"index": 0, "text": "", "token_ids": [14], "finish_reason": "length"}]},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}},
        "[DONE]",
    )
    res, bodies = run(lambda r: httpx.Response(200, content=stream))
    assert res.ok and res.index == 3 and res.session == "s1" and res.turn == 2
    assert res.chunk_tokens == [1, 2, 1] and res.output_tokens == 4 and res.prompt_tokens == 3
    assert res.send_time == 0.0 and res.chunk_times == [1.0, 2.0, 3.0] and res.end_time == 4.0
    body = bodies[0]
    assert body["prompt"] == [5, 6, 7] and body["max_tokens"] == 4 and body["ignore_eos"] is True
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["user"] == "s1" and body["model"] == "m"


def test_chat_role_header_is_not_a_token_and_chunks_count_without_usage() -> None:
    stream = sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"content": "x"}}]},
        {"choices": [{"index": 0, "delta": {"content": ""}}]},  # a token whose text is held back
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
        "[DONE]",
    )
    res, bodies = run(lambda r: httpx.Response(200, content=stream), endpoint="chat")
    assert res.ok and res.chunk_tokens == [1, 1, 1] and res.output_tokens == 3
    assert res.chunk_times == [1.0, 2.0, 3.0]  # the role header is not timed as a token
    assert bodies[0]["messages"][0]["content"].split() == ["is", "that", "for"]  # ids 5, 6, 7 as words


def test_error_types() -> None:
    def raise_(exc: Exception) -> Callable[[httpx.Request], httpx.Response]:
        def handler(request: httpx.Request) -> httpx.Response:
            raise exc

        return handler

    cases: list[tuple[Callable[[httpx.Request], httpx.Response], str]] = [
        (lambda r: httpx.Response(429, json={"error": {"message": "queue full"}}), "http_429"),
        (lambda r: httpx.Response(400, json={"error": {"message": "too long"}}), "http_400"),
        (lambda r: httpx.Response(200, content=sse({"error": {"message": "engine"}})), "stream_error"),
        (lambda r: httpx.Response(200, content=sse({"choices": [{"text": "a"}]})), "incomplete"),
        (lambda r: httpx.Response(200, content=b"data: {not json\n\n"), "bad_response"),
        (raise_(httpx.ConnectError("refused")), "connection"),
        (raise_(httpx.ReadTimeout("slow")), "timeout"),
    ]
    for handler, kind in cases:
        res, _ = run(handler)
        assert res.error == kind, (kind, res)
        assert not res.ok and res.error_message
    res, _ = run(cases[0][0])
    assert "queue full" in (res.error_message or "")
