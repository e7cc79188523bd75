"""The engine's own process: the child side of `EngineProcess`.

Why a process and not a thread: the model step is a long chain of small torch ops whose Python glue needs the
GIL between ops; in one process the asyncio side (HTTP parsing, SSE formatting for every stream) takes the
GIL in between, and every op pays for it (measured on the demo model at concurrency 16: TPOT 16 ms served
vs 10 ms offline). Here the engine owns a whole interpreter and talks to the server over one pipe.

Messages, parent -> child: ``("add", [EngineRequest, ...])``, ``("abort", [request_id, ...])``,
``("drain", grace | None)``, ``("stop", None)``. Child -> parent: first ``("ready", EngineInfo, metrics)`` or
``("error", message)``; then ``("step", StepUpdate)`` after every step or batch of commands; last
``("stopped", StepUpdate)``. The child exits when the parent's end of the pipe closes (the parent died).

The messages travel over a `Channel`: two one-way OS pipes and plain pickle (see there for why).
"""

from __future__ import annotations

import logging
import pickle
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from qserve.errors import QServeError
from qserve.types import RequestOutput, TokenLogprob

if TYPE_CHECKING:
    from qserve.config import EngineConfig
    from qserve.engine.llm_engine import LLMEngine

logger = logging.getLogger("qserve.server")
SNAPSHOT_INTERVAL = 0.2  # seconds between metric snapshots while busy (always one on going idle)
_PROTOCOL = pickle.HIGHEST_PROTOCOL


class Channel:
    """One end of the engine link: receives on ``rx``, sends on ``tx``, each a one-way pipe
    (``Pipe(duplex=False)``, an os.pipe), messages pickled with plain `pickle`.

    Why not one duplex ``Pipe()``: that is a socketpair, and a message to a reader asleep in ``recv`` (the
    HTTP side between steps) cost the engine ~110-150 µs per write on the 2-core demo machine against ~37 µs
    for an os.pipe. Why not ``Connection.send``: its ForkingPickler copies the copyreg table per message
    (~115 vs ~74 µs a step message right after a forward, with cold caches). Both are paid once per engine
    step on the engine's critical path, so at concurrency 1 they are per-token costs.
    """

    def __init__(self, rx: Connection, tx: Connection):
        self.rx, self.tx = rx, tx

    def send(self, msg: Any) -> None:
        self.tx.send_bytes(pickle.dumps(msg, protocol=_PROTOCOL))

    def recv(self) -> Any:
        return pickle.loads(self.rx.recv_bytes())

    def poll(self, timeout: float | None = 0.0) -> bool:
        return self.rx.poll(timeout)

    def close(self) -> None:
        self.rx.close()
        self.tx.close()


@dataclass(frozen=True)
class EngineInfo:
    """What the HTTP side needs to know about the engine it cannot see."""

    model: str
    max_model_len: int
    vocab_size: int
    plan: list[str]  # the start-up plan `qserve serve` prints


