"""The LLMEngine in a thread of the server process (the in-process alternative to `EngineProcess`).

The HTTP side talks to it only through a lock-guarded inbox of ``add``/``abort`` commands; the thread
drains the inbox, runs ``engine.step()``, and hands each request's progress to its asyncio queue with one
``loop.call_soon_threadsafe`` per step. Prompts arrive already tokenized: the engine thread never
tokenizes. Idle, it sleeps on a ``threading.Event`` rather than spinning.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from qserve.errors import QServeError
from qserve.server.engine_core import SNAPSHOT_INTERVAL, EngineInfo, take_queue_times
from qserve.types import RequestOutput, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from qserve.engine.llm_engine import LLMEngine

logger = logging.getLogger("qserve.server")


class QueueFullError(Exception):
    """The bounded waiting queue has no room for this request (answered 429)."""


class DrainingError(Exception):
    """The server is shutting down and admits nothing new (answered 503)."""


def check_admission(queued: int, adding: int, max_queue: int, closed: bool) -> None:
    """Admit ``adding`` requests next to ``queued`` waiting ones, or raise: DrainingError when ``closed``,
    QueueFullError when they would overflow ``max_queue`` (an empty queue always takes a group, whatever
    its size, so a request of many choices is never refused forever)."""
    if closed:
        raise DrainingError("the server is shutting down")
    if queued and queued + adding > max_queue:
        raise QueueFullError(f"{queued} requests are waiting (--max-queue {max_queue})")


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass
class Delta:
    """One request's progress after a step, as the asyncio side sees it (no live engine objects).

    ``text`` is the whole output text so far (stop strings already cut when finished); ``token_ids``
    and ``logprobs`` are only this step's new tokens. ``prompt_logprobs`` comes with the first delta.
    """

    index: int  # the choice index inside its RequestGroup
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    num_output_tokens: int
    finished: bool
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None


class Aborter(Protocol):
    def abort(self, request_ids: list[str]) -> None: ...


class EngineClient(Protocol):
    """What the HTTP side uses of an engine it runs beside: `EngineThread` or `EngineProcess`."""

    snapshot: dict[str, Any]
    draining: bool
    on_queue_times: Callable[[list[float]], None] | None  # each request's queue time, once, from any thread

    @property
    def info(self) -> EngineInfo: ...
    def start(self) -> EngineInfo: ...
    def is_alive(self) -> bool: ...
    def num_queued(self) -> int: ...
    def submit(self, requests: list[EngineRequest]) -> RequestGroup: ...
    def abort(self, request_ids: list[str]) -> None: ...
    def begin_drain(self, grace: float | None = None) -> None: ...
    def stop(self, timeout: float = 10.0) -> None: ...


class RequestGroup:
    """The engine requests behind one HTTP request (n choices x prompts), sharing one asyncio queue."""

    def __init__(self, owner: Aborter, requests: list[EngineRequest]):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.requests = requests
        self.index = {r.request_id: i for i, r in enumerate(requests)}
        self.started: set[str] = set()  # engine thread only: requests that sent their first delta
        self.unfinished = len(requests)
        self._owner = owner

    @property
    def done(self) -> bool:
        return self.unfinished == 0

    async def next(self) -> Delta:
        """The next delta of any of the group's requests (call only while not ``done``)."""
        d = await self.queue.get()
        if d.finished and self.unfinished > 0:
            self.unfinished -= 1
        return d

    def abort(self) -> None:
        """Abort whatever is still running (idempotent); the engine frees its KV blocks on its next turn."""
        if self.unfinished:
            self.unfinished = 0
            self._owner.abort([r.request_id for r in self.requests])

    def interrupt(self) -> None:
        """Abort, and wake a pending ``next()`` with a delta whose ``index`` is -1 (client gone)."""
        self.abort()
        self.queue.put_nowait(Delta(-1, "", [], None, 0, True, "abort"))


