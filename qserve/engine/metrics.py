"""Engine-side metrics: counters, gauges and a sliding window of step timings (DESIGN §4 names)."""

from __future__ import annotations

import bisect
import itertools
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qserve.engine.busy import WINDOW_SECONDS, BusyWindow, busy_ratio
from qserve.engine.scheduler import SchedulerOutput
from qserve.engine.sequence import Sequence

if TYPE_CHECKING:
    from qserve.engine.llm_engine import LLMEngine

PHASES = ("schedule", "prepare", "forward", "sample", "detokenize")
# DESIGN §4: the metric names LLM.metrics() returns and /metrics exports (with the qserve_ prefix)
METRIC_NAMES: tuple[str, ...] = (
    "requests_running",
    "requests_waiting",
    "kv_cache_usage_ratio",
    "kv_cache_capacity_tokens",
    "prompt_tokens_total",
    "generation_tokens_total",
    "requests_finished_total",
    "preemptions_total",
    "time_to_first_token_seconds",
    "time_per_output_token_seconds",
    "batch_size",
    "device_busy_ratio",
    "step_seconds",
    "step_gap_seconds",
    "admission_headroom_sequences",
)


GAP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass
class StepRecord:
    """One engine step: when its device work ended (monotonic), how long it took, and its phases."""

    forward_end: float
    device_seconds: float  # device time of the forward (CUDA events on GPU, the forward's wall time on CPU)
    phases: dict[str, float]


@dataclass
class EngineMetrics:
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    finished_total: Counter[str] = field(default_factory=Counter)
    ttft: list[float] = field(default_factory=list)  # seconds, per finished request (bounded below)
    tpot: list[float] = field(default_factory=list)
    batch_size: int = 0
    steps: deque[StepRecord] = field(default_factory=deque)  # the last WINDOW_SECONDS of steps
    busy: BusyWindow = field(default_factory=BusyWindow)
    # host gaps between consecutive device steps while work was pending: count per GAP_BUCKETS bucket (+inf last)
    gap_counts: list[int] = field(default_factory=lambda: [0] * (len(GAP_BUCKETS) + 1))
    gap_sum: float = 0.0

    def record_step(self, so: SchedulerOutput, step: StepRecord, gap: float | None) -> None:
        """Record a finished step; ``gap``: host time since the previous step's forward ended, when the
        engine went straight from that step to this one (None after an idle wait)."""
        self.batch_size = len(so.scheduled)
        self.steps.append(step)
        self.busy.add(step.forward_end - step.device_seconds, step.forward_end)
        self._prune(step.forward_end)
        if gap is not None:
            self.gap_sum += gap
            self.gap_counts[bisect.bisect_left(GAP_BUCKETS, gap)] += 1

    def _prune(self, now: float) -> None:
        while self.steps and self.steps[0].forward_end < now - WINDOW_SECONDS:
            self.steps.popleft()

    def finished(self, seq: Sequence) -> None:
        self.finished_total[seq.finish_reason or "abort"] += 1
        if seq.first_token_time is not None:
            self.ttft.append(seq.first_token_time - seq.arrival_time)
            if seq.num_output_tokens > 1:
                self.tpot.append((time.monotonic() - seq.first_token_time) / (seq.num_output_tokens - 1))
        del self.ttft[:-1000], self.tpot[:-1000]

    def device_busy_ratio(self) -> float:
        """Device time over wall time in the last WINDOW_SECONDS (or since start): decays to 0 when idle."""
        return busy_ratio(self.busy.export())

    def step_seconds(self) -> dict[str, float]:
        """Mean seconds per step, by phase, over the window."""
        self._prune(time.monotonic())
        n = max(len(self.steps), 1)
        return {p: sum(s.phases.get(p, 0.0) for s in self.steps) / n for p in PHASES}

    def step_gaps(self) -> dict[str, Any]:
        """The gap histogram: bucket upper bounds, cumulative counts (Prometheus order), sum and count."""
        cumulative = list(itertools.accumulate(self.gap_counts))
        return {
            "buckets": list(GAP_BUCKETS),
            "cumulative": cumulative,
            "sum": self.gap_sum,
            "count": cumulative[-1],
        }

    def snapshot(self, engine: LLMEngine) -> dict[str, Any]:
        sched, kv = engine.scheduler, engine.kv
        running = len(sched.running)
        free_tokens = kv.pool.num_free_blocks * kv.block_size
        # headroom: how many more average-sized requests fit now, by KV blocks and by max_num_seqs
        active = sched.running + list(sched.waiting)
        avg = sum(s.max_total_tokens for s in active) / len(active) if active else engine.max_model_len / 2
        by_kv = int(free_tokens // max(avg, 1))
        headroom = max(0, min(by_kv, sched.max_num_seqs - running) - len(sched.waiting))
        return {
            "requests_running": running,
            "requests_waiting": len(sched.waiting),
            "kv_cache_usage_ratio": kv.usage(),
            "kv_cache_capacity_tokens": kv.capacity_tokens,
            "prompt_tokens_total": self.prompt_tokens_total,
            "generation_tokens_total": self.generation_tokens_total,
            "requests_finished_total": dict(self.finished_total),
            "preemptions_total": sched.num_preemptions,
            "time_to_first_token_seconds": list(self.ttft),
            "time_per_output_token_seconds": list(self.tpot),
            "batch_size": self.batch_size if sched.running else 0,
            "device_busy_ratio": self.device_busy_ratio(),
            "device_busy": self.busy.export(),  # for readers of a later moment: busy.busy_ratio(this, now)
            "step_seconds": self.step_seconds(),
            "step_gap_seconds": self.step_gaps(),
            "admission_headroom_sequences": headroom,
            "prefix_cache_hit_rate": kv.prefix_hit_rate(),
        }