@dataclass
class Update:
    """One request's progress after a step. ``text`` is this step's new text, or the whole text when
    ``finished`` (stop strings cut); ``token_ids`` and ``logprobs`` are this step's new tokens only."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    num_output_tokens: int
    finished: bool
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    error: str | None = None


@dataclass
class StepUpdate:
    """Everything one message from the engine process carries."""

    updates: list[Update] = field(default_factory=list)
    applied_adds: int = 0  # "add" requests consumed since the last message (accepted or failed)
    waiting: int = 0  # the scheduler's waiting queue now
    metrics: dict[str, Any] | None = None  # a fresh engine.metrics() snapshot, when one is due
    queue_times: list[float] = field(default_factory=list)  # seconds, of requests first scheduled since


def take_queue_times(
    engine: LLMEngine, unscheduled: dict[str, float], outputs: list[RequestOutput], t0: float
) -> list[float]:
    """Queue times of the requests that left the waiting queue in the step that began at ``t0``: seconds
    from the engine's receipt (``arrival``, the Sequence's own clock) to that step. ``unscheduled`` maps
    request id -> arrival for requests not yet scheduled; those scheduled now are removed from it."""
    out = []
    for o in outputs:  # it made output, so it ran (it may be finished and gone from engine.seqs already)
        arrival = unscheduled.pop(o.request_id, None)
        if arrival is not None:
            out.append(max(t0 - arrival, 0.0))
    for rid in [r for r in unscheduled if (s := engine.seqs.get(r)) is None or s.status.name != "WAITING"]:
        out.append(
            max(t0 - unscheduled.pop(rid), 0.0)
        )  # scheduled (a chunk of its prefill ran), no output yet
    return out


def update_from_output(out: RequestOutput, first: bool) -> Update:
    new = out.delta_token_ids
    return Update(
        request_id=out.request_id,
        text=out.text if out.finished else out.delta_text,
        token_ids=list(new),
        logprobs=out.logprobs[len(out.logprobs) - len(new) :] if out.logprobs is not None else None,
        num_output_tokens=len(out.token_ids),
        finished=out.finished,
        finish_reason=out.finish_reason,
        prompt_logprobs=list(out.prompt_logprobs) if first and out.prompt_logprobs is not None else None,
    )


class EngineCore:
    """The loop around an LLMEngine that `run_engine_core` runs in the child process."""

    def __init__(self, engine: LLMEngine, conn: Channel):
        self.engine = engine
        self.conn = conn
        self.live: set[str] = set()  # requests added and not yet finished
        self.started: set[str] = set()  # requests that sent their first update
        self.unscheduled: dict[str, float] = {}  # request id -> arrival, until first scheduled
        self.abort_at: float | None = None  # drain deadline (monotonic)
        self.last_snapshot = 0.0
        # gauges stay fresh during a long step: a snapshot right after scheduling, when one is due
        engine.on_scheduled = self._snapshot_if_due

    def _snapshot_if_due(self) -> None:
        now = time.monotonic()
        if now - self.last_snapshot > SNAPSHOT_INTERVAL:
            self.last_snapshot = now
            msg = StepUpdate(metrics=self.engine.metrics(), waiting=len(self.engine.scheduler.waiting))
            self.conn.send(("step", msg))

    def run(self) -> None:
        while True:
            busy = self.engine.has_unfinished_requests()
            msg = StepUpdate()
            try:
                stop = self._apply(self._receive(block=not busy), msg)
            except (EOFError, OSError):  # the server process is gone: nothing to serve any more
                return
            deadline = self.abort_at is not None and time.monotonic() >= self.abort_at
            if deadline:  # once: a draining server admits nothing new, and an idle poll must block again
                self.abort_at = None
            if stop or deadline:
                self._abort_all(msg, "abort")
            if stop:
                msg.metrics = self.engine.metrics()
                self.conn.send(("stopped", msg))
                return
            if self.engine.has_unfinished_requests():
                self._step(msg)
            now = time.monotonic()
            if not self.engine.has_unfinished_requests() or now - self.last_snapshot > SNAPSHOT_INTERVAL:
                msg.metrics = self.engine.metrics()
                self.last_snapshot = now
            msg.waiting = len(self.engine.scheduler.waiting)
            if msg.updates or msg.applied_adds or msg.metrics is not None or msg.queue_times:
                self.conn.send(("step", msg))

    def _receive(self, block: bool) -> list[tuple[str, Any]]:
        cmds = []
        if block:
            timeout = None if self.abort_at is None else max(self.abort_at - time.monotonic(), 0.0)
            if self.conn.poll(timeout):
                cmds.append(self.conn.recv())
        while self.conn.poll(0):
            cmds.append(self.conn.recv())
        return cmds

    def _apply(self, cmds: list[tuple[str, Any]], msg: StepUpdate) -> bool:
        stop = False
        for kind, payload in cmds:
            if kind == "add":
                for r in payload:
                    msg.applied_adds += 1
                    try:
                        self.engine.add_request(
                            r.request_id, None, r.params, prompt_token_ids=r.prompt_token_ids
                        )
                    except Exception as e:  # QServeError: a bad request (400); anything else: ours (500)
                        err = (
                            str(e) if isinstance(e, QServeError) else f"engine error: {type(e).__name__}: {e}"
                        )
                        msg.updates.append(Update(r.request_id, "", [], None, 0, True, "abort", error=err))
                        continue
                    self.live.add(r.request_id)
                    self.unscheduled[r.request_id] = self.engine.seqs[r.request_id].arrival_time
            elif kind == "abort":
                for rid in payload:
                    if rid in self.live:
                        self.live.discard(rid)
                        self.started.discard(rid)
                        self.unscheduled.pop(rid, None)
                        self.engine.abort_request(rid)
            elif kind == "drain":
                if payload is not None and self.abort_at is None:
                    self.abort_at = time.monotonic() + payload
            elif kind == "stop":
                stop = True
        return stop

    def _step(self, msg: StepUpdate) -> None:
        t0 = time.monotonic()
        try:
            outputs = self.engine.step()
        except Exception as e:  # a bug or a device error: fail these requests, keep serving
            logger.exception("engine step failed")
            self._abort_all(msg, "abort", error=f"engine error: {type(e).__name__}: {e}")
            return
        if self.unscheduled:
            msg.queue_times = take_queue_times(self.engine, self.unscheduled, outputs, t0)
        for out in outputs:
            rid = out.request_id
            if rid not in self.live:
                continue
            first = rid not in self.started
            self.started.add(rid)
            msg.updates.append(update_from_output(out, first))
            if out.finished:
                self.live.discard(rid)
                self.started.discard(rid)

    def _abort_all(self, msg: StepUpdate, reason: str, error: str | None = None) -> None:
        for rid in sorted(self.live):
            seq = self.engine.seqs.get(rid)
            text, num = (seq.output_text, seq.num_output_tokens) if seq is not None else ("", 0)
            self.engine.abort_request(rid)
            msg.updates.append(Update(rid, text, [], None, num, True, reason, error=error))
        self.live.clear()
        self.started.clear()
        self.unscheduled.clear()


PREFILL_THREADS_MIN_TOKENS = 256  # steps at least this big are compute-bound: worth every core
# Steps this small (concurrency 1-2) get every core too: the HTTP side then has ~0.2 ms of work per token, too
# little to stall a second OpenMP thread, and the batch-1 step is 1.2-1.6x faster on two threads than on one
# (demo model, 2 cores: served TPOT 3.1 vs 3.7-4.9 ms; bench/RESULTS.md, issue 21).
LOW_TRAFFIC_THREADS_MAX_TOKENS = 2


def step_threads(tokens: int, small: int, big: int) -> int:
    """Torch threads for a step of ``tokens`` tokens: ``big`` (every core) for big prefills and the
    smallest steps, ``small`` (a core left to the HTTP side) between."""
    return big if tokens >= PREFILL_THREADS_MIN_TOKENS or tokens <= LOW_TRAFFIC_THREADS_MAX_TOKENS else small


def run_engine_core(
    conn: Channel,
    config: EngineConfig,
    threads: int | None,
    max_queue: int,
    prefill_threads: int | None = None,
    log_format: str = "text",
) -> None:
    """The child process's entry point: build the engine, report ready (or the error), then serve.

    ``threads``: torch threads for steps; ``prefill_threads``: for steps of at least
    PREFILL_THREADS_MIN_TOKENS tokens (None: ``threads`` for all)."""
    # Ctrl-C, systemd's control-group stop, `timeout` and `kill -- -PGID` signal the whole group: the parent
    # owns shutdown (it drains, then sends "stop"), so the engine must outlive the signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from qserve.server.logs import setup_logging

    setup_logging(log_format)
    try:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        from qserve.engine.llm_engine import LLMEngine
        from qserve.server.plan_info import plan_lines

        engine = LLMEngine(config)
        if threads is not None and prefill_threads is not None and prefill_threads != threads:
            big, small = prefill_threads, threads
            engine.set_step_threads(lambda n: step_threads(n, small, big))
        info = EngineInfo(
            model=config.model,
            max_model_len=engine.max_model_len,
            vocab_size=engine.model_config.vocab_size,
            plan=plan_lines(engine, max_queue, threads, prefill_threads),
        )
    except Exception as e:
        msg = str(e) if isinstance(e, QServeError) else f"{type(e).__name__}: {e}"
        conn.send(("error", msg))
        return
    conn.send(("ready", info, engine.metrics()))
    EngineCore(engine, conn).run()
