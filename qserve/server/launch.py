"""`qserve serve` start-up: size the KV cache, build the engine, print the plan, run uvicorn until SIGTERM.

SIGTERM or SIGINT (to the server alone or to its whole process group: the engine process ignores both,
the server owns shutdown) starts a drain: the listener stays open, ``/health`` and new requests get 503,
requests in flight finish for up to ``shutdown_timeout`` seconds and the rest are aborted; once none is
left, uvicorn shuts down and the server exits 0. A second signal shuts down at once.

If the engine process dies (killed, out of memory), requests in flight fail with a 500, ``/health``
answers 503, and the server exits 1 within ENGINE_EXIT_DELAY seconds so that a supervisor restarts it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from qserve.errors import QServeError
from qserve.utils import parse_size

if TYPE_CHECKING:
    from qserve.config import EngineConfig
    from qserve.server.engine_thread import EngineClient

logger = logging.getLogger("qserve.server")
ENGINE_EXIT_DELAY = 1.0  # seconds between the engine process's death and the server's exit (answers flush)
DRAIN_SLACK = 5.0  # seconds past the grace period after which the drain stops waiting for connections


@dataclass(frozen=True)
class ServeOptions:
    model: str = "demo"
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    kv_cache_memory: str | None = None  # SIZE
    memory_budget: str | None = None  # FRACTION of the device's memory, or a SIZE (weights + KV)
    max_num_seqs: str = "auto"
    max_model_len: int | None = None
    max_queue: int = 256
    api_key: str | None = None
    served_model_name: str | None = None
    shutdown_timeout: int = 30  # seconds
    threads: int | None = None  # torch threads of the engine process; None: every core but one on CPU
    enforce_eager: bool = False  # no torch.compile (the default also follows QSERVE_ENFORCE_EAGER=1)
    async_scheduling: bool = False  # overlap step N's output work with step N+1 (QSERVE_ASYNC_SCHEDULING=1)
    access_log: bool = True
    log_format: str = "text"  # text | json
    stats_interval: float = 10.0  # seconds between stats lines while busy; 0: none
    tool_call_parser: str | None = None  # parses tool calls for tool_choice "auto" (vLLM's parser names)


def device_memory(device: str) -> int:
    """Total memory of the device the engine will run on (RAM on CPU)."""
    from qserve.engine.llm_engine import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(dev)[1])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def kv_budget(opts: ServeOptions) -> tuple[int | None, int | None]:
    """(KV pool bytes, max_num_seqs) from --kv-cache-memory, or from --memory-budget through the planner
    (weights, activation peak, step buffers, CUDA graph pool and KV: the same numbers `qserve plan` prints),
    or (None, None): engine default. max_num_seqs comes back only when the planner chose it (--memory-budget
    with --max-num-seqs auto)."""
    if opts.kv_cache_memory and opts.memory_budget:
        raise QServeError("give --kv-cache-memory or --memory-budget, not both")
    if opts.kv_cache_memory:
        return parse_size(opts.kv_cache_memory), None
    if not opts.memory_budget:
        return None, None
    from qserve.planner import plan_engine

    fraction = budget_fraction(opts.memory_budget)
    if fraction is not None:
        total = int(device_memory(opts.device) * fraction)
    else:
        total = parse_size(opts.memory_budget)
    from qserve.engine.llm_engine import resolve_device

    auto = opts.max_num_seqs == "auto"
    p = plan_engine(
        opts.model,
        total,
        dtype=opts.dtype,
        kv_cache_dtype=opts.kv_cache_dtype,
        max_model_len=opts.max_model_len,
        max_num_seqs=None if auto else int(opts.max_num_seqs),
        device=resolve_device(opts.device).type,  # CUDA: the graph pool is counted, unless eager
        enforce_eager=opts.enforce_eager or os.environ.get("QSERVE_ENFORCE_EAGER") == "1",
    )
    return p.kv_cache_bytes, p.max_num_seqs if auto else None


def budget_fraction(text: str) -> float | None:
    """--memory-budget: a bare number is a FRACTION of device memory, in (0, 1]; None: a SIZE (with unit)."""
    try:
        fraction = float(text)
    except ValueError:
        return None
    if not 0 < fraction <= 1:
        raise QServeError(
            f"--memory-budget as a fraction of device memory must be more than 0 and at most 1, got {text} "
            "(or give a size with a unit, such as 8GiB)"
        )
    return fraction


def check_port(host: str, port: int) -> None:
    """Fail fast, before loading a model, when the address is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise QServeError(f"cannot resolve --host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise QServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def engine_config(opts: ServeOptions) -> EngineConfig:
    """Validate the engine flags and size the KV cache (through the planner on --memory-budget): the config
    `serve` builds its engine with. Nothing slow is imported; each cluster replica calls it on its own device."""
    from qserve.config import EngineConfig, check_max_model_len, resolve_model_path
    from qserve.server.logs import check_log_format

    if opts.max_queue < 1:
        raise QServeError(f"--max-queue must be at least 1, got {opts.max_queue}")
    if opts.threads is not None and opts.threads < 1:
        raise QServeError(f"--threads must be at least 1, got {opts.threads}")
    if opts.shutdown_timeout < 0:
        raise QServeError(f"--shutdown-timeout must be 0 or more, got {opts.shutdown_timeout}")
    if not opts.stats_interval >= 0:
        raise QServeError(f"--stats-interval must be 0 (off) or more, got {opts.stats_interval}")
    check_log_format(opts.log_format)
    if opts.kv_cache_memory:
        parse_size(opts.kv_cache_memory)
    if opts.memory_budget:
        budget_fraction(opts.memory_budget)
    extra: dict[str, Any] = {}
    if opts.max_num_seqs != "auto":
        if not opts.max_num_seqs.isdigit() or int(opts.max_num_seqs) < 1:
            raise QServeError(
                f"--max-num-seqs must be 'auto' or a positive integer, got {opts.max_num_seqs!r}"
            )
        extra["max_num_seqs"] = int(opts.max_num_seqs)
    if opts.max_model_len is not None and opts.max_model_len < 1:
        raise QServeError(f"--max-model-len must be positive, got {opts.max_model_len}")
    resolve_model_path(opts.model)
    # the choices (device, dtype, KV dtype) and max_model_len first: they are cheap, the planner is not
    check_max_model_len(
        EngineConfig(
            model=opts.model,
            device=opts.device,
            dtype=opts.dtype,
            kv_cache_dtype=opts.kv_cache_dtype,
            max_model_len=opts.max_model_len,
        )
    )
    kv_memory, planned_seqs = kv_budget(opts)
    if planned_seqs is not None:
        extra["max_num_seqs"] = planned_seqs
    if opts.enforce_eager:
        extra["enforce_eager"] = True
    if opts.async_scheduling:
        extra["async_scheduling"] = True
    return EngineConfig(
        model=opts.model,
        device=opts.device,
        dtype=opts.dtype,
        kv_cache_dtype=opts.kv_cache_dtype,
        kv_cache_memory=kv_memory,
        max_model_len=opts.max_model_len,
        **extra,
    )


def run_server(opts: ServeOptions) -> None:
    """Validate the flags (before anything slow is imported), build the engine, print the plan, serve."""
    if not 1 <= opts.port <= 65535:
        raise QServeError(f"--port must be in 1..65535, got {opts.port}")
    config = engine_config(opts)
    check_port(opts.host, opts.port)

    from qserve.server.app import create_app
    from qserve.server.engine_process import EngineProcess, default_threads
    from qserve.server.logs import setup_logging

    setup_logging(opts.log_format)
    threads, prefill_threads = default_threads(opts.device)
    if opts.threads is not None:  # a fixed count for every step
        threads = prefill_threads = opts.threads
    engine = EngineProcess(config, opts.max_queue, threads, prefill_threads, log_format=opts.log_format)
    info = engine.start()
    name = opts.served_model_name or opts.model
    lines = ["qserve serve: sized itself with this plan", *("  " + line for line in info.plan)]
    lines.append(f"  serving '{name}' on http://{opts.host}:{opts.port}/v1")
    if opts.log_format == "json":  # one JSON object per line on stderr, like every other record
        for line in lines:
            logger.info(line.strip())
    else:
        print("\n".join(lines), flush=True)
    app = create_app(
        engine,
        served_model_name=name,
        api_key=opts.api_key,
        max_queue=opts.max_queue,
        access_log=opts.access_log,
        stats_interval=opts.stats_interval,
        tool_call_parser=opts.tool_call_parser,
    )
    uv_config = uvicorn.Config(
        app,
        host=opts.host,
        port=opts.port,
        log_level="info",
        log_config=None,  # uvicorn's loggers propagate to the root handler setup_logging made
        access_log=False,  # ours (qserve.access) has the tokens and latency
        # the drain (GracefulServer) has already waited for requests in flight; this only bounds the wait
        # for idle keep-alive connections to close
        timeout_graceful_shutdown=5,
    )
    server = GracefulServer(
        uv_config, engine, grace=float(opts.shutdown_timeout), inflight=lambda: app.state.tracker.inflight
    )
    server.run()
    if server.engine_exit is not None:
        logger.error(
            "the engine process died (exit code %s): exiting 1 so that a supervisor restarts the server",
            server.engine_exit,
        )
        raise SystemExit(1)


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that drains on the first SIGTERM/SIGINT, keeping its listener open, and exits 0.

    The first signal makes the engine stop admitting (503 for new requests and for /health) and abort what
    still runs after ``grace`` seconds; uvicorn's own shutdown (which closes the listener) starts only
    once no request admitted before the signal is left, or DRAIN_SLACK seconds past the grace period. A
    second signal starts that shutdown at once. The captured signal is not re-raised (uvicorn would,
    making the exit status -15 instead of 0). ``engine_exit`` is the engine's exit code if it died."""

    def __init__(
        self, config: uvicorn.Config, engine: EngineClient, grace: float, inflight: Callable[[], int]
    ):
        super().__init__(config)
        self.engine = engine
        self.grace = grace
        self.inflight = inflight
        self.drain_deadline: float | None = None
        self.engine_exit: int | str | None = None
        self._dead_since: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_deadline is None and not self.should_exit:
            name = signal.Signals(sig).name
            logger.info(
                "%s: draining (new requests get 503; %d in flight get up to %gs)",
                name,
                self.inflight(),
                self.grace,
            )
            self.drain_deadline = time.monotonic() + self.grace + DRAIN_SLACK
            self.engine.begin_drain(grace=self.grace)
        else:
            super().handle_exit(sig, frame)
        self._captured_signals.clear()

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        now = time.monotonic()
        if not self.engine.is_alive():
            if self._dead_since is None:
                self._dead_since = now
                logger.error("the engine process is gone; failing requests in flight and exiting")
            if now - self._dead_since >= ENGINE_EXIT_DELAY:
                self.engine_exit = getattr(self.engine, "exitcode", None) or "unknown"
                return True
            return False
        if self.drain_deadline is not None:
            if self.inflight() == 0:
                logger.info("drained: no request in flight")
                return True
            if now >= self.drain_deadline:
                logger.warning("drain deadline passed with %d requests still open", self.inflight())
                return True
        return False
