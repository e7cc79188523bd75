"""A step's results on the host side, in two halves.

``apply`` (fast, before the next step is scheduled): tokens appended, grammars advanced, and the finishes
that the token ids alone decide (EOS, stop token ids, max_tokens, a terminated grammar), so the scheduler
never runs a sequence past them. ``emit`` (slow: may overlap the next step's forward under async
scheduling): detokenization, stop strings and the RequestOutputs. A stop string found by ``emit`` finishes
its sequence one step late; the token that extra step computes is dropped, never emitted.
"""

from __future__ import annotations

from dataclasses import dataclass

from qserve.engine.sequence import Sequence
from qserve.tokenizer import IncrementalDetokenizer
from qserve.types import RequestOutput


@dataclass
class NewToken:
    """One sequence's new token of a step, applied but not yet emitted."""

    seq: Sequence
    token: int | None  # None: prompt scoring only (max_tokens=0), nothing generated
    detok: IncrementalDetokenizer


def cut_at_stop(old_text: str, delta: str, stops: list[str]) -> tuple[str, str, bool]:
    """(text, delta, hit): ``old_text + delta`` cut before its first stop string, what of it is new, and
    whether a stop string was found. A stop string may begin in ``old_text``: the text then gets shorter.
    Only the tail where a stop string could newly appear is searched."""
    text = old_text + delta
    tail_start = max(0, len(old_text) - max(len(s) for s in stops) + 1)
    hits = [i for s in stops if (i := text.find(s, tail_start)) >= 0]
    if not hits:
        return text, delta, False
    cut = min(hits)
    return text[:cut], text[len(old_text) : cut], True


def request_output(seq: Sequence, delta: str, delta_ids: list[int]) -> RequestOutput:
    return RequestOutput(
        request_id=seq.request_id,
        prompt=seq.prompt,
        prompt_token_ids=seq.token_ids[: seq.num_prompt_tokens],
        text=seq.output_text,
        token_ids=seq.output_token_ids,
        finished=seq.is_finished,
        finish_reason=seq.finish_reason,
        delta_text=delta,
        delta_token_ids=delta_ids,
        logprobs=seq.logprobs,
        prompt_logprobs=seq.prompt_logprobs,
        num_cached_tokens=seq.num_cached_tokens,
    )
