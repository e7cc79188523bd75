"""Engine-side metrics: counters, gauges and a sliding window of step timings (DESIGN §4 names)."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from qserve.engine.scheduler import SchedulerOutput
from qserve.engine.sequence import Sequence

if TYPE_CHECKING:
    from qserve.engine.llm_engine import LLMEngine

WINDOW_SECONDS = 10.0  # device_busy_ratio and step timings average over this much recent wall time
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
    "admission_headroom_sequences",
)


@dataclass
class EngineMetrics:
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    finished_total: Counter[str] = field(default_factory=Counter)
    ttft: list[float] = field(default_factory=list)  # seconds, per finished request (bounded below)
    tpot: list[float] = field(default_factory=list)
    batch_size: int = 0
    # (end time, step seconds by phase) of recent steps
    steps: deque[tuple[float, dict[str, float]]] = field(default_factory=deque)

    def record_step(
        self,
        so: SchedulerOutput,
        runner_seconds: dict[str, float],
        schedule: float,
        detokenize: float,
        total: float,
    ) -> None:
        now = time.monotonic()
        self.batch_size = len(so.scheduled)
        self.steps.append(
            (now, {"schedule": schedule, "detokenize": detokenize, "total": total, **runner_seconds})
        )
        while self.steps and self.steps[0][0] < now - WINDOW_SECONDS:
            self.steps.popleft()

    def finished(self, seq: Sequence) -> None:
        self.finished_total[seq.finish_reason or "abort"] += 1
        if seq.first_token_time is not None:
            self.ttft.append(seq.first_token_time - seq.arrival_time)
            if seq.num_output_tokens > 1:
                self.tpot.append((time.monotonic() - seq.first_token_time) / (seq.num_output_tokens - 1))
        del self.ttft[:-1000], self.tpot[:-1000]

    def device_busy_ratio(self) -> float:
        """Share of recent wall time spent inside the model forward."""
        if not self.steps:
            return 0.0
        now = time.monotonic()
        first_end, first = self.steps[0]
        span = max(now - (first_end - first["total"]), 1e-9)
        return min(1.0, sum(s["forward"] for _, s in self.steps) / span)

    def step_seconds(self) -> dict[str, float]:
        """Mean seconds per step, by phase, over the window."""
        n = max(len(self.steps), 1)
        return {p: sum(s.get(p, 0.0) for _, s in self.steps) / n for p in PHASES}

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
            "step_seconds": self.step_seconds(),
            "admission_headroom_sequences": headroom,
            "prefix_cache_hit_rate": kv.prefix_hit_rate(),
        }
