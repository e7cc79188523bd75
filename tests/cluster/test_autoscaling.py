"""The autoscaling decision on fixed inputs: exact desired replicas, direction and state, no Ray needed."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from qserve.cluster.autoscaling import (
    IDLE_SINCE,
    LAST_UP,
    QServeAutoscalingPolicy,
    ReplicaSignals,
    ScalingConfig,
    decide,
    signals_by_replica,
)

CFG = ScalingConfig(up_cooldown_s=10.0, down_cooldown_s=30.0)
IDLE = ReplicaSignals(headroom=8, kv_usage=0.0, waiting=0, running=0)
BUSY = ReplicaSignals(headroom=4, kv_usage=0.4, waiting=0, running=4)  # half of 8 slots used


def run(signals: list[ReplicaSignals], *, current: int = 1, target: int = 1, now: float = 100.0,
        state: dict[str, Any] | None = None, lo: int = 1, hi: int = 4, queued: float = 0.0,
        ) -> tuple[int, str, dict[str, Any]]:  # fmt: skip
    d, st = decide(
        signals,
        queued=queued,
        current=current,
        target=target,
        min_replicas=lo,
        max_replicas=hi,
        now=now,
        state=state or {},
        config=CFG,
    )
    return d.desired, d.direction, st


def test_scale_up_before_the_queue_builds() -> None:
    # 8 slots, 7 running: headroom 1 <= 10% of 8 is not reached (0.8); at 8 running headroom 0 is
    full = ReplicaSignals(headroom=0, kv_usage=0.5, waiting=0, running=8)
    almost = ReplicaSignals(headroom=1, kv_usage=0.5, waiting=0, running=7)
    assert run([almost])[:2] == (1, "hold")
    assert run([full])[:2] == (2, "up")
    # KV nearly full is pressure too, with slots to spare
    assert run([ReplicaSignals(headroom=6, kv_usage=0.95, waiting=0, running=2)])[:2] == (2, "up")
    # waiting requests: enough replicas for them at the measured 8 sequences per replica
    queued = ReplicaSignals(headroom=0, kv_usage=0.5, waiting=20, running=8)
    desired, direction, st = run([queued])
    assert (desired, direction, st[LAST_UP]) == (4, "up", 100.0)  # 1 + ceil(20 / 8) = 4
    assert run([queued], hi=3)[:2] == (3, "up")  # capped at max_replicas
    # requests queued in front of the replicas (Serve's handle queue) wait just the same
    at_limit = ReplicaSignals(headroom=0, kv_usage=0.5, waiting=1, running=8)
    assert run([at_limit], queued=15)[:2] == (3, "up")  # 1 + ceil((1 + 15) / 8)
    # under a mean of one waiting request over the window: noise, not a queue
    assert run([ReplicaSignals(headroom=3, kv_usage=0.5, waiting=0.4, running=4)])[:2] == (1, "hold")


def test_scale_up_waits_for_started_replicas_and_cooldown() -> None:
    full = ReplicaSignals(headroom=0, kv_usage=0.5, waiting=3, running=8)
    # a replica asked for is still starting: no second step
    assert run([full], current=1, target=2, hi=4)[:2] == (2, "hold")
    # both running, but the last scale-up was 5 s ago (cool-down 10 s)
    assert run([full, full], current=2, target=2, now=105.0, state={LAST_UP: 100.0})[:2] == (2, "hold")
    assert run([full, full], current=2, target=2, now=110.0, state={LAST_UP: 100.0})[:2] == (3, "up")
    assert run([full, full], current=2, target=2, hi=2)[:2] == (2, "hold")  # at max


def test_scale_down_after_a_cooldown_without_a_break() -> None:
    _, direction, st = run([IDLE, IDLE], current=2, target=2, now=100.0)
    assert (direction, st[IDLE_SINCE]) == ("hold", 100.0)
    _, direction, st = run([IDLE, IDLE], current=2, target=2, now=129.0, state=st)
    assert (direction, st[IDLE_SINCE]) == ("hold", 100.0)
    desired, direction, st = run([IDLE, IDLE], current=2, target=2, now=130.0, state=st)
    assert (desired, direction, st[IDLE_SINCE]) == (1, "down", None)
    # a busy tick in between restarts the cool-down
    _, _, st = run([IDLE, IDLE], current=2, target=2, now=100.0)
    _, direction, st = run([BUSY, BUSY], current=2, target=2, now=120.0, state=st)  # 8 running > 0.5 * 8
    assert (direction, st[IDLE_SINCE]) == ("hold", None)
    assert run([IDLE, IDLE], current=2, target=2, now=131.0, state=st)[1] == "hold"


def test_scale_down_only_when_the_load_fits_in_fewer() -> None:
    light = ReplicaSignals(headroom=6, kv_usage=0.2, waiting=0, running=2)  # 4 running of 2 x 8 slots
    st = {IDLE_SINCE: 0.0}
    assert run([light, light], current=2, target=2, state=st)[:2] == (1, "down")  # 4 <= 0.5 * 8 * 1
    medium = ReplicaSignals(headroom=5, kv_usage=0.2, waiting=0, running=3)  # 6 > 4
    assert run([medium, medium], current=2, target=2, state=st)[:2] == (2, "hold")
    kv_busy = ReplicaSignals(headroom=7, kv_usage=0.7, waiting=0, running=1)  # KV over kv_low
    assert run([kv_busy, kv_busy], current=2, target=2, state=st)[:2] == (2, "hold")
    assert run([IDLE], current=1, target=1, state=st)[:2] == (1, "hold")  # at min_replicas
    assert run([light, light], current=2, target=2, state=st, queued=0.5)[:2] == (2, "hold")  # a backlog


def test_bounds_and_missing_metrics() -> None:
    assert run([], target=1, lo=2)[:2] == (2, "up")
    assert run([IDLE], target=5, hi=4)[:2] == (4, "down")
    desired, direction, st = run([], current=2, target=2, state={IDLE_SINCE: 5.0})
    assert (desired, direction, st[IDLE_SINCE]) == (2, "hold", None)


def test_signals_by_replica() -> None:
    metrics = {
        "admission_headroom_sequences": {"a": 3.0, "b": 1.0},
        "kv_cache_usage_ratio": {"a": 0.25, "b": 0.5},
        "requests_waiting": {"a": 0.0, "b": 2.0},
        "requests_running": {"a": 1.0, "b": 4.0},
        "running_requests": {"a": 9.0},  # Ray's own metric: ignored
    }
    assert signals_by_replica(metrics) == {
        "a": ReplicaSignals(3.0, 0.25, 0.0, 1.0),
        "b": ReplicaSignals(1.0, 0.5, 2.0, 4.0),
    }
    del metrics["requests_running"]["b"]  # not reported yet
    assert list(signals_by_replica(metrics)) == ["a"]
    assert signals_by_replica({}) == {}


def test_policy_on_an_autoscaling_context(caplog: pytest.LogCaptureFixture) -> None:
    """The Ray-facing callable on a stand-in AutoscalingContext: the decision, its state and its log line."""
    policy = QServeAutoscalingPolicy(up_cooldown_s=10.0, down_cooldown_s=30.0)
    policy._log = logging.getLogger("qserve.test.autoscaling")  # ray.serve's logger may not propagate
    ctx = SimpleNamespace(
        aggregated_metrics={
            "admission_headroom_sequences": {"r1": 0.0},
            "kv_cache_usage_ratio": {"r1": 0.5},
            "requests_waiting": {"r1": 4.0},
            "requests_running": {"r1": 4.0},
        },
        total_queued_requests=2.0,  # at the ingress: waiting too
        current_num_replicas=1,
        target_num_replicas=1,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=2,
        current_time=50.0,
        policy_state={"serve_internal": 1},
    )
    with caplog.at_level("INFO", logger="qserve.test.autoscaling"):
        desired, state = policy(ctx)
    assert desired == 2
    assert state == {"serve_internal": 1, LAST_UP: 50.0, IDLE_SINCE: None}
    assert "qserve autoscaling: up 1 -> 2 replicas (6.0 requests waiting)" in caplog.text
