"""Request generators: length specs, seeds, arrival-process properties, agent prefix growth, datasets."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest

from qserve.bench.config import BenchConfig, LengthDist, parse_range
from qserve.bench.metrics_sampler import parse_prometheus
from qserve.bench.workloads import (
    agent_sessions,
    arrival_times,
    bursty_arrivals,
    load_dataset,
    poisson_arrivals,
    request_specs,
)
from qserve.errors import QServeError

URL = "http://127.0.0.1:1"


def take(it, n):  # type: ignore[no-untyped-def]
    return list(itertools.islice(it, n))


def test_length_specs() -> None:
    rng = random.Random(0)
    assert LengthDist.parse("128").sample(rng) == 128
    uniform = [LengthDist.parse("64:256").sample(rng) for _ in range(2000)]
    assert min(uniform) == 64 and max(uniform) == 256
    normal = [LengthDist.parse("normal:100,10").sample(rng) for _ in range(4000)]
    assert abs(sum(normal) / len(normal) - 100) < 1.0
    assert min(LengthDist.parse("normal:2,50").sample(rng) for _ in range(200)) == 1  # clipped
    for bad in ("0", "x", "5:2", "0:3", "normal:1", "normal:-3,1", "1.5"):
        with pytest.raises(QServeError, match="bad length"):
            LengthDist.parse(bad)
    assert parse_range("1:256") == (1, 256)
    with pytest.raises(QServeError):
        parse_range("5:5")


def test_config_validation() -> None:
    for kw in (
        {"url": "localhost:8000"},
        {"workload": "spiky"},
        {"concurrency": 0},
        {"rate": 0.0},
        {"endpoint": "embeddings"},
        {"prompt_len": "0"},
        {"dataset": Path("/nonexistent.jsonl")},
    ):
        with pytest.raises(QServeError):
            BenchConfig(**{"url": URL, **kw})  # type: ignore[arg-type]
    assert BenchConfig(URL).max_requests == 64  # the default bound
    assert BenchConfig(URL, duration=5.0).max_requests is None
    assert BenchConfig(URL, api_key="secret").public()["api_key"] == "***"


def test_prompts_are_deterministic_per_seed_and_independent_of_rate() -> None:
    cfg = BenchConfig(URL, prompt_len="4:40", output_len="2:9", vocab_range=(5, 50))
    a = take(request_specs(cfg), 30)
    assert a == take(request_specs(BenchConfig(URL, prompt_len="4:40", output_len="2:9", vocab_range=(5, 50), rate=99.0)), 30)  # fmt: skip
    assert a != take(request_specs(BenchConfig(URL, prompt_len="4:40", output_len="2:9", seed=1)), 30)
    for spec in a:
        assert isinstance(spec.prompt, list) and 4 <= len(spec.prompt) <= 40 and 2 <= spec.output_len <= 9
        assert all(5 <= t < 50 for t in spec.prompt) and spec.prompt_tokens == len(spec.prompt)
    assert take(arrival_times(cfg), 5) == take(arrival_times(cfg), 5)


def test_poisson_arrivals_mean_rate() -> None:
    times = take(poisson_arrivals(5.0, random.Random(1)), 20000)
    assert all(b >= a for a, b in itertools.pairwise(times))
    assert times[-1] / len(times) == pytest.approx(1 / 5.0, rel=0.03)  # mean inter-arrival 0.2 s
    gaps = [b - a for a, b in itertools.pairwise(times)]
    cv = (sum((g - 0.2) ** 2 for g in gaps) / len(gaps)) ** 0.5 / 0.2
    assert cv == pytest.approx(1.0, abs=0.05)  # exponential gaps: std == mean
    assert take(poisson_arrivals(float("inf"), random.Random(1)), 3) == [0.0, 0.0, 0.0]
    assert take(arrival_times(BenchConfig(URL, workload="closed")), 4) == [0.0] * 4


def test_bursty_arrivals_only_in_on_phases() -> None:
    on, off, rate = 2.0, 3.0, 10.0
    times = take(bursty_arrivals(rate, on, off, random.Random(2)), 20000)
    assert all((t % (on + off)) <= on + 1e-9 for t in times)
    cycles = times[-1] // (on + off)
    in_full_cycles = sum(t < cycles * (on + off) for t in times)
    assert in_full_cycles / (cycles * on) == pytest.approx(rate, rel=0.03)  # the rate inside on-phases
    cfg = BenchConfig(URL, workload="bursty", rate=rate, burst_on=on, burst_off=off)
    assert all((t % 5.0) <= 2.0 for t in take(arrival_times(cfg), 500))


def test_agent_sessions_grow_a_shared_prefix() -> None:
    cfg = BenchConfig(URL, workload="agent", turns=4, prompt_len="10:20", output_len="3:6", user_len="2:5")
    sessions = take(agent_sessions(cfg), 5)
    assert len({s[0].session for s in sessions}) == 5
    for turns in sessions:
        assert [t.turn for t in turns] == [0, 1, 2, 3]
        assert len({t.session for t in turns}) == 1
        for prev, cur in itertools.pairwise(turns):
            assert isinstance(prev.prompt, list) and isinstance(cur.prompt, list)
            head = prev.prompt + prev.reply
            assert len(prev.reply) == prev.output_len  # the re-sent answer is the turn's full output
            assert cur.prompt[: len(head)] == head
            assert 2 <= len(cur.prompt) - len(head) <= 5  # the new user tokens
    assert take(agent_sessions(cfg), 5) == sessions  # deterministic
    # a context limit ends a session before a turn that would not fit
    capped = take(agent_sessions(cfg, max_len=40), 20)
    for turns in capped:
        assert turns and all(len(t.prompt) + t.output_len <= 40 for t in turns)
    assert min(len(t) for t in capped) < 4


def test_dataset_rows_in_order_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"prompt": "def f(x):", "output_len": 5}, {"prompt": [1, 2, 3]}, {"prompt": [9], "output_len": 2}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cfg = BenchConfig(URL, dataset=path, output_len="7")
    specs = take(request_specs(cfg), 6)
    assert [(s.prompt, s.output_len) for s in specs[:3]] == [("def f(x):", 5), ([1, 2, 3], 7), ([9], 2)]
    assert specs[3:] == specs[:3]  # cycles
    assert specs[0].prompt_tokens is None  # text: the server's tokenizer decides
    # agent turns extend a text prompt with words
    text_session = next(agent_sessions(BenchConfig(URL, dataset=path, turns=2, workload="agent")))
    assert isinstance(text_session[1].prompt, str) and text_session[1].prompt.startswith("def f(x): ")
    for bad, message in (
        ("not json", ":1: expected a JSON object"),
        ('{"prompt": ""}', "non-empty"),
        ('{"prompt": [1, -2]}', "non-empty"),
        ('{"prompt": "x", "output_len": 0}', "output_len"),
        ("", "no prompts"),
    ):
        path.write_text(bad)
        with pytest.raises(QServeError, match=message):
            load_dataset(path)


def test_prometheus_parsing_and_other_servers() -> None:
    text = """# HELP qserve_batch_size Sequences in the last step's batch.
