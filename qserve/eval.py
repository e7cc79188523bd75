"""Perplexity of a model on a text, through the engine's own forward (prompt logprobs)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from qserve.engine.llm import LLM
from qserve.errors import QServeError
from qserve.types import SamplingParams


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens: int  # tokens scored
    tokens_per_second: float
    nll: float  # mean negative log-likelihood per token (nats)


def perplexity(llm: LLM, text: str, context: int = 512, max_tokens: int | None = None) -> PerplexityResult:
    """Score ``text`` in non-overlapping windows of ``context`` tokens (the first token of each is unscored).

    ``max_tokens`` caps how much of the text is used (after tokenization).
    """
    ids = list(llm.tokenizer.encode(text))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    context = min(context, llm.engine.max_model_len)
    windows = [ids[i : i + context] for i in range(0, len(ids), context)]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise QServeError("the evaluation text is too short: need at least 2 tokens")
    params = SamplingParams(max_tokens=0, prompt_logprobs=0, temperature=0.0)
    t0 = time.perf_counter()
    outs = llm.generate(prompt_token_ids=windows, sampling_params=params)
    elapsed = time.perf_counter() - t0
    nll, n = 0.0, 0
    for out in outs:
        for lp in (out.prompt_logprobs or [])[1:]:
            assert lp is not None
            nll -= lp.logprob
            n += 1
    return PerplexityResult(math.exp(nll / n), n, n / elapsed, nll / n)
