"""`qserve serve MODEL --replicas N|auto`: engine replicas as a Ray Serve application behind one address.

`run_cluster` validates everything it can before Ray is imported (an error is one line and exit 2, as for
a single server), connects to ``--ray-address`` or starts a local Ray, deploys `build_app`, prints the
first replica's plan, and on SIGTERM / Ctrl-C deletes the application (each replica finishes its requests
for up to ``--shutdown-timeout`` seconds first). `start` and `stop` are the same steps for tests and
scripts that hold their own Ray cluster.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from qserve.cluster.autoscaling import ScalingConfig
from qserve.cluster.routing import MODES
from qserve.errors import QServeError
from qserve.server.launch import ServeOptions, check_port, engine_config

ENGINE, INGRESS = "QServeEngine", "QServeIngress"  # the deployments' names
INGRESS_MAX_ONGOING = 4096  # requests one ingress replica holds at once (it only forwards)


@dataclass(frozen=True)
class ClusterOptions:
    """How `qserve serve --replicas` runs: replica count or bounds, resources, and the Serve knobs."""

    replicas: str = "1"  # N (fixed) or "auto" (autoscaled between min_replicas and max_replicas)
    min_replicas: int | None = None  # auto: default 1
    max_replicas: int | None = None  # auto: default what the cluster's CPUs (GPUs) hold
    ray_address: str | None = None  # None: start a local Ray; "auto": the one running here; or host:port
    replica_cpus: float = 1.0
    replica_gpus: float | None = None  # None: 1 when --device is cuda, or auto on a cluster with GPUs
    routing: str = "affinity"  # or "random" (the baseline affinity is measured against)
    app_name: str = "qserve"
    namespace: str = "qserve"
    look_back_s: float = 10.0  # Serve averages replica signals over this window
    metrics_interval_s: float = 1.0  # replicas push their signals to the Serve controller this often
    routing_stats_period_s: float = 1.0  # the router's headroom refresh
    stats_interval_s: float = 1.0  # replicas' /metrics reports to the ClusterStats actor
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

    @property
    def stats_actor(self) -> str:
        return f"qserve-stats-{self.app_name}"


def replica_bounds(copts: ClusterOptions) -> tuple[int | None, int, int | None]:
    """(fixed replicas or None for auto, min, max or None for "what the cluster holds"); QServeError on bad
    flags."""
    if copts.routing not in MODES:
        raise QServeError(f"routing must be one of {', '.join(MODES)}, got {copts.routing!r}")
    if copts.replica_cpus < 0 or (copts.replica_gpus or 0) < 0:
        raise QServeError("--replica-cpus and --replica-gpus must not be negative")
    lo, hi = copts.min_replicas, copts.max_replicas
    if copts.replicas != "auto":
        if not copts.replicas.isdigit() or int(copts.replicas) < 1:
            raise QServeError(f"--replicas must be a positive integer or 'auto', got {copts.replicas!r}")
        if lo is not None or hi is not None:
            raise QServeError("--min-replicas and --max-replicas need --replicas auto")
        n = int(copts.replicas)
        return n, n, n
    if (lo is not None and lo < 1) or (hi is not None and hi < 1):
        raise QServeError("--min-replicas and --max-replicas must be at least 1")
    if lo is not None and hi is not None and hi < lo:
        raise QServeError(f"--max-replicas {hi} is below --min-replicas {lo}")
    return None, lo or 1, hi


def _gpus_per_replica(opts: ServeOptions, copts: ClusterOptions, cluster_gpus: float) -> float:
    if copts.replica_gpus is not None:
        return copts.replica_gpus
    if opts.device == "cuda" or (opts.device == "auto" and cluster_gpus > 0):
        return 1.0
    return 0.0


def max_replicas(opts: ServeOptions, copts: ClusterOptions, cluster: dict[str, float]) -> int:
    """--max-replicas, or for auto without it as many replicas as the cluster's CPUs (GPUs) hold."""
    _, lo, hi = replica_bounds(copts)
    if hi is not None:
        return hi
    gpus = _gpus_per_replica(opts, copts, cluster.get("GPU", 0.0))
    cpu_fit = cluster.get("CPU", 1.0) / copts.replica_cpus if copts.replica_cpus else math.inf
    gpu_fit = cluster.get("GPU", 0.0) / gpus if gpus else math.inf
    return max(lo, int(min(cpu_fit, gpu_fit, 64)))


