"""Samples a qserve server's /metrics during a run; any other server (vLLM, ...) is detected and skipped.

A sample is ``{"t": seconds since the run's start, NAME: value, ...}`` with the ``qserve_`` prefix dropped
and only the names in TRACKED that the server exports.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable

PREFIX = "qserve_"
TRACKED = (
    "device_busy_ratio",
    "batch_size",
    "kv_cache_usage_ratio",
    "preemptions_total",
    "requests_running",
    "requests_waiting",
    "admission_headroom_sequences",
    "kv_cache_capacity_tokens",
)


RATIOS = ("device_busy_ratio", "kv_cache_usage_ratio")  # averaged over replicas; other names are summed


def parse_prometheus(text: str, names: tuple[str, ...] = TRACKED, prefix: str = PREFIX) -> dict[str, float]:
    """Samples ``prefix + name`` for ``name`` in ``names`` from Prometheus text exposition.

    A name exported only with labels (a `qserve serve --replicas` front: one series per replica) is
    aggregated over its series: ratios averaged, counts summed. Non-finite values are dropped.
    """
    wanted = {prefix + n: n for n in names}
    plain: dict[str, float] = {}
    labelled: dict[str, list[float]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if "{" in line:  # name{labels} value: label values may hold spaces, so split around the braces
            head, _, rest = line.partition("{")
            fields = rest.rpartition("}")[2].split()
        else:
            head, *fields = line.split()
        if head not in wanted or not fields:
            continue
        try:
            value = float(fields[0])
        except ValueError:
            continue
        if not math.isfinite(value):
            continue
        if "{" in line:
            labelled.setdefault(wanted[head], []).append(value)
        else:
            plain[wanted[head]] = value
    for name, values in labelled.items():
        if name not in plain:
            plain[name] = sum(values) / len(values) if name in RATIOS else sum(values)
    return plain


class MetricsSampler:
    """Polls ``fetch()`` (the /metrics text, or None when unavailable) every ``interval`` seconds.

    ``probe()`` decides once whether the server is qserve (its /metrics has the tracked ``qserve_`` gauges);
    if not, ``start()`` does nothing and ``samples`` stays empty.
    """

    def __init__(
        self, fetch: Callable[[], Awaitable[str | None]], clock: Callable[[], float], interval: float = 0.5
    ):
        self.fetch = fetch
        self.clock = clock
        self.interval = interval
        self.samples: list[dict[str, float]] = []
        self.is_qserve = False
        self.first: dict[str, float] = {}  # the probe's values (e.g. kv_cache_capacity_tokens)
        self._task: asyncio.Task[None] | None = None

    async def probe(self) -> bool:
        text = await self._fetch()
        self.first = parse_prometheus(text) if text else {}
        self.is_qserve = "device_busy_ratio" in self.first and "kv_cache_usage_ratio" in self.first
        return self.is_qserve

    async def _fetch(self) -> str | None:
        try:
            return await self.fetch()
        except Exception:  # a failed scrape is a missing sample, never a failed run
            return None

    async def sample(self) -> None:
        t = self.clock()
        text = await self._fetch()
        values = parse_prometheus(text) if text else {}
        if values:
            self.samples.append({"t": t, **values})

    async def _loop(self) -> None:
        while True:
            await self.sample()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self.is_qserve and self._task is None:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> list[dict[str, float]]:
        """Stop polling, take one last sample (so counters cover the whole run), return the samples."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            await self.sample()
        return self.samples
