"""Perplexity of a model on a text, and greedy agreement between two engines, through the engine's own forward."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
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


PROGRESS_BATCH = 32  # windows per generate() call when reporting progress


def perplexity(
    llm: LLM,
    text: str,
    context: int = 512,
    max_tokens: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Score ``text`` in non-overlapping windows of ``context`` tokens (the first token of each is unscored).

    ``max_tokens`` caps how much of the text is used (after tokenization). ``progress(done, total)`` is
    called with the tokens scored so far as batches of windows finish (the result does not depend on it).
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
    if progress is None:
        outs = llm.generate(prompt_token_ids=windows, sampling_params=params)
    else:  # in batches, to report between them; each batch still fills the engine's token budget
        outs, total, done = [], sum(len(w) for w in windows), 0
        progress(0, total)
        for i in range(0, len(windows), PROGRESS_BATCH):
            batch = windows[i : i + PROGRESS_BATCH]
            outs += llm.generate(prompt_token_ids=batch, sampling_params=params)
            done += sum(len(w) for w in batch)
            progress(done, total)
    elapsed = time.perf_counter() - t0
    nll, n = 0.0, 0
    for out in outs:
        for lp in (out.prompt_logprobs or [])[1:]:
            assert lp is not None
            nll -= lp.logprob
            n += 1
    return PerplexityResult(math.exp(nll / n), n, n / elapsed, nll / n)


@dataclass(frozen=True)
class GreedyAgreement:
    """How closely one engine's greedy outputs follow a reference engine's on the same prompts."""

    free_run: float  # generated independently, position by position: one flip changes every later token
    diverged_at: list[int]  # first differing position of each output that differs anywhere (sorted)
    # at each first difference, the reference's logprob of its own token minus that of the other engine's
    # token (the same prefix, so the same distribution up to numerics): how close a tie was flipped
    divergence_gaps: list[float]
    # first differences where each engine's token is among the other's top-k (vLLM's check_logprobs_close)
    divergences_in_top_k: int
    teacher_forced: float  # reference outputs fed back: share of positions whose top-1 is the same token
    outputs: int
    tokens: int


def greedy_agreement(
    ref: LLM, llm: LLM, prompts: list[str], max_tokens: int = 64, top_k: int = 5
) -> GreedyAgreement:
    """Compare ``llm``'s greedy decoding with ``ref``'s: free-running, and teacher-forced on ``ref``'s outputs.

    Teacher-forced agreement is llama.cpp's "same top p": per token, without the cascade that makes a single
    near-tie flip cost the rest of a free-running output. At each first difference the two engines have seen
    the same tokens, so vLLM's accuracy tests accept it when each chosen token is in the other's top ``top_k``.
    """
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=top_k)
    want, got = ref.generate(prompts, params), llm.generate(prompts, params)
    same = total = in_top = 0
    divergences: list[tuple[int, float]] = []  # (first differing position, gap in the reference's logprobs)
    for w, g in zip(want, got, strict=True):
        pairs = list(zip(w.token_ids, g.token_ids, strict=True))
        same += sum(a == b for a, b in pairs)
        total += len(pairs)
        first = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        if first is None:
            continue
        assert w.logprobs is not None and g.logprobs is not None
        mine, theirs = pairs[first]
        w_top, g_top = w.logprobs[first].top, g.logprobs[first].top  # token id -> logprob, same prefix
        in_top += theirs in w_top and mine in g_top
        divergences.append((first, w.logprobs[first].logprob - w_top.get(theirs, -math.inf)))
    full = [list(w.prompt_token_ids) + list(w.token_ids) for w in want]
    scored = llm.generate(
        prompt_token_ids=full,
        sampling_params=SamplingParams(max_tokens=0, prompt_logprobs=1, temperature=0.0),
    )
    forced = 0
    for out, ids, w in zip(scored, full, want, strict=True):
        assert out.prompt_logprobs is not None
        for pos in range(len(w.prompt_token_ids), len(ids)):
            lp = out.prompt_logprobs[pos]
            assert lp is not None
            forced += max(lp.top.items(), key=lambda kv: kv[1])[0] == ids[pos]
    divergences.sort()
    return GreedyAgreement(
        same / total,
        [pos for pos, _ in divergences],
        [gap for _, gap in divergences],
        in_top,
        forced / total,
        len(prompts),
        total,
    )
