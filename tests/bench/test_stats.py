"""qserve.bench.stats against hand-computed values on fixed timings."""

from __future__ import annotations

import random

import pytest

from qserve.bench import stats
from qserve.bench.client import RequestResult


def req(
    send: float,
    end: float,
    chunks: tuple[float, ...] | list[float] = (),
    tokens: list[int] | None = None,
    out: int = 0,
    prompt: int | None = 0,
    error: str | None = None,
) -> RequestResult:
    return RequestResult(
        index=0,
        send_time=send,
        end_time=end,
        chunk_times=list(chunks),
        chunk_tokens=tokens if tokens is not None else [1] * len(chunks),
        output_tokens=out,
        prompt_tokens=prompt,
        error=error,
    )


def test_percentiles_hand_computed() -> None:
    xs = [10.0 * i for i in range(1, 11)]  # 10, 20, ..., 100
    random.Random(0).shuffle(xs)
    # h = (n - 1) q / 100 = 9q/100: p50 -> h 4.5 -> 50 + .5*10; p90 -> h 8.1 -> 90 + .1*10; p99 -> h 8.91
    assert stats.percentile(xs, 50) == pytest.approx(55.0)
    assert stats.percentile(xs, 90) == pytest.approx(91.0)
    assert stats.percentile(xs, 99) == pytest.approx(99.1)
    assert stats.percentile(xs, 0) == 10.0 and stats.percentile(xs, 100) == 100.0
    assert stats.summarize(xs) == pytest.approx({"mean": 55.0, "p50": 55.0, "p90": 91.0, "p99": 99.1})
    assert stats.summarize([1.0, 3.0]) == pytest.approx({"mean": 2.0, "p50": 2.0, "p90": 2.8, "p99": 2.98})
    assert stats.summarize([7.0]) == {"mean": 7.0, "p50": 7.0, "p90": 7.0, "p99": 7.0}
    assert stats.summarize([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    with pytest.raises(ValueError):
        stats.percentile([], 50)
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_request_timings() -> None:
    # sent at 1.0; chunks at 1.5, 1.7, 2.0 (2 tokens), 2.1; stream closed at 2.2
    r = req(1.0, 2.2, [1.5, 1.7, 2.0, 2.1], [1, 1, 2, 1], out=5)
    assert stats.ttft(r) == pytest.approx(0.5)
    assert stats.e2e(r) == pytest.approx(1.2)
    assert stats.itl(r) == pytest.approx([0.2, 0.15, 0.15, 0.1])  # the 2-token chunk: 0.3 / 2, twice
    assert stats.ttft(req(0.0, 1.0)) is None and stats.itl(req(0.0, 1.0)) == []


def test_throughput_latency_errors_over_a_known_window() -> None:
    results = [
        req(0.0, 2.0, [0.5, 1.0, 1.5], out=10, prompt=5),
        req(1.0, 4.0, [2.0, 3.0], out=20, prompt=5),
        req(2.0, 3.0, error="http_400"),
        req(2.5, 3.5, error="timeout"),
        req(3.0, 3.2, error="http_400"),
    ]
    assert stats.window(results) == pytest.approx(4.0)  # first send 0.0 to last end 4.0
    tp = stats.throughput(results, 4.0)
    assert tp == pytest.approx(
        {"requests_per_second": 0.5, "output_tokens_per_second": 7.5, "total_tokens_per_second": 10.0}
    )
    lat = stats.latency(results)  # completed requests only
    assert lat["ttft_s"] == pytest.approx({"mean": 0.75, "p50": 0.75, "p90": 0.95, "p99": 0.995})
    assert lat["e2e_s"]["mean"] == pytest.approx(2.5)
    assert lat["itl_s"]["mean"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert stats.errors(results) == {"http_400": 2, "timeout": 1}
    assert list(stats.errors(results)) == ["http_400", "timeout"]  # most frequent first
    assert stats.throughput([], 0.0)["requests_per_second"] == 0.0


def test_utilization_from_samples() -> None:
    samples = [
        {"t": 0.0, "device_busy_ratio": 0.2, "batch_size": 0.0, "kv_cache_usage_ratio": 0.0, "preemptions_total": 3},
        {"t": 0.5, "device_busy_ratio": 0.9, "batch_size": 8.0, "kv_cache_usage_ratio": 0.5, "preemptions_total": 5},
        {"t": 1.0, "device_busy_ratio": 1.0, "batch_size": 4.0, "kv_cache_usage_ratio": 0.25, "preemptions_total": 7},
    ]  # fmt: skip
    u = stats.utilization(samples)
    assert u is not None
    assert u["device_busy_ratio"] == pytest.approx({"mean": 0.7, "max": 1.0})
    assert u["batch_size"] == pytest.approx({"mean": 4.0, "max": 8.0})
    assert u["kv_cache_usage_ratio"] == pytest.approx({"mean": 0.25, "max": 0.5})
    assert u["requests_running"] == {"mean": None, "max": None}  # not exported by this "server"
    assert u["preemptions"] == 4  # during the run: last - first
    assert u["samples"] == samples
    assert stats.utilization([]) is None


def test_timeline_windows() -> None:
    results = [
        req(0.0, 0.5, [0.1, 0.2], [4, 6], out=10),
        req(0.0, 0.9, [0.1, 0.8], [10, 20], out=30),
        req(0.5, 2.5, [1.0, 2.4], [15, 25], out=40),
        req(0.5, 1.5, [0.6], error="timeout"),
    ]
    points = stats.timeline(results, 1.0)
    # window [0, 1): 40 tokens streamed, ends of e2e 0.5 and 0.9; [1, 2): 15 tokens, no ends (left out);
    # [2, 3): 25 tokens, one end of e2e 2.0
    expected = [(1.0, 40.0, 0.7), (3.0, 25.0, 2.0)]
    assert len(points) == 2
    assert all(p == pytest.approx(e) for p, e in zip(points, expected, strict=True))
    assert stats.timeline([], 1.0) == []
