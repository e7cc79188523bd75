"""Autoscaling engine replicas on qserve's own signals, not on request counts.

A request count says little about an LLM server: ten requests may be ten short completions or ten
30k-token prompts. Each replica reports what its scheduler knows (``record_autoscaling_stats``, every
metrics interval): ``admission_headroom_sequences`` (how many more average-sized requests fit now, by free
KV blocks and max_num_seqs), ``kv_cache_usage_ratio``, ``requests_waiting`` and ``requests_running``. Ray
Serve averages each over ``look_back_period_s`` and calls the policy every control-loop tick with them.

The decision, :func:`decide` (pure: signals + state + time in, desired replicas + state out):

* **up** as soon as the replicas run short, before a queue builds: at least ``up_waiting`` requests
  waiting (in the engines, or queued in front of them by Serve: each replica takes only about
  max_num_seqs requests at once, so a backlog waits where any replica, a new one too, can pick it up),
  or the free admission headroom at or under ``up_headroom`` of the admission capacity
  (running + headroom), or a replica's KV usage at ``kv_high``. The step adds enough replicas for the
  waiting requests at the measured capacity per replica (at least one). No next step until every replica
  asked for is running and ``up_cooldown_s`` has passed (a new replica's metrics lag).
* **down** by one when the running sequences would fit in one replica fewer at ``down_load`` of its
  capacity, nothing waits and KV usage is under ``kv_low``, and all that has held for ``down_cooldown_s``
  without a break.
* otherwise **hold**.

launch.py sets Ray Serve's own upscale/downscale delays to zero, so every up or down is applied as decided
(within min/max replicas). The Ray side, :class:`QServeAutoscalingPolicy`, logs each one and reports it to
the cluster stats actor, whose numbers /metrics shows as ``qserve_autoscaling_decisions_total{direction}``
and ``qserve_desired_replicas``. This module imports Ray only to find that actor.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# the replica metrics the policy reads (record_autoscaling_stats keys)
SIGNALS = ("admission_headroom_sequences", "kv_cache_usage_ratio", "requests_waiting", "requests_running")
LAST_UP = "qserve_last_scale_up"  # policy_state keys (Ray Serve keeps the dict between ticks)
IDLE_SINCE = "qserve_idle_since"


@dataclass(frozen=True)
class ReplicaSignals:
    """One replica's signals, averaged over the look-back window."""

    headroom: float  # admission_headroom_sequences
    kv_usage: float  # kv_cache_usage_ratio, 0..1
    waiting: float  # requests_waiting
    running: float  # requests_running


@dataclass(frozen=True)
class ScalingConfig:
    """Thresholds and cool-downs of :func:`decide` (module docstring)."""

    up_waiting: float = 1.0  # requests waiting (summed over replicas) that call for a scale-up
    up_headroom: float = 0.1  # scale up when free headroom is at most this share of admission capacity
    kv_high: float = 0.9  # scale up when a replica's KV usage reaches this
    kv_low: float = 0.6  # scale down only while every replica's KV usage is under this
    down_load: float = 0.5  # scale down only if running sequences fit in n-1 replicas at this share
    up_cooldown_s: float = 15.0  # after a scale-up, seconds before the next one
    down_cooldown_s: float = 120.0  # seconds the scale-down condition must hold without a break


@dataclass(frozen=True)
class Decision:
    desired: int  # replicas wanted (the target before this decision when direction is "hold")
    direction: str  # "up" | "down" | "hold"
    reason: str


