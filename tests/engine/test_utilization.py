"""Honest utilization: device_busy_ratio over a window that decays to 0 when idle, and the step-gap histogram."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from qserve import LLM, SamplingParams
from qserve.engine.busy import BIN_SECONDS, WINDOW_SECONDS, BusyWindow, busy_ratio
from qserve.server.metrics import ServerMetrics


def test_busy_window_splits_intervals_over_bins() -> None:
    w = BusyWindow(created=0.0)
    w.add(0.1, 0.6)  # crosses bins 0, 1 and 2 (0.25 s each)
    assert w.bins == pytest.approx({0: 0.15, 1: 0.25, 2: 0.1})
    w.add(20.0, 20.1)  # ten seconds later: the old bins fall out of the window
    assert w.bins == pytest.approx({80: 0.1})


def test_busy_ratio_decays_to_zero_when_idle() -> None:
    w = BusyWindow(created=0.0)
    for i in range(100):  # busy half of every 0.1 s for 10 s
        w.add(i * 0.1, i * 0.1 + 0.05)
    e = w.export()
    assert busy_ratio(e, now=10.0) == pytest.approx(0.5)
    assert busy_ratio(e, now=15.0) == pytest.approx(0.25, abs=BIN_SECONDS / WINDOW_SECONDS)
    assert busy_ratio(e, now=10.0 + WINDOW_SECONDS + BIN_SECONDS) == 0.0
    # a young engine divides by its age, not by the whole window
    young = BusyWindow(created=100.0)
    young.add(100.0, 101.0)
    assert busy_ratio(young.export(), now=101.0) == pytest.approx(1.0)
    assert busy_ratio(young.export(), now=102.0) == pytest.approx(0.5)


def test_engine_busy_and_gaps(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), kv_cache_memory=1 << 20)
    steps = 0
    real_step = llm.engine.step

    def counting_step() -> list:  # type: ignore[type-arg]
        nonlocal steps
        steps += 1
        return real_step()

    llm.engine.step = counting_step  # type: ignore[method-assign]
    llm.generate([f"prompt {i}" for i in range(5)], SamplingParams(max_tokens=12, temperature=0.0))
    m = llm.metrics()
    # every step after the first followed one with work pending: one gap each, none after the idle start
    assert m["step_gap_seconds"]["count"] == steps - 1 > 10
    assert m["step_gap_seconds"]["cumulative"][-1] == steps - 1
    assert 0.0 < m["step_gap_seconds"]["sum"] < 10.0
    assert 0.0 < m["device_busy_ratio"] <= 1.0
    later = m["device_busy"]["created"] + 1e6
    assert busy_ratio(m["device_busy"], now=later) == 0.0
    # a second burst after an idle wait adds no gap for the wait itself
    before, steps = m["step_gap_seconds"]["count"], 0
    llm.generate(["again"], SamplingParams(max_tokens=4, temperature=0.0))
    assert llm.metrics()["step_gap_seconds"]["count"] == before + steps - 1


def test_exported_busy_ratio_is_computed_at_scrape_time(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), kv_cache_memory=1 << 20)
    llm.generate(["x"], SamplingParams(max_tokens=8, temperature=0.0))
    snapshot = llm.metrics()
    stale = {**snapshot, "device_busy": {**snapshot["device_busy"], "created": -1e9}}
    # the same bins, read 11 s after they were written: what an idle server scraped later sees
    stale["device_busy"]["bins"] = {
        k - int(11 / BIN_SECONDS): v for k, v in stale["device_busy"]["bins"].items()
    }
    text = ServerMetrics(lambda: stale).render().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert values["qserve_device_busy_ratio"] == 0.0
    assert values["qserve_step_gap_seconds_count"] == snapshot["step_gap_seconds"]["count"] > 0
    assert values["qserve_step_gap_seconds_sum"] == pytest.approx(snapshot["step_gap_seconds"]["sum"])