def build_app(opts: ServeOptions, copts: ClusterOptions, cluster: dict[str, float] | None = None) -> Any:
    """The Serve application: `EngineReplica` (fixed or autoscaled, session-affinity router) behind
    `Ingress`. ``cluster``: Ray's cluster resources (for the default max replicas and GPUs)."""
    from ray import serve
    from ray.serve.config import AutoscalingConfig, AutoscalingPolicy, RequestRouterConfig

    from qserve.cluster.autoscaling import QServeAutoscalingPolicy
    from qserve.cluster.deployment import EngineReplica
    from qserve.cluster.router import SessionAffinityRouter

    cluster = cluster or {}
    fixed, lo, _ = replica_bounds(copts)
    gpus = _gpus_per_replica(opts, copts, cluster.get("GPU", 0.0))
    hi = max_replicas(opts, copts, cluster)
    seqs = engine_config(opts).max_num_seqs  # as planned here (a replica re-plans on its own device)
    router_kwargs: dict[str, Any] = {
        "request_router_class": SessionAffinityRouter,
        "request_routing_stats_period_s": copts.routing_stats_period_s,
        "max_backoff_s": 0.2,  # a request queued at the ingress retries the replicas at least this often
    }
    router = RequestRouterConfig(**router_kwargs)
    engine_opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": copts.replica_cpus, "num_gpus": gpus},
        # a replica takes what it can run (plus a few to start as soon as others finish); the backlog
        # waits at the ingress, where any replica (a new one too) takes it, and past --max-queue gets 429
        "max_ongoing_requests": seqs + max(1, seqs // 4),
        "max_queued_requests": opts.max_queue,
        "request_router_config": router,
        "graceful_shutdown_timeout_s": max(opts.shutdown_timeout, 0),
        "graceful_shutdown_wait_loop_s": 1.0,
    }
    if fixed is not None:
        engine_opts["num_replicas"] = fixed
    else:
        policy = AutoscalingPolicy(
            policy_function=QServeAutoscalingPolicy,
            policy_kwargs={"stats_actor": copts.stats_actor, "namespace": copts.namespace}
            | asdict(copts.scaling),
        )
        with warnings.catch_warnings():  # metrics_interval_s is deprecated, but still the push interval
            warnings.simplefilter("ignore", DeprecationWarning)
            engine_opts["autoscaling_config"] = AutoscalingConfig(
                min_replicas=lo,
                max_replicas=hi,
                initial_replicas=lo,
                look_back_period_s=copts.look_back_s,
                metrics_interval_s=copts.metrics_interval_s,
                upscale_delay_s=0.0,  # the policy keeps its own cool-downs
                downscale_delay_s=0.0,
                policy=policy,
            )
    threads = opts.threads or max(1, round(copts.replica_cpus))
    engine = serve.deployment(name=ENGINE, **engine_opts)(EngineReplica).bind(
        asdict(opts), copts.stats_actor, copts.namespace, threads, copts.stats_interval_s
    )
    return _front(engine, opts, copts)


def _front(engine: Any, opts: ServeOptions, copts: ClusterOptions) -> Any:
    """The Ingress deployment over ``engine`` (a bound deployment or a handle)."""
    from ray import serve

    from qserve.cluster.deployment import Ingress

    ingress = serve.deployment(
        name=INGRESS,
        num_replicas=1,
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        ray_actor_options={"num_cpus": 0},
    )(serve.ingress()(Ingress))
    block_size = engine_config(opts).block_size  # session keys hash the first KV block's tokens
    return ingress.bind(engine, opts.model, copts.stats_actor, copts.namespace, block_size, copts.routing)


