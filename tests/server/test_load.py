"""Bounded load: 200 concurrent streaming requests, a third of them disconnecting mid-stream."""

from __future__ import annotations

import asyncio
import json

from tests.server.conftest import ServerProcess, httpx, metric, wait_for

N = 200


async def one(client: httpx.AsyncClient, i: int, disconnect: bool) -> tuple[str, int]:
    """Returns (outcome, n): 'done' (saw [DONE]; n = completion tokens), 'left' (hung up after n chunks),
    or 'error: ...'."""
    body = {
        "model": "tiny",
        "prompt": f"request {i}: ",
        "max_tokens": 400 if disconnect else 16,
        "temperature": 0.0 if i % 2 else 0.8,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    chunks = completion_tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return f"error: {r.status_code} {(await r.aread())[:200]!r}", 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return "done", completion_tokens
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            if chunk.get("usage"):
                completion_tokens = chunk["usage"]["completion_tokens"]
            chunks += 1
            if disconnect and chunks == 3:
                return "left", chunks  # leaving the block closes the connection mid-stream
    return "error: stream ended without [DONE]", chunks


async def run_load(url: str, headers: dict[str, str]) -> list[tuple[str, int]]:
    limits = httpx.Limits(max_connections=N + 10, max_keepalive_connections=N + 10)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(one(client, i, i % 3 == 0) for i in range(N)))


def test_load_with_disconnects(server: ServerProcess, auth: dict[str, str]) -> None:
    before = httpx.get(server.url + "/metrics").text
    aborted_before = metric(before, 'qserve_requests_finished_total{reason="abort"}')
    results = asyncio.run(run_load(server.url, auth))
    leavers = [r for i, r in enumerate(results) if i % 3 == 0]
    stayers = [r for i, r in enumerate(results) if i % 3]
    assert all(r == ("left", 3) for r in leavers), leavers[:5]
    assert all(r == ("done", 16) for r in stayers), [r for r in stayers if r != ("done", 16)][:5]

    def idle() -> bool:
        text = httpx.get(server.url + "/metrics").text
        return (
            metric(text, "qserve_requests_running") == 0
            and metric(text, "qserve_requests_waiting") == 0
            and metric(text, "qserve_kv_cache_usage_ratio") == 0
        )

    assert wait_for(idle, timeout=20), httpx.get(server.url + "/metrics").text
    text = httpx.get(server.url + "/metrics").text
    # the hung-up requests were aborted (their 400-token budgets were nowhere near spent)
    assert metric(text, 'qserve_requests_finished_total{reason="abort"}') - aborted_before == len(leavers)
    r = httpx.post(
        server.url + "/v1/completions",
        headers=auth,
        json={"model": "tiny", "prompt": "after the storm", "max_tokens": 4},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_non_streaming_client_that_leaves_is_aborted(server: ServerProcess, auth: dict[str, str]) -> None:
    before = metric(httpx.get(server.url + "/metrics").text, 'qserve_requests_finished_total{reason="abort"}')
    body = {"model": "tiny", "prompt": "long", "max_tokens": 480, "n": 8, "ignore_eos": True}
    try:
        httpx.post(server.url + "/v1/completions", headers=auth, json=body, timeout=0.5)
        raise AssertionError("expected the client to time out")
    except httpx.TimeoutException:
        pass

    def freed() -> bool:
        text = httpx.get(server.url + "/metrics").text
        return (
            metric(text, "qserve_requests_running") == 0 and metric(text, "qserve_kv_cache_usage_ratio") == 0
        )

    assert wait_for(freed, timeout=20)
    after = metric(httpx.get(server.url + "/metrics").text, 'qserve_requests_finished_total{reason="abort"}')
    assert after - before == 8
