"""Runs a benchmark: finds the model, drives the workload, samples /metrics, and returns a `BenchReport`.

Open-loop arrivals (steady, bursty) are sent at their scheduled times unless ``concurrency`` requests are
already in flight, in which case they wait for a free slot (so a saturated server is measured at that
concurrency). ``closed`` is the same with every arrival at time 0: exactly ``concurrency`` in flight.
Agent sessions hold one slot each from their first turn to their last.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from qserve.bench.client import BenchClient, RequestResult, TransportError
from qserve.bench.config import BenchConfig
from qserve.bench.metrics_sampler import MetricsSampler
from qserve.bench.report import BenchReport
from qserve.bench.workloads import RequestSpec, agent_sessions, arrival_times, request_specs
from qserve.errors import QServeError


@dataclass(frozen=True)
class ServerInfo:
    """What GET /v1/models says: the model to ask for and, when the server reports it, its context limit."""

    model: str
    max_model_len: int | None


async def discover(client: BenchClient, url: str, model: str | None) -> ServerInfo:
    """Reads /v1/models; an unreachable or non-OpenAI server is a QServeError (one line for the CLI)."""
    try:
        r = await client.get("/v1/models")
    except TransportError as e:
        raise QServeError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if r.status_code == 401:
        raise QServeError(f"{url} answered 401 (unauthorized): pass the server's key with --api-key")
    try:
        cards = r.json()["data"] if r.status_code == 200 else None
        ids = [str(c["id"]) for c in cards or []]
    except (ValueError, KeyError, TypeError):
        cards, ids = None, []
    if not ids:
        raise QServeError(
            f"GET {url}/v1/models answered {r.status_code} without models: not an OpenAI server?"
        )
    name = model or ids[0]
    card = next((c for c in cards or [] if str(c["id"]) == name), None)
    limit = card.get("max_model_len") if card else None
    return ServerInfo(name, int(limit) if isinstance(limit, int) else None)


class Clock:
    """Seconds since the run's start (``reset`` marks the start)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def reset(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


class Runner:
    """One run's state: the request budget, the results, and the progress display."""

    def __init__(self, cfg: BenchConfig, client: BenchClient, sampler: MetricsSampler):
        self.cfg = cfg
        self.client = client
        self.sampler = sampler
        self.clock = client.clock
        self.limit = cfg.max_requests
        self.issued = 0
        self.in_flight = 0
        self.results: list[RequestResult] = []
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    # ------------------------------------------------------------------ bounds
    def stopped(self) -> bool:
        """No more requests: the request budget is spent or the duration is over."""
        over = self.cfg.duration is not None and self.clock() >= self.cfg.duration
        return over or (self.limit is not None and self.issued >= self.limit)

    async def wait_until(self, t: float) -> bool:
        """Sleep until run time ``t``; False (without sleeping) if the run's duration ends first."""
        if self.cfg.duration is not None and t >= self.cfg.duration:
            return False
        delay = t - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        return True

    def claim(self) -> int | None:
        """The next request's index, or None when the run's bounds say stop. Synchronous, so a request is
        counted against ``requests`` the moment it is decided on, not when its task first runs."""
        if self.stopped():
            return None
        self.issued += 1
        return self.issued - 1

    async def send(self, spec: RequestSpec, index: int) -> RequestResult:
        self.in_flight += 1
        res = await self.client.send(spec, index)
        self.in_flight -= 1
        self.results.append(res)
        self.update_progress()
        return res

    # ------------------------------------------------------------------ workloads
    async def run(self, max_len: int | None) -> None:
        slots = asyncio.Semaphore(self.cfg.concurrency)
        tasks: list[asyncio.Task[None]] = []
        agent = self.cfg.workload == "agent"
        items: Iterator[RequestSpec | list[RequestSpec]] = (
            agent_sessions(self.cfg, max_len) if agent else request_specs(self.cfg)
        )
        for t, item in zip(arrival_times(self.cfg), items, strict=False):
            if self.stopped() or not await self.wait_until(t):
                break
            await slots.acquire()
            if isinstance(item, list):
                if self.stopped():
                    slots.release()
                    break
                tasks.append(asyncio.create_task(self.session(item, slots)))
            else:
                index = self.claim()
                if index is None:
                    slots.release()
                    break
                tasks.append(asyncio.create_task(self.single(item, index, slots)))
        await asyncio.gather(*tasks)

    async def single(self, spec: RequestSpec, index: int, slots: asyncio.Semaphore) -> None:
        try:
            await self.send(spec, index)
        finally:
            slots.release()

    async def session(self, turns: list[RequestSpec], slots: asyncio.Semaphore) -> None:
        """An agent session: its turns one after another, ``think_time`` apart; it ends at the first failed
        turn, or when the run's bounds say stop."""
        try:
            for k, spec in enumerate(turns):
                if k > 0 and self.cfg.think_time > 0:
                    await asyncio.sleep(self.cfg.think_time)
                index = self.claim()
                if index is None or not (await self.send(spec, index)).ok:
                    return
        finally:
            slots.release()

    # ------------------------------------------------------------------ progress
    def start_progress(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(self.cfg.workload, total=self.limit, status="")
        self.progress.start()

    def update_progress(self) -> None:
        if self.progress is None or self.task is None:
            return
        done = len(self.results)
        failed = sum(not r.ok for r in self.results)
        tokens = sum(r.output_tokens for r in self.results if r.ok)
        elapsed = max(self.clock(), 1e-9)
        status = f"{failed} err {self.in_flight} live {tokens / elapsed:.0f} tok/s"
        if self.sampler.samples:
            s = self.sampler.samples[-1]
            status += (
                f" busy {s.get('device_busy_ratio', 0):.2f} batch {s.get('batch_size', 0):.0f}"
                f" kv {s.get('kv_cache_usage_ratio', 0):.2f}"
            )
        self.progress.update(self.task, completed=done, status=status)

    def stop_progress(self) -> None:
        if self.progress is not None:
            self.update_progress()
            self.progress.stop()


async def run_bench_async(cfg: BenchConfig, console: Console | None = None) -> BenchReport:
    """Run ``cfg`` and return its report (the coroutine under `run_bench`)."""
    clock = Clock()
    async with BenchClient(
        cfg.url,
        cfg.model or "",
        clock=clock,
        api_key=cfg.api_key,
        endpoint=cfg.endpoint,
        timeout=cfg.timeout,
        max_connections=cfg.concurrency + 8,
        extra_body=cfg.extra_body,
    ) as client:
        info = await discover(client, cfg.url, cfg.model)
        client.model = info.model

        async def fetch_metrics() -> str | None:
            r = await client.get("/metrics", timeout=5.0)
            return r.text if r.status_code == 200 else None

        sampler = MetricsSampler(fetch_metrics, clock, cfg.metrics_interval)
        await sampler.probe()
        runner = Runner(cfg, client, sampler)
        if cfg.progress:
            runner.start_progress(console or Console(stderr=True))
        clock.reset()  # the run starts here: arrival times and results are relative to it
        sampler.start()
        try:
            await runner.run(info.max_model_len)
        finally:
            samples = await sampler.stop()
            runner.stop_progress()
    config = {**cfg.public(), "model": info.model, "max_model_len": info.max_model_len}
    return BenchReport(config, sorted(runner.results, key=lambda r: r.index), samples, sampler.is_qserve)


def run_bench(cfg: BenchConfig, console: Console | None = None) -> BenchReport:
    """Run a benchmark synchronously (from code that is not already inside an event loop)."""
    return asyncio.run(run_bench_async(cfg, console))
