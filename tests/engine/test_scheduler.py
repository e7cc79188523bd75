"""Exact scheduling decisions: token budget, chunked prefill, admission limits, preemption."""

from __future__ import annotations

from qserve.cache.kv_cache_manager import KVCacheManager
from qserve.engine.scheduler import Scheduler
from qserve.engine.sequence import SeqStatus, Sequence
from qserve.types import SamplingParams


def seq(i: int, n: int) -> Sequence:
    return Sequence(i, f"r{i}", None, list(range(n)), n, SamplingParams(max_tokens=8), n + 8)


def plan(out) -> list[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    return [(s.seq.seq_id, s.start, s.num_new_tokens) for s in out.scheduled]


def run(sched: Scheduler, out) -> None:  # type: ignore[no-untyped-def]
    """Pretend the model ran: advance computed tokens and append a token where one was sampled."""
    for s in out.scheduled:
        s.seq.num_computed_tokens += s.num_new_tokens
        if s.samples:
            s.seq.token_ids.append(0)


def test_chunked_prefill_within_budget() -> None:
    sched = Scheduler(KVCacheManager(64, 4), max_num_seqs=8, max_num_batched_tokens=10)
    a, b = seq(0, 7), seq(1, 12)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert plan(out) == [(0, 0, 7), (1, 0, 3)]
    assert [s.samples for s in out.scheduled] == [True, False]
    run(sched, out)
    out = sched.schedule()
    assert plan(out) == [(0, 7, 1), (1, 3, 9)]  # decode first, then the rest of b's prompt
    assert sched.kv.get_block_table(0) == [0, 1] and sched.kv.get_block_table(1) == [2, 3, 4]
    assert out.num_batched_tokens == 10


def test_max_num_seqs_limits_admission() -> None:
    sched = Scheduler(KVCacheManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(seq(i, 3))
    out = sched.schedule()
    assert plan(out) == [(0, 0, 3), (1, 0, 3)]
    assert [s.seq_id for s in sched.waiting] == [2]


def test_preempts_newest_and_requeues_first() -> None:
    # 3 blocks of 4 tokens. a: 4 tokens, b: 4 tokens, c: 4 tokens fill the pool exactly.
    sched = Scheduler(KVCacheManager(3, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a, b, c = seq(0, 4), seq(1, 4), seq(2, 4)
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    assert plan(out) == [(0, 0, 4), (1, 0, 4), (2, 0, 4)]
    run(sched, out)
    # each now needs a 5th slot -> a new block; none free: c (newest) is preempted, then b.
    out = sched.schedule()
    assert [s.seq_id for s in out.preempted] == [2, 1]
    assert plan(out) == [(0, 4, 1)]
    assert [s.seq_id for s in sched.waiting] == [1, 2]
    assert (b.status, b.num_computed_tokens, sched.kv.get_block_table(1)) == (SeqStatus.WAITING, 0, [])
    assert sched.kv.get_block_table(0) == [0, 2]  # c's block freed and reused
    assert sched.num_preemptions == 2


def test_finish_frees_blocks() -> None:
    sched = Scheduler(KVCacheManager(8, 4), max_num_seqs=8, max_num_batched_tokens=100)
    a, b = seq(0, 6), seq(1, 2)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    sched.finish(a, "abort")
    assert a.status is SeqStatus.FINISHED and a.finish_reason == "abort"
    assert sched.running == [b]
    assert sched.kv.pool.num_free_blocks == 7
    sched.finish(a, "stop")  # idempotent
    assert a.finish_reason == "abort"
