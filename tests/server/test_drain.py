"""Stop signals and engine death, as a supervisor sees them: SIGTERM to the whole process group drains
(the listener stays open and answers 503 meanwhile) and exits 0; a killed engine process fails what runs
with a 500 and makes the server exit 1 within seconds."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

from tests.server.conftest import ServerProcess, httpx, metric, wait_for

STREAM = {"prompt": "slow", "max_tokens": 300, "temperature": 0, "ignore_eos": True, "stream": True}


def read_stream(url: str, body: dict[str, object], lines: list[str], started: threading.Event) -> None:
    with (
        httpx.Client(base_url=url, timeout=120) as client,
        client.stream("POST", "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            lines.append(line)
            if len([x for x in lines if x.startswith("data: ")]) >= 3:
                started.set()


def test_sigterm_to_the_process_group_drains_and_exits_0(plain_model: Path, tmp_path: Path) -> None:
    srv = ServerProcess(
        plain_model,
        tmp_path / "server.log",
        "--max-num-seqs",
        "1",
        "--shutdown-timeout",
        "300",
        new_session=True,
    )
    try:
        engine = srv.engine_pid()
        lines: list[str] = []
        started = threading.Event()
        body = {**STREAM, "stream_options": {"include_usage": True}}
        reader = threading.Thread(target=read_stream, args=(srv.url, body, lines, started))
        reader.start()
        assert started.wait(60)
        # queued behind the stream (one sequence at a time): seconds of work in flight at the signal. The
        # grace period is long so a loaded machine (CI) still drains them all rather than hitting the deadline.
        queued: list[httpx.Response] = []
        answered: list[float] = []  # when each poster got its answer
        long = {"prompt": "queued", "max_tokens": 240, "temperature": 0, "ignore_eos": True}

        def post() -> None:
            queued.append(httpx.post(srv.url + "/v1/completions", json=long, timeout=120))
            answered.append(time.monotonic())

        posters = [threading.Thread(target=post) for _ in range(6)]
        for t in posters:
            t.start()

        # Wait until all 7 requests reached the engine (waiting, running or finished). Counting the finished
        # ones keeps this from racing the stream's end, which a fast decode could reach before the last poster.
        def received() -> float:
            text = httpx.get(srv.url + "/metrics", timeout=5).text
            done = metric(text, 'qserve_requests_finished_total{reason="length"}')
            return metric(text, "qserve_requests_waiting") + metric(text, "qserve_requests_running") + done

        assert wait_for(lambda: received() >= 7)
        signaled = time.monotonic()
        os.killpg(srv.proc.pid, signal.SIGTERM)  # what systemd, `timeout` and `kill -- -PGID` send
        time.sleep(0.3)
        # the listener stays open while draining: /health and new work answer 503 in OpenAI's format
        health = httpx.get(srv.url + "/health", timeout=10)
        assert health.status_code == 503, health.text
        assert health.json()["error"]["type"] == "service_unavailable"
        late = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
        assert late.status_code == 503, late.text
        assert set(late.json()["error"]) == {"message", "type", "param", "code"}
        assert os.path.exists(f"/proc/{engine}")  # the engine ignored the group's SIGTERM
        reader.join(120)
        for t in posters:
            t.join(120)
        assert not reader.is_alive()
        assert [r.status_code for r in queued] == [200] * 6  # queued requests were in flight too
        assert max(answered) > signaled  # the drain waited for work still queued at the signal
        assert [
            (r.json()["usage"]["completion_tokens"], r.json()["choices"][0]["finish_reason"]) for r in queued
        ] == [(240, "length")] * 6
        data = [x[6:] for x in lines if x.startswith("data: ")]
        assert data[-1] == "[DONE]"
        chunks = [json.loads(x) for x in data[:-1]]
        assert all("error" not in c for c in chunks)
        assert chunks[-1]["usage"]["completion_tokens"] == 300  # the request in flight ran to its end
        assert srv.proc.wait(60) == 0, srv.output()
        out = srv.output()
        assert "engine process exited" not in out and "exit code -15" not in out
        assert "drained: no request in flight" in out
    finally:
        srv.stop()


def test_engine_killed_fails_in_flight_with_500_and_exits_1(plain_model: Path, tmp_path: Path) -> None:
    srv = ServerProcess(plain_model, tmp_path / "server.log", new_session=True)
    try:
        engine = srv.engine_pid()
        result: dict[str, httpx.Response] = {}

        def long_request() -> None:
            body = {"prompt": "slow", "max_tokens": 400, "temperature": 0, "ignore_eos": True}
            result["r"] = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)

        t = threading.Thread(target=long_request)
        t.start()
        # the request is running (admitted and generating) before the engine dies
        assert wait_running(srv.url)
        os.kill(engine, signal.SIGKILL)
        t.join(30)
        r = result["r"]
        assert r.status_code == 500, r.text
        err = r.json()["error"]
        assert err["type"] == "server_error" and "engine" in err["message"]
        died = time.monotonic()
        try:  # /health says so until the server exits (it may already have)
            h = httpx.get(srv.url + "/health", timeout=5)
            assert h.status_code == 503, h.text
        except httpx.TransportError:
            pass
        assert srv.proc.wait(30) == 1, srv.output()
        assert time.monotonic() - died < 10
        assert "exit code -9" in srv.output()
    finally:
        srv.stop()


def wait_running(url: str, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics", timeout=5).text
        if any(
            line.startswith("qserve_generation_tokens_total ") and float(line.split()[-1]) > 5
            for line in text.splitlines()
        ):
            return True
        time.sleep(0.05)
    return False
