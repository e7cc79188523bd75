"""The LLMEngine in its own process (`qserve serve`'s default), behind the same interface as `EngineThread`.

The HTTP process keeps the request groups and the admission count; the engine process
(`qserve.server.engine_core`) owns the engine. Commands go out through a writer thread (the asyncio loop
never blocks on a full pipe); a reader thread turns each step's updates into `Delta`s and hands them to
their asyncio queues with one ``loop.call_soon_threadsafe`` per loop.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qserve.errors import QServeError
from qserve.server.engine_core import Channel, EngineInfo, StepUpdate, Update, run_engine_core
from qserve.server.engine_thread import Delta, EngineRequest, RequestGroup, check_admission, deliver

if TYPE_CHECKING:
    from qserve.config import EngineConfig

logger = logging.getLogger("qserve.server")


def default_threads(device: str) -> tuple[int | None, int | None]:
    """Torch threads of the engine process for (decode-sized steps, big prefill steps). On CPU decode steps get
    every core but one, which the HTTP process needs (two OpenMP threads sharing two cores with the server
    stall each other: 627 vs 816 tok/s on the demo model at concurrency 16), and big prefills, which are
    compute-bound and leave the HTTP side little to do, every core. (None, None) elsewhere: torch's default."""
    if device not in ("auto", "cpu"):
        return None, None
    from qserve.engine.llm_engine import resolve_device

    if resolve_device(device).type != "cpu":
        return None, None
    cores = len(os.sched_getaffinity(0))
    return max(cores - 1, 1), cores