def add_front(opts: ServeOptions, copts: ClusterOptions, name: str, route_prefix: str) -> None:
    """One more HTTP front, routing with ``copts.routing``, over the engine replicas of the running
    application ``copts.app_name``, as application ``name`` at ``route_prefix``: two routing modes compared
    on the same replicas."""
    from ray import serve

    handle = serve.get_deployment_handle(ENGINE, app_name=copts.app_name)
    serve.run(_front(handle, opts, copts), name=name, route_prefix=route_prefix)


def start(opts: ServeOptions, copts: ClusterOptions) -> tuple[int, int]:
    """Deploy on the Ray cluster this process is connected to (ray.init first) and wait until every
    replica is up. Returns (min, max) replicas."""
    import ray
    from ray import serve

    from qserve.cluster import stats

    _, lo, _ = replica_bounds(copts)
    serve.start(http_options={"host": opts.host, "port": opts.port})
    stats.actor(copts.stats_actor, copts.namespace, desired=lo)
    app = build_app(opts, copts, ray.cluster_resources())
    serve.run(app, name=copts.app_name, route_prefix="/")
    hi = max_replicas(opts, copts, ray.cluster_resources())
    return lo, hi


def stop(copts: ClusterOptions) -> None:
    """Delete the application (replicas finish their requests first) and its stats actor."""
    import ray
    from ray import serve

    serve.delete(copts.app_name)
    with contextlib.suppress(ValueError):
        ray.kill(ray.get_actor(copts.stats_actor, namespace=copts.namespace))


def replica_plan(copts: ClusterOptions) -> list[str]:
    """One engine replica's start-up plan (what `qserve serve` prints)."""
    from ray import serve

    handle = serve.get_deployment_handle(ENGINE, app_name=copts.app_name)
    return list(handle.plan_lines.remote().result())


def run_cluster(opts: ServeOptions, copts: ClusterOptions) -> None:
    """`qserve serve --replicas ...` until SIGTERM or Ctrl-C."""
    if not 1 <= opts.port <= 65535:
        raise QServeError(f"--port must be in 1..65535, got {opts.port}")
    replica_bounds(copts)
    engine_config(opts)  # the flags a replica would reject, rejected here first
    local = copts.ray_address is None
    if local:
        check_port(opts.host, opts.port)
    try:
        import ray
        from ray import serve
    except ImportError:
        raise QServeError("--replicas needs Ray Serve: pip install 'qserve[cluster]'") from None

    try:
        # no --ray-address: a Ray of our own, even if another runs here (we shut ours down at the end)
        ray.init(address=copts.ray_address or "local", namespace=copts.namespace)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise QServeError(f"cannot connect to Ray at {copts.ray_address}: {e}") from None
    done = threading.Event()  # SIGTERM / Ctrl-C: stop cleanly (after ray.init, which installs its own)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    try:
        lo, hi = start(opts, copts)
        name = opts.served_model_name or opts.model
        count = f"{lo} replica(s)" if lo == hi else f"{lo}..{hi} replicas, autoscaled"
        print(f"qserve serve: '{name}' as {count} on Ray Serve ({copts.routing} routing)", flush=True)
        for line in replica_plan(copts):
            print("  " + line, flush=True)
        print(f"  serving '{name}' on http://{opts.host}:{opts.port}/v1", flush=True)
        while not done.wait(1.0):
            pass
        print("qserve serve: stopping (replicas finish their requests first)", flush=True)
    finally:
        # bounded: a Ray whose own processes got the signal too (kill -- -PGID) never answers
        def teardown() -> None:
            stop(copts)
            if local:
                serve.shutdown()

        stopper = threading.Thread(target=teardown, name="qserve-stop", daemon=True)
        stopper.start()
        stopper.join(max(opts.shutdown_timeout, 0) + 30)
        if stopper.is_alive():
            print("qserve serve: Ray did not stop the application in time; exiting", file=sys.stderr)
        ray.shutdown()
