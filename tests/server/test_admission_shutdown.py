"""A second server (no chat template, one sequence at a time, a queue of one): the plain chat fallback,
429 when the queue is full, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import ServerProcess, httpx

LONG = {"prompt": "slow", "max_tokens": 480, "temperature": 0, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def small(plain_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "small-server.log"
    srv = ServerProcess(
        plain_model, log, "--max-num-seqs", "1", "--max-queue", "1", "--shutdown-timeout", "60"
    )
    yield srv
    srv.stop()


def test_chat_fallback_without_template(small: ServerProcess) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = httpx.post(
        small.url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 6}, timeout=60
    )
    assert r.status_code == 200, r.text
    transcript = "system: be brief\nuser: hi\nassistant:"
    assert r.json()["usage"]["prompt_tokens"] == len(transcript.encode())
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


async def _long_request(client: httpx.AsyncClient) -> tuple[int, str | None, dict[str, object] | None]:
    """(status, Retry-After, error body) for one long streaming completion, read to the end."""
    async with client.stream("POST", "/v1/completions", json=LONG) as r:
        body = await r.aread()
        if r.status_code != 200:
            return r.status_code, r.headers.get("retry-after"), json.loads(body)
        assert body.endswith(b"data: [DONE]\n\n")
        return 200, None, None


def test_queue_full_429(small: ServerProcess) -> None:
    async def burst() -> list[tuple[int, str | None, dict[str, object] | None]]:
        async with httpx.AsyncClient(base_url=small.url, timeout=120) as client:
            return await asyncio.gather(*(_long_request(client) for _ in range(6)))

    results = asyncio.run(burst())
    statuses = sorted(s for s, _, _ in results)
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    for status, retry_after, err in results:
        if status == 429:
            assert retry_after is not None and int(retry_after) >= 1
            assert err is not None and err["error"]["code"] == "queue_full"  # type: ignore[index]
    r = httpx.post(small.url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_sigterm_finishes_in_flight_then_exits_0(small: ServerProcess) -> None:
    """Last in this module: it shuts the server down."""
    body = {**LONG, "max_tokens": 300, "stream_options": {"include_usage": True}}
    lines: list[str] = []
    with (
        httpx.Client(base_url=small.url, timeout=120) as client,
        client.stream("POST", "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        it = r.iter_lines()
        for line in it:
            lines.append(line)
            if len([x for x in lines if x.startswith("data: ")]) == 3:
                break
        small.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        # no new work is admitted: the listener is closed (or, in the first instant, 503)
        try:
            late = httpx.post(
                small.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10
            )
            assert late.status_code == 503, late.text
        except httpx.TransportError:
            pass
        lines.extend(it)  # the request in flight runs to its end
    assert lines[-1] == "data: [DONE]" or lines[-2:] == ["data: [DONE]", ""]
    usage = [json.loads(x[6:])["usage"] for x in lines if x.startswith("data: {") and '"usage"' in x]
    assert usage and usage[-1]["completion_tokens"] == 300
    assert small.proc.wait(60) == 0, small.output()
    assert "Finished server process" in small.output()


def test_sigterm_past_the_grace_period_aborts_cleanly(plain_model: Path, tmp_path: Path) -> None:
    """--shutdown-timeout 0: what runs at SIGTERM is aborted at once, yet every stream ends properly."""
    srv = ServerProcess(
        plain_model, tmp_path / "server.log", "--max-num-seqs", "1", "--shutdown-timeout", "0"
    )
    try:

        async def scenario() -> list[list[str]]:
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
                started = asyncio.Event()

                async def read(lines: list[str], tell: bool) -> None:
                    async with client.stream("POST", "/v1/completions", json=LONG) as r:
                        assert r.status_code == 200
                        async for line in r.aiter_lines():
                            lines.append(line)
                            if tell and len(lines) >= 3:
                                started.set()

                running: list[str] = []
                queued: list[str] = []
                tasks = [asyncio.create_task(read(running, True))]
                await started.wait()
                tasks.append(asyncio.create_task(read(queued, False)))  # waits behind the first
                await asyncio.sleep(0.2)
                srv.proc.send_signal(signal.SIGTERM)
                await asyncio.gather(*tasks)
                return [running, queued]

        for lines in asyncio.run(scenario()):
            data = [x[6:] for x in lines if x.startswith("data: ")]
            assert data[-1] == "[DONE]", lines[-3:]
            reasons = [ch["finish_reason"] for chunk in map(json.loads, data[:-1]) for ch in chunk["choices"]]
            assert reasons[-1] == "abort"
        assert srv.proc.wait(60) == 0, srv.output()
    finally:
        srv.stop()