# TYPE qserve_batch_size gauge
qserve_batch_size 8.0
qserve_device_busy_ratio 0.93
qserve_kv_cache_usage_ratio NaN
qserve_preemptions_total 2.0
qserve_requests_finished_total{reason="stop"} 4.0
qserve_step_seconds{phase="forward"} 0.01
"""
    assert parse_prometheus(text) == {"batch_size": 8.0, "device_busy_ratio": 0.93, "preemptions_total": 2.0}
    # a --replicas front exports one series per replica: counts add up, ratios average
    cluster = """qserve_batch_size{replica="a 1"} 8.0
qserve_batch_size{replica="b"} 3.0
qserve_device_busy_ratio{replica="a 1"} 0.9
qserve_device_busy_ratio{replica="b"} 0.5
qserve_kv_cache_usage_ratio{replica="b"} NaN
qserve_requests_waiting 4.0
qserve_requests_waiting{replica="b"} 9.0
"""
    assert parse_prometheus(cluster) == {
        "batch_size": 11.0,
        "device_busy_ratio": 0.7,
        "requests_waiting": 4.0,
    }
    vllm = 'vllm:num_requests_running{model_name="m"} 3.0\nvllm:kv_cache_usage_perc{model_name="m"} 0.1\n'
    assert parse_prometheus(vllm) == {}
