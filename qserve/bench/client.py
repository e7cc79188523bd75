"""An async streaming client for OpenAI-compatible servers: one `RequestResult` per request sent.

Every request streams (``stream: true``, ``stream_options.include_usage``) with ``ignore_eos`` and greedy
sampling. A chunk that carries choices is one step's output: its tokens are ``len(token_ids)`` when the
server sends them (vLLM's ``return_token_ids``), else 1. The final usage, when the server sends it, is the
authoritative token count. Failures never raise: they end as ``RequestResult.error``, a short type.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from qserve.bench.workloads import RequestSpec, to_text

try:  # the HTTP client the installed `openai` is built on (recent releases: httpx2, older: httpx)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

HTTPError = httpx.HTTPError
TransportError = httpx.TransportError


@dataclass
class RequestResult:
    """What the client saw of one request. Times are seconds since the run's start.

    Invariants: ``send_time <= first_token_time <= chunk_times[i] <= end_time``; ``chunk_times[0]`` is the
    first token's time; ``len(chunk_times) == len(chunk_tokens)``. ``error`` is None for a request that
    streamed to ``[DONE]``, else a type such as ``http_429``, ``timeout``, ``connection``, ``stream_error``.
    """

    index: int
    send_time: float
    end_time: float = 0.0
    output_len: int = 0  # requested (max_tokens)
    prompt_tokens: int | None = None  # usage.prompt_tokens, else the client's count for token ids
    output_tokens: int = 0  # usage.completion_tokens, else the sum of chunk_tokens
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    session: str | None = None
    turn: int = 0
    error: str | None = None
    error_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def first_token_time(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None


def error_type(exc: BaseException) -> str:
    """A short name for a failure: timeout, connection, bad_response, or the exception's class name."""
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.TransportError):
        return "connection"
    if isinstance(exc, (json.JSONDecodeError, KeyError, TypeError, ValueError)):
        return "bad_response"
    return type(exc).__name__


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class BenchClient:
    """One connection pool to the server; ``clock()`` gives seconds since the run's start."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        clock: Callable[[], float],
        api_key: str | None = None,
        endpoint: str = "completions",
        timeout: float = 600.0,
        max_connections: int = 64,
        extra_body: dict[str, Any] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,  # tests: httpx.MockTransport
    ):
        self.model = model
        self.clock = clock
        self.endpoint = endpoint
        self.extra_body = extra_body or {}
        self.http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers=auth_headers(api_key),
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
        )

    async def __aenter__(self) -> BenchClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.http.aclose()

    def body(self, spec: RequestSpec) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) for ``spec``: token ids go to /v1/completions as they are; the chat endpoint
        gets text (token ids as words)."""
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": spec.output_len,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if spec.session is not None:
            body["user"] = spec.session
        if self.endpoint == "chat":
            text = spec.prompt if isinstance(spec.prompt, str) else to_text(spec.prompt)
            body["messages"] = [{"role": "user", "content": text}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = spec.prompt
            path = "/v1/completions"
        return path, {**body, **self.extra_body}

    async def send(self, spec: RequestSpec, index: int) -> RequestResult:
        """Send one streaming request and time it; never raises (except cancellation)."""
        path, body = self.body(spec)
        res = RequestResult(
            index=index,
            send_time=self.clock(),
            output_len=spec.output_len,
            prompt_tokens=spec.prompt_tokens,
            session=spec.session,
            turn=spec.turn,
        )
        try:
            async with self.http.stream("POST", path, json=body) as r:
                if r.status_code != 200:
                    res.error = f"http_{r.status_code}"
                    res.error_message = (await r.aread()).decode(errors="replace")[:300]
                else:
                    await self._read_stream(r, res)
        except Exception as e:
            res.error, res.error_message = error_type(e), f"{type(e).__name__}: {e}"[:300]
        res.end_time = self.clock()
        return res

    async def _read_stream(self, r: httpx.Response, res: RequestResult) -> None:
        usage: dict[str, Any] | None = None
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                res.error, res.error_message = "stream_error", json.dumps(chunk["error"])[:300]
                return
            if chunk.get("usage"):
                usage = chunk["usage"]
            tokens = sum(self._chunk_tokens(c) for c in chunk.get("choices") or [])
            if tokens:
                res.chunk_times.append(self.clock())
                res.chunk_tokens.append(tokens)
        if not done:
            res.error, res.error_message = "incomplete", "the stream ended without [DONE]"
        if usage is not None:
            res.output_tokens = int(usage["completion_tokens"])
            res.prompt_tokens = int(usage.get("prompt_tokens", res.prompt_tokens or 0))
        else:
            res.output_tokens = sum(res.chunk_tokens)

    def _chunk_tokens(self, choice: dict[str, Any]) -> int:
        """Tokens one choice of a chunk carries (0 for a chat role-only header)."""
        if isinstance(choice.get("token_ids"), list):
            return len(choice["token_ids"])
        if self.endpoint == "chat":
            delta = choice.get("delta") or {}
            return 0 if "role" in delta and not delta.get("content") else 1
        return 1

    async def get(self, path: str, timeout: float = 10.0) -> httpx.Response:
        return await self.http.get(path, timeout=timeout)
