"""EngineProcess: the engine in a spawned process, driven the way the HTTP side drives it."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from qserve import LLM, SamplingParams
from qserve.config import EngineConfig
from qserve.errors import QServeError
from qserve.server.engine_core import step_threads
from qserve.server.engine_process import EngineProcess, default_threads
from qserve.server.engine_thread import Delta, DrainingError, EngineRequest, QueueFullError

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


async def run_group(proc: EngineProcess, reqs: list[EngineRequest]) -> list[list[Delta]]:
    group = proc.submit(reqs)
    got: list[list[Delta]] = [[] for _ in reqs]
    while not group.done:
        d = await group.next()
        got[d.index].append(d)
    return got


@pytest.fixture(scope="module")
def engine(tiny_llama: Path):  # type: ignore[no-untyped-def]
    proc = EngineProcess(EngineConfig(model=str(tiny_llama), dtype="float32"), max_queue=4, threads=1)
    info = proc.start()
    assert info.model == str(tiny_llama) and info.max_model_len > 0 and info.plan
    yield proc
    proc.stop()


def test_outputs_match_the_offline_engine(engine: EngineProcess, tiny_llama: Path) -> None:
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 2, 3]]
    reqs = [EngineRequest(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    got = asyncio.run(run_group(engine, reqs))
    ref = LLM(str(tiny_llama), dtype="float32").generate(prompt_token_ids=prompts, sampling_params=GREEDY)
    for deltas, r in zip(got, ref, strict=True):
        assert [t for d in deltas for t in d.token_ids] == r.token_ids
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert deltas[-1].text == r.text and deltas[-1].num_output_tokens == 12
        assert [d.finished for d in deltas].count(True) == 1
    assert engine.num_queued() == 0
    assert engine.snapshot["generation_tokens_total"] >= 24


def test_bad_request_fails_alone(engine: EngineProcess) -> None:
    reqs = [EngineRequest("bad", [10**6], GREEDY), EngineRequest("good", [1, 2], GREEDY)]  # id past vocab
    bad_deltas, good_deltas = asyncio.run(run_group(engine, reqs))
    assert bad_deltas[-1].error is not None and "prompt token ids must be in" in bad_deltas[-1].error
    assert good_deltas[-1].error is None and good_deltas[-1].num_output_tokens == 12


def test_queue_bound_and_abort(engine: EngineProcess) -> None:
    async def go() -> list[Delta]:
        long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        group = engine.submit([EngineRequest(f"q{i}", [3, 4], long) for i in range(4)])
        with pytest.raises(QueueFullError):  # 4 queued + 1 > max_queue 4
            engine.submit([EngineRequest("q-more", [3], long)])
        first = await group.next()
        group.interrupt()  # the client went away: abort all four
        rest = []
        while True:
            d = await group.next()
            rest.append(d)
            if d.index < 0:
                return [first, *rest]

    deltas = asyncio.run(go())
    assert deltas[-1].index == -1 and deltas[-1].finish_reason == "abort"
    # the engine really dropped them: a new request runs at once and the queue is empty again
    (only,) = asyncio.run(run_group(engine, [EngineRequest("after", [1], GREEDY)]))
    assert only[-1].num_output_tokens == 12
    assert engine.num_queued() == 0


def test_start_failure_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    proc = EngineProcess(EngineConfig(model=str(tmp_path)), max_queue=4, threads=1)
    with pytest.raises(QServeError) as e:
        proc.start()
    assert "\n" not in str(e.value).strip() and str(e.value)
    assert not proc.is_alive()


def long_request_interrupted(proc: EngineProcess, interrupt: Callable[[], None]) -> Delta:
    """Run one request as long as the context allows, call ``interrupt`` after its first delta, and
    return its last delta."""

    async def go() -> Delta:
        long = SamplingParams(max_tokens=proc.info.max_model_len - 3, temperature=0.0, ignore_eos=True)
        group = proc.submit([EngineRequest("long", [1, 2, 3], long)])
        await group.next()
        interrupt()
        while True:
            d = await group.next()
            if d.finished:
                return d

    return asyncio.run(go())


def test_a_dead_engine_fails_what_runs_and_refuses_more(tiny_llama: Path) -> None:
    proc = EngineProcess(EngineConfig(model=str(tiny_llama), dtype="float32"), max_queue=8, threads=1)
    proc.start()
    last = long_request_interrupted(proc, lambda: proc._proc.kill())  # the engine dies mid-request
    assert last.error is not None and "engine process exited" in last.error
    assert not proc.is_alive()

    async def late() -> None:
        proc.submit([EngineRequest("late", [1], GREEDY)])

    with pytest.raises(DrainingError):
        asyncio.run(late())
    proc.stop()


def test_default_threads_leave_a_core_for_the_server() -> None:
    decode, prefill = default_threads("cpu")
    cores = len(os.sched_getaffinity(0))
    assert (decode, prefill) == (max(cores - 1, 1), cores)
    assert default_threads("cuda") == (None, None)


def test_step_threads_every_core_for_the_smallest_and_biggest_steps() -> None:
    # 1-2 token steps (concurrency 1-2) and prefills of 256+ tokens: every core; between: one left over
    got = {n: step_threads(n, 1, 2) for n in (1, 2, 3, 32, 255, 256, 4096)}
    assert got == {1: 2, 2: 2, 3: 1, 32: 1, 255: 1, 256: 2, 4096: 2}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_drain_deadline_aborts_once_then_idles(tiny_llama: Path) -> None:
    proc = EngineProcess(EngineConfig(model=str(tiny_llama), dtype="float32"), max_queue=8, threads=1)
    info = proc.start()
    last = long_request_interrupted(proc, lambda: proc.begin_drain(grace=0.3))
    assert last.finish_reason == "abort" and last.error is None and last.num_output_tokens > 0
    assert last.num_output_tokens < info.max_model_len - 3
    before = cpu_seconds(proc._proc.pid)
    time.sleep(1.0)
    assert cpu_seconds(proc._proc.pid) - before < 0.3  # past the deadline the engine waits, not polls
    assert proc.is_alive()
    proc.stop()
    assert proc._proc.exitcode == 0
