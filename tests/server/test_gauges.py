"""Gauges track the truth while busy: requests_running against the streams a client sees in flight."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.conftest import ServerProcess, httpx, metric

N, LAG = 8, 0.5  # streams; how stale a gauge may be


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # the demo model, one engine thread: 600-token streams last seconds, long enough to sample the gauge
    # mid-generation (the tiny test model finishes them in a fraction of a second on idle cores)
    srv = ServerProcess(Path("demo"), tmp_path_factory.mktemp("gauges") / "serve.log", "--threads", "1")
    yield srv
    srv.stop()


def test_requests_running_tracks_streams_in_flight(demo_server: ServerProcess) -> None:
    server, auth = demo_server, {}
    first: dict[int, float] = {}
    end: dict[int, float] = {}

    def stream(i: int) -> None:
        body = {"model": "demo", "prompt": f"stream {i}", "max_tokens": 600, "temperature": 0.0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=auth, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    first.setdefault(i, time.monotonic())
        end[i] = time.monotonic()

    scrapes: list[tuple[float, float]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            text = httpx.get(server.url + "/metrics", timeout=10).text
            scrapes.append((time.monotonic(), metric(text, "qserve_requests_running")))
            time.sleep(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    time.sleep(2 * LAG)
    done.set()
    poller.join(10)
    assert len(first) == len(end) == N
    lo, hi = max(first.values()) + LAG, min(end.values()) - LAG  # every stream mid-generation
    inside = [running for t, running in scrapes if lo <= t <= hi]
    assert hi - lo > 0.5 and len(inside) >= 5, (hi - lo, len(scrapes))
    assert inside == [N] * len(inside)
    after = [running for t, running in scrapes if t >= max(end.values()) + LAG]
    assert after and set(after) == {0}