class EngineThread:
    """Owns the engine: every engine call happens on this thread. Thread-safe methods: submit, abort,
    begin_drain, stop, num_queued and the ``snapshot`` attribute (the latest ``engine.metrics()``)."""

    def __init__(self, engine: LLMEngine, max_queue: int):
        self.engine = engine
        self.info = EngineInfo(
            engine.config.model, engine.max_model_len, engine.model_config.vocab_size, plan=[]
        )
        self.max_queue = max_queue
        self.draining = False
        self.snapshot: dict[str, Any] = engine.metrics()
        self.on_queue_times: Callable[[list[float]], None] | None = None  # called on the engine thread
        self._unscheduled: dict[str, float] = {}  # engine thread only: request id -> arrival, until scheduled
        self._lock = threading.Lock()
        self._inbox: list[tuple[str, Any]] = []
        self._pending_adds = 0  # requests in the inbox, not yet in the scheduler
        self._waiting = 0  # the scheduler's waiting queue after the last drain or step
        self._wake = threading.Event()
        self._stopping = False
        self._abort_at: float | None = None  # drain deadline (monotonic)
        self._groups: dict[str, RequestGroup] = {}  # engine thread only
        self._thread = threading.Thread(target=self._run, name="qserve-engine", daemon=True)

    # ------------------------------------------------------------------ any thread
    def start(self) -> EngineInfo:
        if not self._thread.is_alive():
            self._thread.start()
        return self.info

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def num_queued(self) -> int:
        with self._lock:
            return self._pending_adds + self._waiting

    def submit(self, requests: list[EngineRequest]) -> RequestGroup:
        """Admit all of ``requests`` or none (QueueFullError, DrainingError). Call from the asyncio loop."""
        group = RequestGroup(self, requests)
        with self._lock:
            queued = self._pending_adds + self._waiting
            check_admission(queued, len(requests), self.max_queue, self.draining or self._stopping)
            self._pending_adds += len(requests)
            self._inbox.append(("add", group))
        self._wake.set()
        return group

    def abort(self, request_ids: list[str]) -> None:
        with self._lock:
            self._inbox.append(("abort", request_ids))
        self._wake.set()

    def begin_drain(self, grace: float | None = None) -> None:
        """Stop admitting (SIGTERM). Requests in flight run on; after ``grace`` seconds (None: no limit)
        the rest are aborted, each ending cleanly with finish_reason "abort"."""
        with self._lock:
            if not self.draining and grace is not None:
                self._abort_at = time.monotonic() + grace
            self.draining = True
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Abort everything still running, then end the thread."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while True:
            try:
                return self._loop()
            except Exception as e:  # a bug outside the step: fail what runs, keep the thread alive
                logger.exception("engine thread error")
                with contextlib.suppress(Exception):
                    self._abort_all("abort", error=f"engine error: {type(e).__name__}: {e}")

    def _loop(self) -> None:
        engine = self.engine
        last_snapshot = 0.0
        while True:
            self._wake.clear()
            with self._lock:
                cmds, self._inbox = self._inbox, []
                stopping = self._stopping
            self._apply(cmds)
            if stopping or (self._abort_at is not None and time.monotonic() >= self._abort_at):
                self._abort_all("abort")
            if stopping:
                self.snapshot = engine.metrics()
                return
            if not engine.has_unfinished_requests():
                self.snapshot = engine.metrics()
                self._wake.wait()
                continue
            t0 = time.monotonic()
            try:
                outputs = engine.step()
            except Exception as e:  # a bug or a device error: fail these requests, keep serving
                logger.exception("engine step failed")
                self._abort_all("abort", error=f"engine error: {type(e).__name__}: {e}")
                continue
            if self._unscheduled:
                times = take_queue_times(engine, self._unscheduled, outputs, t0)
                if times and self.on_queue_times is not None:
                    self.on_queue_times(times)
            with self._lock:
                self._waiting = len(engine.scheduler.waiting)
            self._dispatch(outputs)
            now = time.monotonic()
            if now - last_snapshot > SNAPSHOT_INTERVAL:
                self.snapshot = engine.metrics()
                last_snapshot = now

    def _apply(self, cmds: list[tuple[str, Any]]) -> None:
        engine = self.engine
        added = 0
        failed: list[tuple[RequestGroup, Delta]] = []
        for kind, payload in cmds:
            if kind == "add":
                group: RequestGroup = payload
                for i, r in enumerate(group.requests):
                    added += 1
                    try:
                        engine.add_request(r.request_id, None, r.params, prompt_token_ids=r.prompt_token_ids)
                    except Exception as e:  # QServeError: a bad request (400); anything else: ours (500)
                        msg = (
                            str(e) if isinstance(e, QServeError) else f"engine error: {type(e).__name__}: {e}"
                        )
                        failed.append((group, Delta(i, "", [], None, 0, True, "abort", error=msg)))
                        continue
                    self._groups[r.request_id] = group
                    self._unscheduled[r.request_id] = engine.seqs[r.request_id].arrival_time
            else:
                for rid in payload:
                    self._unscheduled.pop(rid, None)
                    if self._groups.pop(rid, None) is not None:
                        engine.abort_request(rid)
        if cmds:
            with self._lock:
                self._pending_adds -= added
                self._waiting = len(engine.scheduler.waiting)
        deliver(failed)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        batch: list[tuple[RequestGroup, Delta]] = []
        for out in outputs:
            group = self._groups.get(out.request_id)
            if group is None:
                continue
            new = out.delta_token_ids
            d = Delta(
                index=group.index[out.request_id],
                text=out.text,
                token_ids=list(new),
                logprobs=out.logprobs[len(out.logprobs) - len(new) :] if out.logprobs is not None else None,
                num_output_tokens=len(out.token_ids),
                finished=out.finished,
                finish_reason=out.finish_reason,
            )
            if out.request_id not in group.started:
                group.started.add(out.request_id)
                if out.prompt_logprobs is not None:
                    d.prompt_logprobs = list(out.prompt_logprobs)
            if out.finished:
                del self._groups[out.request_id]
            batch.append((group, d))
        deliver(batch)

    def _abort_all(self, reason: str, error: str | None = None) -> None:
        batch = []
        for rid, group in list(self._groups.items()):
            seq = self.engine.seqs.get(rid)
            text, num = (seq.output_text, seq.num_output_tokens) if seq is not None else ("", 0)
            self.engine.abort_request(rid)
            batch.append((group, Delta(group.index[rid], text, [], None, num, True, reason, error=error)))
        self._groups.clear()
        self._unscheduled.clear()
        with self._lock:
            self._waiting = len(self.engine.scheduler.waiting)
        deliver(batch)


def deliver(batch: list[tuple[RequestGroup, Delta]]) -> None:
    """Hand deltas to their groups' queues from another thread: one call_soon_threadsafe per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestGroup, Delta]]] = defaultdict(list)
    for group, d in batch:
        by_loop[group.loop].append((group, d))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[RequestGroup, Delta]]) -> None:
    for group, d in items:
        group.queue.put_nowait(d)
