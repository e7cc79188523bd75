"""`qserve serve` start-up: size the KV cache, build the engine, print the plan, run uvicorn until SIGTERM.

SIGTERM (or Ctrl-C): the server stops admitting (503, and uvicorn closes its listening socket), lets
requests in flight finish for up to ``shutdown_timeout`` seconds, aborts the rest, and exits 0.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

import uvicorn

from qserve.errors import QServeError
from qserve.utils import parse_size

if TYPE_CHECKING:
    from qserve.config import EngineConfig

logger = logging.getLogger("qserve.server")


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
    (weights, activation peak and KV: the same numbers `qserve plan` prints), or (None, None): engine default.
    max_num_seqs comes back only when the planner chose it (--memory-budget with --max-num-seqs auto)."""
    if opts.kv_cache_memory and opts.memory_budget:
        raise QServeError("give --kv-cache-memory or --memory-budget, not both")
    if opts.kv_cache_memory:
        return parse_size(opts.kv_cache_memory), None
    if not opts.memory_budget:
        return None, None
    from qserve.planner import plan_engine

    try:
        fraction = float(opts.memory_budget)
    except ValueError:
        fraction = None
    if fraction is not None and fraction <= 1.0:
        if fraction <= 0:
            raise QServeError(f"--memory-budget fraction must be in (0, 1], got {opts.memory_budget}")
        total = int(device_memory(opts.device) * fraction)
    else:
        total = parse_size(opts.memory_budget)
    auto = opts.max_num_seqs == "auto"
    p = plan_engine(
        opts.model,
        total,
        dtype=opts.dtype,
        kv_cache_dtype=opts.kv_cache_dtype,
        max_model_len=opts.max_model_len,
        max_num_seqs=None if auto else int(opts.max_num_seqs),
    )
    return p.kv_cache_bytes, p.max_num_seqs if auto else None


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
    from qserve.config import EngineConfig, resolve_model_path

    if opts.max_queue < 1:
        raise QServeError(f"--max-queue must be at least 1, got {opts.max_queue}")
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
    kv_memory, planned_seqs = kv_budget(opts)
    if planned_seqs is not None:
        extra["max_num_seqs"] = planned_seqs
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

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if opts.threads is not None and opts.threads < 1:
        raise QServeError(f"--threads must be at least 1, got {opts.threads}")
    threads, prefill_threads = default_threads(opts.device)
    if opts.threads is not None:  # a fixed count for every step
        threads = prefill_threads = opts.threads
    engine = EngineProcess(config, opts.max_queue, threads, prefill_threads)
    info = engine.start()
    name = opts.served_model_name or opts.model
    print("qserve serve: sized itself with this plan", flush=True)
    for line in info.plan:
        print("  " + line, flush=True)
    app = create_app(
        engine,
        served_model_name=name,
        api_key=opts.api_key,
        max_queue=opts.max_queue,
        tool_call_parser=opts.tool_call_parser,
    )
    print(f"  serving '{name}' on http://{opts.host}:{opts.port}/v1", flush=True)
    uv_config = uvicorn.Config(
        app,
        host=opts.host,
        port=opts.port,
        log_level="info",
        access_log=False,
        # the engine thread aborts what is left at the deadline; uvicorn's own (later) deadline then only
        # catches connections that do not close by themselves
        timeout_graceful_shutdown=max(opts.shutdown_timeout, 0) + 5,
    )
    thread = app.state.engine_thread
    GracefulServer(uv_config, lambda: thread.begin_drain(grace=max(opts.shutdown_timeout, 0))).run()


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose SIGTERM/SIGINT first stops admission, then shuts down gracefully, and then
    does not re-raise the signal (uvicorn would, making the exit status -15 instead of 0)."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]):
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_signal()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
