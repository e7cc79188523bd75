"""Statistics of a run, as pure functions of the client's timings and the /metrics samples (no I/O).

Definitions (all times in seconds, from `RequestResult`):

- TTFT = first token chunk's arrival - send time; E2E = end - send time.
- ITL (inter-token latency): for each chunk after the first, (its time - the previous chunk's time) / its
  tokens, counted once per token; pooled over all completed requests.
- Percentiles: linear interpolation between order statistics (numpy's default): for sorted x_0..x_{n-1},
  position h = (n - 1) q / 100 and p_q = x_floor(h) + (h - floor(h)) (x_floor(h)+1 - x_floor(h)).
- The window is the first send to the last end; throughput counts completed requests only.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from qserve.bench.client import RequestResult

QUANTILES = (50, 90, 99)
UTILIZATION_GAUGES = (
    "device_busy_ratio",
    "batch_size",
    "kv_cache_usage_ratio",
    "requests_running",
    "requests_waiting",
    "admission_headroom_sequences",
)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) by linear interpolation; ValueError on no values."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    x = sorted(values)
    h = (len(x) - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(x) - 1)
    return x[lo] + (h - lo) * (x[hi] - x[lo])


def summarize(values: Sequence[float]) -> dict[str, float | None]:
    """{"mean", "p50", "p90", "p99"}; all None when there are no values."""
    out: dict[str, float | None] = {"mean": sum(values) / len(values) if values else None}
    for q in QUANTILES:
        out[f"p{q}"] = percentile(values, q) if values else None
    return out


def ttft(r: RequestResult) -> float | None:
    return None if r.first_token_time is None else r.first_token_time - r.send_time


def e2e(r: RequestResult) -> float:
    return r.end_time - r.send_time


def itl(r: RequestResult) -> list[float]:
    """Per-token inter-token latencies of one request (see the module docstring)."""
    out: list[float] = []
    for i in range(1, len(r.chunk_times)):
        n = max(r.chunk_tokens[i], 1)
        out += [(r.chunk_times[i] - r.chunk_times[i - 1]) / n] * n
    return out


def window(results: Sequence[RequestResult]) -> float:
    """Seconds from the first send to the last end (0 with no requests)."""
    if not results:
        return 0.0
    return max(r.end_time for r in results) - min(r.send_time for r in results)


def throughput(results: Sequence[RequestResult], duration: float) -> dict[str, float]:
    """Completed requests, their output tokens, and their prompt + output tokens, per second."""
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    all_tokens = out_tokens + sum(r.prompt_tokens or 0 for r in done)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    return {
        "requests_per_second": per_s(len(done)),
        "output_tokens_per_second": per_s(out_tokens),
        "total_tokens_per_second": per_s(all_tokens),
    }


def latency(results: Sequence[RequestResult]) -> dict[str, dict[str, float | None]]:
    """TTFT, ITL and E2E summaries over the completed requests."""
    done = [r for r in results if r.ok]
    ttfts = [t for t in (ttft(r) for r in done) if t is not None]
    itls = [x for r in done for x in itl(r)]
    return {"ttft_s": summarize(ttfts), "itl_s": summarize(itls), "e2e_s": summarize([e2e(r) for r in done])}


def errors(results: Iterable[RequestResult]) -> dict[str, int]:
    """Failed requests by error type, most frequent first."""
    return dict(Counter(r.error for r in results if r.error is not None).most_common())


def utilization(samples: Sequence[dict[str, float]]) -> dict[str, Any] | None:
    """Mean and max of each gauge over the /metrics samples, preemptions during the run (the counter's
    last - first value), and the samples themselves; None without samples (not a qserve server)."""
    if not samples:
        return None
    out: dict[str, Any] = {}
    for name in UTILIZATION_GAUGES:
        xs = [s[name] for s in samples if name in s]
        out[name] = {"mean": sum(xs) / len(xs), "max": max(xs)} if xs else {"mean": None, "max": None}
    pre = [s["preemptions_total"] for s in samples if "preemptions_total" in s]
    out["preemptions"] = int(pre[-1] - pre[0]) if pre else 0
    out["samples"] = list(samples)
    return out


def timeline(results: Sequence[RequestResult], width: float) -> list[tuple[float, float, float]]:
    """(window end, output tokens/s, mean E2E) per ``width``-second window: the tokens streamed in the window
    (by chunk arrival) over its width, and the mean E2E of the requests that ended in it. Completed requests
    only; windows where none ended are left out. For latency-against-throughput plots."""
    done = [r for r in results if r.ok]
    if not done or width <= 0:
        return []
    start = min(r.send_time for r in results)
    tokens: dict[int, int] = {}
    ends: dict[int, list[float]] = {}
    for r in done:
        for t, n in zip(r.chunk_times, r.chunk_tokens, strict=True):
            k = int((t - start) // width)
            tokens[k] = tokens.get(k, 0) + n
        ends.setdefault(int((r.end_time - start) // width), []).append(e2e(r))
    return [
        (start + (k + 1) * width, tokens.get(k, 0) / width, sum(xs) / len(xs))
        for k, xs in sorted(ends.items())
    ]
