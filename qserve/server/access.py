"""An ASGI middleware around the whole app: HTTP request counters, the access log, and the count of
requests in flight that a drain waits for.

Handlers that generate tokens leave ``{"prompt_tokens": int, "choices": [Choice, ...]}`` under
``scope["qserve"]``; the access-log line reads the token counts from there once the response has ended
(for a stream, after its last chunk).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qserve.server.metrics import ServerMetrics

access_logger = logging.getLogger("qserve.access")


class Tracker:
    """Shared state of the middleware: requests in flight that were admitted before the drain began.

    A drain waits for ``inflight`` to reach 0; requests that arrive while draining are answered at once
    (503, or /health and /metrics) and are not counted, so a client polling /health cannot hold it up."""

    def __init__(self, metrics: ServerMetrics, draining: Callable[[], bool], access_log: bool):
        self.metrics = metrics
        self.draining = draining
        self.access_log = access_log
        self.inflight = 0
        self.paths: set[str] = set()  # route paths: the endpoint label (others count as "other")


class RequestTrackerMiddleware:
    def __init__(self, app: ASGIApp, tracker: Tracker):
        self.app = app
        self.tracker = tracker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t = self.tracker
        start = time.monotonic()
        counted = not t.draining()
        t.inflight += counted  # the asyncio loop only: no lock
        status = 500  # an exception before the response started ends as a 500
        info: dict[str, Any] = {}
        scope["qserve"] = info

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            t.inflight -= counted
            path = scope.get("path", "")
            endpoint = path if path in t.paths else "other"
            t.metrics.http_requests.labels(code=str(status), endpoint=endpoint).inc()
            if t.access_log:
                log_access(scope, status, info, time.monotonic() - start)


def log_access(scope: Scope, status: int, info: dict[str, Any], latency: float) -> None:
    """One line per request: client, method, path, status, tokens (generation endpoints), latency."""
    client = scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else "-"
    fields: dict[str, Any] = {
        "client": peer,
        "method": scope.get("method", ""),
        "path": scope.get("path", ""),
        "status": status,
    }
    tokens = ""
    if "prompt_tokens" in info:
        fields["prompt_tokens"] = info["prompt_tokens"]
        fields["completion_tokens"] = sum(c.num_output_tokens for c in info.get("choices", []))
        tokens = f" prompt_tokens={fields['prompt_tokens']} completion_tokens={fields['completion_tokens']}"
    fields["latency_s"] = round(latency, 4)
    access_logger.info(
        '%s "%s %s" %d%s latency=%.3fs',
        peer,
        fields["method"],
        fields["path"],
        status,
        tokens,
        latency,
        extra={"fields": fields},
    )
