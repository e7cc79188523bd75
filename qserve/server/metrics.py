"""Prometheus exposition of DESIGN §4's metrics (prefix ``qserve_``), one private registry per app.

Engine-side values come from the engine thread's latest ``engine.metrics()`` snapshot (taken on that
thread, at most SNAPSHOT_INTERVAL old while busy, fresh whenever it goes idle), so scraping never touches
live engine state. The latency histograms are observed here as the client sees them, from the HTTP
request's arrival: time to first token, time per output token after it and end-to-end latency per
finished request, and the gap between consecutive tokens of a stream (inter-token latency). Queue time
(the engine's receipt to first scheduling) comes from the engine side, once per request.
``http_requests_total{code,endpoint}`` counts every HTTP answer; paths that match no route count as
endpoint "other" (a scanner must not grow the label set).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from qserve.engine.busy import busy_ratio

P = "qserve_"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

_GAUGES = {
    "requests_running": "Sequences in the running batch.",
    "requests_waiting": "Sequences waiting for admission (including preempted ones).",
    "kv_cache_usage_ratio": "Share of KV cache blocks in use (0..1).",
    "kv_cache_capacity_tokens": "Tokens the KV cache pool holds.",
    "batch_size": "Sequences in the last step's batch.",
    "device_busy_ratio": "Device time over wall time in the last 10 s (decays to 0 when idle).",
    "admission_headroom_sequences": "How many more average-sized requests fit now.",
    "prefix_cache_hit_rate": "Share of looked-up prompt tokens found in the prefix cache.",
}
_COUNTERS = {
    "prompt_tokens": "Prompt tokens admitted.",
    "generation_tokens": "Tokens generated.",
    "preemptions": "Sequences preempted (recompute).",
}


class EngineCollector(Collector):
    """Turns a metrics snapshot dict (LLMEngine.metrics names) into Prometheus families at scrape time."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        m = self._snapshot()
        # the snapshot may be old (an idle engine sends none): the busy ratio is computed for now
        m = {**m, "device_busy_ratio": busy_ratio(m["device_busy"])} if "device_busy" in m else m
        for name, doc in _GAUGES.items():
            if name in m:
                yield GaugeMetricFamily(P + name, doc, value=float(m[name]))
        for name, doc in _COUNTERS.items():
            yield CounterMetricFamily(P + name, doc, value=float(m[f"{name}_total"]))
        finished = CounterMetricFamily(
            P + "requests_finished", "Requests finished, by reason (stop, length, abort).", labels=["reason"]
        )
        for reason in sorted({"stop", "length", "abort", *m["requests_finished_total"]}):
            finished.add_metric([reason], float(m["requests_finished_total"].get(reason, 0)))
        yield finished
        steps = GaugeMetricFamily(
            P + "step_seconds",
            "Mean seconds per engine step, by phase, over a sliding window.",
            labels=["phase"],
        )
        for phase, seconds in m["step_seconds"].items():
            steps.add_metric([phase], float(seconds))
        yield steps
        gaps = m["step_gap_seconds"]
        bounds = [*(str(b) for b in gaps["buckets"]), "+Inf"]
        yield HistogramMetricFamily(
            P + "step_gap_seconds",
            "Host time between consecutive device steps while work was pending.",
            buckets=list(zip(bounds, map(float, gaps["cumulative"]), strict=True)),
            sum_value=float(gaps["sum"]),
        )


class ServerMetrics:
    """A private CollectorRegistry (so several apps can live in one process) with the engine collector
    and the request-latency histograms."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(snapshot))
        self.ttft = Histogram(
            P + "time_to_first_token_seconds",
            "Seconds from request arrival to its first output token.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            P + "time_per_output_token_seconds",
            "Mean seconds per output token after the first, per request.",
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )

        self.itl = Histogram(
            P + "inter_token_latency_seconds",
            "Seconds between consecutive output tokens of a request (one sample per token after the first).",
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            P + "e2e_request_latency_seconds",
            "Seconds from request arrival to its last output token, per finished request.",
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            P + "request_queue_time_seconds",
            "Seconds a request waited in the engine's queue before it was first scheduled.",
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.http_requests = Counter(
            P + "http_requests",
            "HTTP requests answered, by status code and endpoint (route path; 'other' for unknown paths).",
            labelnames=["code", "endpoint"],
            registry=self.registry,
        )

    def observe_queue_times(self, seconds: list[float]) -> None:
        for s in seconds:
            self.queue_time.observe(s)

    def observe_tokens(self, gap: float, num_tokens: int) -> None:
        """``num_tokens`` new tokens of one request arrived ``gap`` seconds after its previous ones."""
        for _ in range(num_tokens):
            self.itl.observe(gap / num_tokens)

    def observe(self, arrival: float, first_token: float | None, end: float, num_tokens: int) -> None:
        """Record one finished request (monotonic times)."""
        self.e2e.observe(end - arrival)
        if first_token is None:
            return
        self.ttft.observe(first_token - arrival)
        if num_tokens > 1:
            self.tpot.observe((end - first_token) / (num_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
