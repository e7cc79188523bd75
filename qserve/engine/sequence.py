"""A request's state inside the engine."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from qserve.types import SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from qserve.engine.structured import GrammarState


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One request. ``token_ids`` is prompt + output; the first ``num_computed_tokens`` have KV in the cache.

    Preemption by recompute resets ``num_computed_tokens`` to 0; the tokens themselves are kept, so the
    request resumes exactly where it was (and a seeded generator is not consumed twice).
    """

    seq_id: int
    request_id: str
    prompt: str | None
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    max_total_tokens: int  # min(prompt + max_tokens, max_model_len)
    arrival_time: float = field(default_factory=time.monotonic)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache at admission
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    output_text: str = ""
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    grammar: GrammarState | None = None  # structured outputs: compile future, then matcher
    bad_words_ids: list[list[int]] = field(default_factory=list)  # params.bad_words as token sequences
    min_tokens_stop_ids: list[int] = field(default_factory=list)  # banned until min_tokens (EOS, stop ids)
    # async look-ahead: token_ids[-1] is a placeholder until the launched step's sampled id reaches the host
    token_pending: bool = False

    @property
    def schedulable(self) -> bool:
        """False while its grammar compiles: it then waits in the queue and the others run."""
        return self.grammar is None or self.grammar.ready

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
