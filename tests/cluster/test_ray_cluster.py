"""qserve on a real local Ray cluster (2 CPUs), demo-model replicas at half a CPU each.

The routing test starts `qserve serve demo --replicas 2` as a user would (its own local Ray), joins that
cluster, and runs one multi-turn (agent) workload through the session-affinity front and another through
a random front over the same two replicas: affinity must give the higher prefix-cache hit rate. The
autoscaling test drives a `qserve bench` burst at an autoscaled deployment (short cool-downs) and watches
/metrics: 1 replica -> 2 under the burst -> 1 after it, no request failed. 80 to 100 s on 2 cores.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from qserve.bench import BenchConfig, run_bench  # noqa: E402
from qserve.cluster.autoscaling import ScalingConfig  # noqa: E402
from qserve.cluster.launch import ClusterOptions, add_front, start, stop  # noqa: E402
from qserve.server.launch import ServeOptions  # noqa: E402

try:  # the HTTP client the installed `openai` is built on (recent releases: httpx2, older: httpx)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
FAST = dict(look_back_s=2.0, metrics_interval_s=0.5, routing_stats_period_s=0.5, stats_interval_s=0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def local_ray() -> Iterator[int]:
    """A Ray cluster in this process; yields a free port for Serve's HTTP proxy."""
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, namespace="qserve", log_to_driver=False)
    try:
        yield free_port()
    finally:
        serve.shutdown()
        ray.shutdown()