def decide(
    signals: list[ReplicaSignals],
    *,
    queued: float = 0.0,
    current: int,
    target: int,
    min_replicas: int,
    max_replicas: int,
    now: float,
    state: Mapping[str, Any],
    config: ScalingConfig,
) -> tuple[Decision, dict[str, Any]]:
    """The replicas wanted, from the running replicas' signals.

    Args:
        signals: one entry per running replica that has reported (none yet: hold).
        queued: requests held in front of the replicas (Serve's handle queues, when every replica is at
            max_ongoing_requests): they wait like the engines' own waiting requests.
        current: replicas running now; target: replicas asked for (current < target while some start).
        now: seconds (any clock, the same on every call); state: what the previous call returned.

    Returns the decision and the state to pass to the next call.
    """
    st = dict(state)
    if target < min_replicas:
        return Decision(min_replicas, "up", f"below min_replicas {min_replicas}"), st
    if target > max_replicas:
        return Decision(max_replicas, "down", f"above max_replicas {max_replicas}"), st
    if not signals:
        st[IDLE_SINCE] = None
        return Decision(target, "hold", "no replica metrics yet"), st
    waiting = sum(s.waiting for s in signals) + queued
    headroom = sum(s.headroom for s in signals)
    running = sum(s.running for s in signals)
    kv = max(s.kv_usage for s in signals)
    per_replica = (running + headroom) / len(signals)  # sequences one replica admits at once
    short = _short(waiting, headroom, running, kv, config)
    if short:
        st[IDLE_SINCE] = None
        if target >= max_replicas:
            return Decision(target, "hold", f"{short}; at max_replicas {max_replicas}"), st
        if current < target:
            return Decision(target, "hold", f"{short}; {target - current} replica(s) still starting"), st
        last_up = st.get(LAST_UP)
        if last_up is not None and now - last_up < config.up_cooldown_s:
            return Decision(target, "hold", f"{short}; cooling down after the last scale-up"), st
        step = max(1, math.ceil(waiting / per_replica)) if per_replica >= 1 else 1
        st[LAST_UP] = now
        return Decision(min(max_replicas, target + step), "up", short), st
    fits = running <= config.down_load * per_replica * (target - 1)
    if target <= min_replicas or waiting > 0 or kv >= config.kv_low or not fits:
        st[IDLE_SINCE] = None
        return Decision(target, "hold", "steady"), st
    idle_since = st.get(IDLE_SINCE)
    if idle_since is None:
        idle_since = st[IDLE_SINCE] = now
    if now - idle_since < config.down_cooldown_s:
        return Decision(target, "hold", f"idle for {now - idle_since:.1f}s, scaling down after "
                        f"{config.down_cooldown_s:g}s"), st  # fmt: skip
    st[IDLE_SINCE] = None
    reason = f"{running:g} running sequences fit in {target - 1} replica(s) for {config.down_cooldown_s:g}s"
    return Decision(target - 1, "down", reason), st


def _short(waiting: float, headroom: float, running: float, kv: float, config: ScalingConfig) -> str:
    """Why the replicas are running short ("" when they are not)."""
    if waiting >= config.up_waiting:
        return f"{waiting:.1f} requests waiting"
    if running > 0 and headroom <= config.up_headroom * (running + headroom):
        return f"headroom {headroom:.1f} of {running + headroom:.1f} sequences"
    if kv >= config.kv_high:
        return f"KV cache {kv:.0%} used"
    return ""


def signals_by_replica(metrics: Mapping[str, Mapping[Any, float]]) -> dict[Any, ReplicaSignals]:
    """Per-replica signals from Ray Serve's ``AutoscalingContext.aggregated_metrics`` ({metric: {replica:
    value}}); a replica that has not reported all four is left out."""
    replicas = set.intersection(*(set(metrics.get(name, {})) for name in SIGNALS))
    return {
        r: ReplicaSignals(
            headroom=float(metrics["admission_headroom_sequences"][r]),
            kv_usage=float(metrics["kv_cache_usage_ratio"][r]),
            waiting=float(metrics["requests_waiting"][r]),
            running=float(metrics["requests_running"][r]),
        )
        for r in replicas
    }


class QServeAutoscalingPolicy:
    """Ray Serve's custom autoscaling policy around :func:`decide`.

    Used as ``AutoscalingPolicy(policy_function=QServeAutoscalingPolicy, policy_kwargs={...})``: the Serve
    controller builds one instance from ``policy_kwargs`` (``stats_actor``, ``namespace`` and any
    ScalingConfig field) and calls it every control-loop tick with an ``AutoscalingContext``; it returns
    (replicas wanted, policy state). Min/max replicas come from the context (the AutoscalingConfig's).
    """

    def __init__(self, stats_actor: str = "", namespace: str = "qserve", **config: float):
        self.config = ScalingConfig(**config)
        self.stats_actor = stats_actor
        self.namespace = namespace
        self._stats: Any = None
        self._log = logging.getLogger("ray.serve")  # the controller's own logger: its log file and stderr

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        signals = signals_by_replica(ctx.aggregated_metrics or {})
        decision, state = decide(
            list(signals.values()),
            queued=float(ctx.total_queued_requests or 0.0),
            current=ctx.current_num_replicas,
            target=ctx.target_num_replicas,
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=ctx.capacity_adjusted_max_replicas,
            now=ctx.current_time or time.time(),
            state=ctx.policy_state,
            config=self.config,
        )
        if decision.direction != "hold":
            self._log.info(
                "qserve autoscaling: %s %d -> %d replicas (%s)",
                decision.direction,
                ctx.target_num_replicas,
                decision.desired,
                decision.reason,
            )
            self._report(ctx.target_num_replicas, decision)
        return decision.desired, state

    def _report(self, before: int, decision: Decision) -> None:
        if not self.stats_actor:
            return
        try:
            import ray

            if self._stats is None:
                self._stats = ray.get_actor(self.stats_actor, namespace=self.namespace)
            record: dict[str, Any] = {"time": time.time(), "from": before, "to": decision.desired}
            record |= {"direction": decision.direction, "reason": decision.reason}
            self._stats.record_decision.remote(record)
        except Exception as e:  # the stats actor is gone: the decision stands, only its metric is lost
            self._stats = None
            self._log.warning("qserve autoscaling: cannot report the decision: %s", e)