class EngineProcess:
    """Owns the engine process. Thread-safe: submit, abort, begin_drain, stop, num_queued, is_alive and
    the ``snapshot`` attribute (the latest ``engine.metrics()`` the process sent)."""

    def __init__(
        self,
        config: EngineConfig,
        max_queue: int,
        threads: int | None = None,
        prefill_threads: int | None = None,
        log_format: str = "text",
    ):
        self.config = config
        self.log_format = log_format
        self.max_queue = max_queue
        self.threads = threads
        self.prefill_threads = prefill_threads
        self.draining = False
        self._info: EngineInfo | None = None
        self.snapshot: dict[str, Any] = {}
        self.on_queue_times: Callable[[list[float]], None] | None = None  # called on the reader thread
        self._lock = threading.Lock()
        self._pending_adds = 0  # sent to the engine, not yet in its scheduler
        self._waiting = 0  # the scheduler's waiting queue, as last reported
        self._groups: dict[str, RequestGroup] = {}  # request id -> its group, until it finishes
        self._texts: dict[str, str] = {}  # request id -> output text so far
        self._outbox: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        self._proc: Any = None
        self._conn: Channel | None = None
        self._stopped = threading.Event()

    # ------------------------------------------------------------------ any thread
    def start(self, timeout: float = 900.0) -> EngineInfo:
        """Spawn the engine process and wait until its engine is built (QServeError: it could not be)."""
        if self._info is not None:
            return self._info
        ctx = mp.get_context("spawn")  # never fork a process that may hold OpenMP / tokenizer threads
        down_rx, down_tx = ctx.Pipe(duplex=False)  # parent -> child
        up_rx, up_tx = ctx.Pipe(duplex=False)  # child -> parent
        conn, child = Channel(up_rx, down_tx), Channel(down_rx, up_tx)
        args = (child, self.config, self.threads, self.max_queue, self.prefill_threads, self.log_format)
        self._proc = ctx.Process(target=run_engine_core, args=args, name="qserve-engine", daemon=True)
        self._proc.start()
        child.close()
        deadline = time.monotonic() + timeout
        while not conn.poll(0.5):
            if not self._proc.is_alive() or time.monotonic() > deadline:
                self._proc.kill()
                raise QServeError(f"the engine process did not start (exit code {self._proc.exitcode})")
        msg = conn.recv()
        if msg[0] == "error":
            self._proc.join(10)
            raise QServeError(msg[1])
        _, self._info, self.snapshot = msg
        self._conn = conn
        threading.Thread(target=self._read, name="qserve-engine-reader", daemon=True).start()
        threading.Thread(target=self._write, name="qserve-engine-writer", daemon=True).start()
        return self._info

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise RuntimeError("EngineProcess.start() has not run")
        return self._info

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive() and not self._stopped.is_set()

    @property
    def exitcode(self) -> int | None:
        """The engine process's exit code once it has ended (negative: killed by that signal)."""
        return None if self._proc is None else self._proc.exitcode

    def num_queued(self) -> int:
        with self._lock:
            return self._pending_adds + self._waiting

    def submit(self, requests: list[EngineRequest]) -> RequestGroup:
        """Admit all of ``requests`` or none (QueueFullError, DrainingError). Call from the asyncio loop."""
        group = RequestGroup(self, requests)
        with self._lock:
            queued = self._pending_adds + self._waiting
            check_admission(queued, len(requests), self.max_queue, self.draining or self._stopped.is_set())
            self._pending_adds += len(requests)
            for r in requests:
                self._groups[r.request_id] = group
                self._texts[r.request_id] = ""
        self._outbox.put(("add", requests))
        return group

    def abort(self, request_ids: list[str]) -> None:
        self._outbox.put(("abort", request_ids))

    def begin_drain(self, grace: float | None = None) -> None:
        """Stop admitting (SIGTERM). Requests in flight run on; after ``grace`` seconds (None: no limit)
        the rest are aborted, each ending cleanly with finish_reason "abort"."""
        with self._lock:
            first = not self.draining
            self.draining = True
        if first:
            self._outbox.put(("drain", grace))

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything still running, then end the engine process."""
        if self._proc is None:
            return
        self._outbox.put(("stop", None))
        self._stopped.wait(timeout)
        self._outbox.put(None)
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout)

    # ------------------------------------------------------------------ the writer and reader threads
    def _write(self) -> None:
        assert self._conn is not None
        while (cmd := self._outbox.get()) is not None:
            try:
                self._conn.send(cmd)
            except (OSError, ValueError):  # the engine process is gone; the reader fails what ran
                return

    def _read(self) -> None:
        assert self._conn is not None
        try:
            while True:
                kind, msg = self._conn.recv()
                self._handle(msg)
                if kind == "stopped":
                    break
        except (EOFError, OSError):
            logger.error("the engine process exited (exit code %s)", self._proc.exitcode)
        finally:
            self._stopped.set()
            self._fail_all("engine error: the engine process exited")
            self._outbox.put(None)

    def _handle(self, msg: StepUpdate) -> None:
        batch: list[tuple[RequestGroup, Delta]] = []
        with self._lock:
            self._pending_adds -= msg.applied_adds
            self._waiting = msg.waiting
            for u in msg.updates:
                group = self._groups.get(u.request_id)
                if group is not None:
                    batch.append((group, self._delta(group, u)))
        if msg.metrics is not None:
            self.snapshot = msg.metrics
        if msg.queue_times and self.on_queue_times is not None:
            self.on_queue_times(msg.queue_times)
        deliver(batch)

    def _delta(self, group: RequestGroup, u: Update) -> Delta:
        # under self._lock
        rid = u.request_id
        text = u.text if u.finished else self._texts[rid] + u.text
        if u.finished:
            del self._groups[rid], self._texts[rid]
        else:
            self._texts[rid] = text
        return Delta(
            group.index[rid],
            text,
            u.token_ids,
            u.logprobs,
            u.num_output_tokens,
            u.finished,
            u.finish_reason,
            u.prompt_logprobs,
            u.error,
        )

    def _fail_all(self, error: str) -> None:
        with self._lock:
            batch = [
                (g, Delta(g.index[rid], self._texts.get(rid, ""), [], None, 0, True, "abort", error=error))
                for rid, g in self._groups.items()
            ]
            self._groups.clear()
            self._texts.clear()
        with contextlib.suppress(Exception):
            deliver(batch)
