"""`qserve serve --replicas ...` flags: validated before Ray is imported, and plain `serve` never imports it."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from qserve.cluster.launch import ClusterOptions, build_app, replica_bounds
from qserve.errors import QServeError
from qserve.server.launch import ServeOptions

# `serve` with run_server stubbed: the flags parse, the single-server path runs, and Ray stays unimported;
# the --replicas errors happen before Ray is imported too
NO_RAY = """
import sys
import qserve.server.launch as launch
seen = []
launch.run_server = seen.append
from typer.testing import CliRunner
from qserve.cli import app
r = CliRunner().invoke(app, ["serve", "demo", "--port", "8123", "--max-num-seqs", "4"])
assert r.exit_code == 0 and len(seen) == 1 and seen[0].port == 8123, r.output
for args in (["--replicas", "lots"], ["--replicas", "0"], ["--min-replicas", "2"], ["--ray-address", "auto"],
             ["--replicas", "2", "--max-replicas", "3"], ["--replicas", "auto", "--min-replicas", "3",
             "--max-replicas", "2"], ["--replicas", "2", "--max-queue", "0"]):
    r = CliRunner().invoke(app, ["serve", "demo", *args])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)
print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
"""


def test_serve_without_replicas_never_imports_ray() -> None:
    r = subprocess.run([sys.executable, "-c", NO_RAY], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_replica_bounds() -> None:
    assert replica_bounds(ClusterOptions(replicas="3")) == (3, 3, 3)
    assert replica_bounds(ClusterOptions(replicas="auto")) == (None, 1, None)
    assert replica_bounds(ClusterOptions(replicas="auto", min_replicas=2, max_replicas=5)) == (None, 2, 5)
    for bad, match in [
        (ClusterOptions(replicas="auto", min_replicas=0), "at least 1"),
        (ClusterOptions(replicas="2", min_replicas=1), "need --replicas auto"),
        (ClusterOptions(replicas="-1"), "positive integer or 'auto'"),
        (ClusterOptions(routing="hash"), "routing must be one of affinity, random"),
        (ClusterOptions(replica_cpus=-1), "must not be negative"),
    ]:
        with pytest.raises(QServeError, match=match):
            replica_bounds(bad)


def test_build_app() -> None:
    """The Serve application's deployments and options, as built (nothing deployed)."""
    opts = ServeOptions(model="demo", max_num_seqs="8", max_queue=100, shutdown_timeout=20)
    copts = ClusterOptions(replicas="auto", replica_cpus=0.5)

    def engine_of(app: Any) -> Any:
        return app._bound_deployment.init_args[0]._bound_deployment

    app = build_app(opts, copts, {"CPU": 2.0})
    ingress, engine = app._bound_deployment, engine_of(app)
    assert (ingress.name, ingress.num_replicas, ingress.ray_actor_options["num_cpus"]) == (
        "QServeIngress",
        1,
        0,
    )
    assert ingress.init_args[1:] == ("demo", "qserve-stats-qserve", "qserve", 16, "affinity")
    assert engine.name == "QServeEngine"
    # a replica takes max_num_seqs + a quarter; the rest waits at the ingress, at most --max-queue
    assert (engine.max_ongoing_requests, engine.max_queued_requests) == (10, 100)
    assert (engine.ray_actor_options["num_cpus"], engine.ray_actor_options["num_gpus"]) == (0.5, 0.0)
    cfg = engine._deployment_config  # no public accessor for these
    assert cfg.graceful_shutdown_timeout_s == 20
    auto = cfg.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.upscale_delay_s, auto.downscale_delay_s) == (
        1,
        4,
        0,
        0,
    )
    assert auto.policy.policy_function == "qserve.cluster.autoscaling.QServeAutoscalingPolicy"
    assert auto.policy.policy_kwargs["stats_actor"] == "qserve-stats-qserve"
    assert cfg.request_router_config.request_router_class == "qserve.cluster.router.SessionAffinityRouter"
    # a GPU cluster: one GPU per replica, and as many replicas as GPUs by default
    gpu = engine_of(build_app(opts, copts, {"CPU": 64.0, "GPU": 8.0}))
    assert gpu.ray_actor_options["num_gpus"] == 1.0
    assert gpu._deployment_config.autoscaling_config.max_replicas == 8
    fixed = engine_of(build_app(opts, ClusterOptions(replicas="3"), {"CPU": 8.0}))
    assert fixed.num_replicas == 3 and fixed._deployment_config.autoscaling_config is None