def metrics(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


class Watcher(threading.Thread):
    """Samples the cluster's /metrics every 0.25 s: replicas reporting, desired, decisions, prompt tokens."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url = url
        self.t0 = time.monotonic()
        self.samples: list[dict[str, Any]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.25):
            try:
                m = metrics(self.url)
            except Exception:
                continue
            prompt = {dict(k[1])["replica"]: v for k, v in m.items() if k[0] == "qserve_prompt_tokens_total"}
            self.samples.append(
                {
                    "t": time.monotonic() - self.t0,
                    "replicas": m[("qserve_replicas", ())],
                    "desired": m.get(("qserve_desired_replicas", ())),
                    "up": m[("qserve_autoscaling_decisions_total", (("direction", "up"),))],
                    "down": m[("qserve_autoscaling_decisions_total", (("direction", "down"),))],
                    "prompt_tokens": prompt,
                }
            )

    def first(self, after: float = -1.0, **want: float) -> dict[str, Any] | None:
        return next(
            (s for s in self.samples if s["t"] > after and all(s[k] == v for k, v in want.items())), None
        )


def test_burst_scales_up_then_down_without_losing_requests(local_ray: int) -> None:
    port = local_ray
    url = f"http://127.0.0.1:{port}"
    opts = ServeOptions(model="demo", port=port, max_num_seqs="4")
    scaling = ScalingConfig(up_cooldown_s=2.0, down_cooldown_s=3.0)
    copts = ClusterOptions(
        replicas="auto", min_replicas=1, max_replicas=2, replica_cpus=0.5, scaling=scaling, **FAST
    )
    start(opts, copts)
    try:
        watcher = Watcher(url)
        watcher.start()
        time.sleep(1.0)
        burst_at = time.monotonic() - watcher.t0
        report = run_bench(
            BenchConfig(url, workload="bursty", rate=20.0, burst_on=6.0, burst_off=60.0, duration=6.0,
                        prompt_len="32:64", output_len="96", concurrency=48, timeout=120.0)
        ).to_json(per_request=False)  # fmt: skip
        bench_done = time.monotonic() - watcher.t0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not watcher.first(down=1, replicas=1):
            time.sleep(0.25)
        watcher.done.set()
        watcher.join()
        snapshot = ray.get(ray.get_actor(copts.stats_actor, namespace=copts.namespace).snapshot.remote())
    finally:
        stop(copts)

    total = report["requests"]["total"]
    assert report["requests"] == {"total": total, "completed": total, "failed": 0}, report["errors"]
    assert total >= 40 and report["errors"] == {}
    assert watcher.samples[0]["replicas"] == 1
    up = watcher.first(up=1, desired=2)
    two = watcher.first(replicas=2)
    assert up is not None and two is not None, watcher.samples[-1]
    down = watcher.first(after=two["t"], down=1, desired=1)
    one = watcher.first(after=two["t"], replicas=1)
    assert down is not None and one is not None, watcher.samples[-1]
    assert [h["direction"] for h in snapshot["history"]] == ["up", "down"]
    assert snapshot["history"][0]["from"] == 1 and snapshot["history"][0]["to"] == 2
    # the replica added under the burst served part of it
    first_replica = set(watcher.samples[0]["prompt_tokens"])
    added = {r: v for s in watcher.samples for r, v in s["prompt_tokens"].items() if r not in first_replica}
    assert added and max(added.values()) > 0
    print(
        f"\nburst at {burst_at:.1f}s: scale-up decided +{up['t'] - burst_at:.1f}s, 2 replicas running "
        f"+{two['t'] - burst_at:.1f}s; burst served +{bench_done - burst_at:.1f}s; "
        f"scale-down decided +{down['t'] - burst_at:.1f}s, 1 replica "
        f"+{one['t'] - burst_at:.1f}s; {total} requests, 0 failed; "
        f"reasons: {[h['reason'] for h in snapshot['history']]}"
    )


def wait_for_line(proc: subprocess.Popen[bytes], log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {text!r} (exit {proc.poll()}):\n{log.read_text(errors='replace')}")
        time.sleep(0.25)


def test_cli_replicas_session_affinity_beats_random_routing(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["serve", "demo", "--replicas", "2", "--replica-cpus", "0.5", "--max-num-seqs", "16"]
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        cmd = [sys.executable, "-m", "qserve.cli", *args, "--port", str(port)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # from the repo root, as a user in a clone starts it: the replicas' workers must not import the
        # repo's kernels/ folder as Hugging Face's `kernels` (tests/test_root_dir.py)
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        wait_for_line(proc, log, f"serving 'demo' on {url}/v1", timeout=180)
        ray.init(address="auto", namespace="qserve", log_to_driver=False)  # the CLI's cluster
        copts = ClusterOptions(replicas="2")  # the names the CLI used
        affinity, random_ = affinity_vs_random(url, ServeOptions(model="demo", port=port), copts)
    finally:
        ray.shutdown()  # only this process's connection
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(120)
    out = log.read_text(errors="replace")
    assert rc == 0, out
    assert "qserve serve: 'demo' as 2 replica(s) on Ray Serve (affinity routing)" in out
    assert "max_num_seqs  16, max_queue 256" in out and "qserve serve: stopping" in out
    print(f"\nprefix cache hit rate: session affinity {affinity:.3f}, random {random_:.3f}")
    assert affinity > random_ + 0.05


def affinity_vs_random(url: str, opts: ServeOptions, copts: ClusterOptions) -> tuple[float, float]:
    """Prefix-cache hit rates of the same kind of agent workload through the app's own (affinity) front and
    through a random front over the same replicas; also checks the API through the cluster."""
    stats_actor = ray.get_actor(copts.stats_actor, namespace=copts.namespace)

    def prompt_and_hits() -> dict[str, tuple[float, float]]:
        deadline = time.monotonic() + 10  # both replicas' reports are in
        while True:
            snap = ray.get(stats_actor.snapshot.remote())["replicas"]
            if len(snap) == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.25)
        return {
            r: (v["stats"]["prompt_tokens_total"], v["stats"]["prompt_tokens_total"] * v["stats"]["prefix_cache_hit_rate"])
            for r, v in snap.items()
        }  # fmt: skip

    def hit_rate(front: str, seed: int) -> float:
        before = prompt_and_hits()
        report = run_bench(
            BenchConfig(front, workload="agent", rate=float("inf"), concurrency=8, requests=48, turns=6,
                        think_time=0.0, prompt_len="96:160", user_len="32", output_len="16", seed=seed)
        ).to_json(per_request=False)  # fmt: skip
        assert report["requests"]["failed"] == 0, report["errors"]
        time.sleep(2.0)  # the replicas' next reports
        after = prompt_and_hits()
        tokens = sum(p - before.get(r, (0, 0))[0] for r, (p, _) in after.items())
        hits = sum(h - before.get(r, (0, 0))[1] for r, (_, h) in after.items())
        return hits / tokens

    # the single server's API and errors, through the cluster
    body = {"model": "demo", "prompt": "def fib(n):", "max_tokens": 8, "temperature": 0}
    r = httpx.post(url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
    r = httpx.post(url + "/v1/completions", json={**body, "stream": True, "user": "u1"}, timeout=60)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    r = httpx.post(url + "/v1/completions", json={**body, "model": "nope"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(url + "/health", timeout=10).json() == {"status": "ok"}
    r = httpx.post(url + "/v1/completions", content=b" " * ((4 << 20) + 1), timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"] == "demo"

    affinity = hit_rate(url, seed=1)
    routed = metrics(url)
    assert routed[("qserve_routing_decisions_total", (("reason", "affinity"),))] >= 30  # of 40 later turns
    assert routed[("qserve_replicas", ())] == 2
    add_front(opts, dataclasses.replace(copts, routing="random"), "qserve-random", "/random")
    return affinity, hit_rate(url + "/random", seed=2)
