"""The generator against a real qserve server (tiny Llama, max_model_len 512): small bounded runs of each
workload, the error path, and the `qserve bench` command end to end."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from qserve.bench import BenchConfig, BenchReport, run_bench
from qserve.bench.workloads import arrival_times
from tests.bench.conftest import MAX_MODEL_LEN
from tests.server.conftest import ServerProcess

JSON_KEYS = {
    "config",
    "duration_s",
    "requests",
    "errors",
    "throughput",
    "latency",
    "utilization",
    "per_request",
}


def bench(server: ServerProcess, **kw: Any) -> BenchReport:
    base: dict[str, Any] = dict(
        url=server.url, requests=6, concurrency=4, prompt_len="8:32", output_len="4:8", rate=50.0,
        metrics_interval=0.1,
    )  # fmt: skip
    return run_bench(BenchConfig(**{**base, **kw}))


def assert_all_exact(report: BenchReport, n: int) -> dict[str, Any]:
    """All n requests completed with exactly their requested output tokens; utilization was sampled."""
    data = report.to_json()
    assert set(data) == JSON_KEYS
    assert data["requests"] == {"total": n, "completed": n, "failed": 0}, data["errors"]
    assert data["errors"] == {}
    assert [r.index for r in report.results] == list(range(n))
    for r in report.results:
        assert r.output_tokens == r.output_len and sum(r.chunk_tokens) == r.output_len
        assert r.send_time < r.chunk_times[0] <= r.chunk_times[-1] <= r.end_time
    assert data["throughput"]["output_tokens_per_second"] > 0 and data["latency"]["ttft_s"]["p99"] > 0
    assert data["config"]["model"] == "tiny" and data["config"]["max_model_len"] == MAX_MODEL_LEN
    util = data["utilization"]
    assert util is not None and len(util["samples"]) >= 2
    assert all(0 <= s["kv_cache_usage_ratio"] <= 1 for s in util["samples"])
    return data


def test_steady_and_bursty(bench_server: ServerProcess) -> None:
    report = bench(bench_server, workload="steady")
    data = assert_all_exact(report, 6)
    assert all(1 <= p <= 32 for p in (r.prompt_tokens for r in report.results) if p is not None)
    assert data["per_request"][0]["prompt_tokens"] == report.results[0].prompt_tokens
    cfg = BenchConfig(bench_server.url, workload="bursty", rate=40.0, burst_on=0.15, burst_off=0.3)
    report = bench(bench_server, workload="bursty", rate=40.0, burst_on=0.15, burst_off=0.3)
    assert_all_exact(report, 6)
    planned = list(itertools.islice(arrival_times(cfg), 6))
    assert all(r.send_time >= t - 1e-3 for r, t in zip(report.results, planned, strict=True))


def test_closed_keeps_concurrency_in_flight(bench_server: ServerProcess) -> None:
    # long enough (about 1 s) that the server's metric snapshots (every 0.2 s while busy) see the batch
    report = bench(bench_server, workload="closed", concurrency=3, requests=6, output_len="200:400")
    data = assert_all_exact(report, 6)
    events = sorted([(r.send_time, 1) for r in report.results] + [(r.end_time, -1) for r in report.results])
    in_flight = list(itertools.accumulate(d for _, d in events))
    assert max(in_flight) == 3
    util = data["utilization"]
    assert util["batch_size"]["max"] >= 1 and util["requests_running"]["max"] >= 1, util["samples"]


def test_agent_sessions(bench_server: ServerProcess) -> None:
    report = bench(
        bench_server, workload="agent", concurrency=2, rate=float("inf"), turns=3, think_time=0.05,
        prompt_len="20:30", user_len="8:16",
    )  # fmt: skip
    assert_all_exact(report, 6)
    sessions: dict[str, list[Any]] = {}
    for r in report.results:
        assert r.session is not None
        sessions.setdefault(r.session, []).append(r)
    assert len(sessions) == 2 and all([r.turn for r in s] == [0, 1, 2] for s in sessions.values())
    for turns in sessions.values():
        for prev, cur in itertools.pairwise(turns):
            assert prev.prompt_tokens + prev.output_len + 8 <= cur.prompt_tokens  # prefix + reply + user
            assert cur.send_time >= prev.end_time + 0.05  # the think time between turns


def test_agent_sessions_stop_at_the_context_limit(bench_server: ServerProcess) -> None:
    # turns grow by 8 output + 100 user tokens from 240: turn 3 would need 564 + 8 > 512 tokens
    report = bench(
        bench_server, workload="agent", concurrency=2, rate=float("inf"), turns=5, think_time=0.0,
        prompt_len="240", output_len="8", user_len="100",
    )  # fmt: skip
    assert_all_exact(report, 6)
    assert sorted(r.turn for r in report.results) == [0, 0, 1, 1, 2, 2]


def test_chat_endpoint(bench_server: ServerProcess) -> None:
    assert_all_exact(bench(bench_server, workload="closed", requests=3, endpoint="chat", prompt_len="8"), 3)


def test_errors_are_counted_and_the_run_goes_on(bench_server: ServerProcess, tmp_path: Path) -> None:
    data_file = tmp_path / "mixed.jsonl"
    rows = [{"prompt": [7] * 600, "output_len": 4}, {"prompt": [7] * 10, "output_len": 5}]  # 600 > 512
    data_file.write_text("\n".join(json.dumps(r) for r in rows))
    report = bench(bench_server, workload="closed", requests=6, concurrency=2, dataset=data_file)
    data = report.to_json()
    assert data["requests"] == {"total": 6, "completed": 3, "failed": 3}
    assert data["errors"] == {"http_400": 3}
    assert all(r.ok == (r.prompt_tokens == 10) for r in report.results)
    assert all(r.output_tokens == 5 for r in report.results if r.ok)


def qserve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qserve.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli(bench_server: ServerProcess, tmp_path: Path) -> None:
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    r = qserve(
        "bench", bench_server.url, "--workload", "closed", "--requests", "4", "--concurrency", "2",
        "--prompt-len", "8", "--output-len", "4", "--json", str(out), "--plot", str(png), "--no-progress",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "4/4 requests completed" in r.stdout and "TTFT" in r.stdout
    data = json.loads(out.read_text())
    assert set(data) == JSON_KEYS and data["requests"]["completed"] == 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for args in (
        ("bench", "http://127.0.0.1:1", "--requests", "1"),  # nothing listens on port 1
        ("bench", "127.0.0.1:8000"),
        ("bench", bench_server.url, "--workload", "spiky"),
        ("bench", bench_server.url, "--output-len", "0"),
    ):
        r = qserve(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
