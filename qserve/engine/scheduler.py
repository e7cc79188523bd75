"""Iteration-level scheduling with a token budget, chunked prefill and recompute preemption."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from qserve.cache.kv_cache_manager import KVCacheManager
from qserve.engine.sequence import SeqStatus, Sequence


@dataclass
class ScheduledSeq:
    """``num_new_tokens`` tokens of ``seq`` starting at ``start`` run this step."""

    seq: Sequence
    start: int
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step reaches the end of the sequence's known tokens, so a new token is sampled."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """One step's work: sequences in execution order (decodes first) and what was preempted to make room."""

    scheduled: list[ScheduledSeq] = field(default_factory=list)
    num_batched_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    """FCFS continuous batching over a token budget.

    Each step: running sequences first, in arrival order, each getting all its uncomputed tokens (one for a
    decode, a chunk for a long prefill) while the budget lasts; when blocks run out, the newest running
    sequence is preempted (blocks freed, recomputed later). Then waiting sequences are admitted while the
    budget, ``max_num_seqs`` and free blocks allow. A prompt longer than the budget is prefilled in chunks.
    """

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while self.kv.allocate_slots(seq.seq_id, seq.num_computed_tokens + n) is None:
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if not seq.schedulable:  # its grammar still compiles: admit the first one behind it that is ready
                nxt = next((q for q in self.waiting if q.schedulable), None)
                if nxt is None:
                    break
                self.waiting.remove(nxt)
                self.waiting.appendleft(nxt)
                seq = nxt
            # fresh or preempted: reuse whatever prefix is cached (not when prompt logprobs need every position)
            looked_up = seq.num_computed_tokens == 0 and seq.params.prompt_logprobs is None
            if looked_up:
                seq.num_computed_tokens = seq.num_cached_tokens = self.kv.match_prefix(
                    seq.seq_id, seq.token_ids
                )
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if self.kv.allocate_slots(seq.seq_id, seq.num_computed_tokens + n) is None:
                self.kv.free(seq.seq_id)  # give the prefix hits back; try again next step
                seq.num_computed_tokens = 0
                break
            if looked_up:
                self.kv.record_prefix_lookup(seq.num_tokens, seq.num_cached_tokens)
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n
        out.scheduled.sort(key=lambda s: s.num_new_tokens != 1)  # decodes first (stable)
        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.kv.free(seq.seq_id)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Finish (or abort) a sequence wherever it is, freeing its blocks at once."""
        if seq.is_finished:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.kv.free(seq.seq_id)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
