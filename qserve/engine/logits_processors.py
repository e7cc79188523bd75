"""vLLM's logits processors, batched: grammar mask, bad words, min_tokens, logit_bias, penalties, min_p.

A step's sampling sequences become one :class:`LogitsBatch` of tensors (``prepare_logits``), and
``apply_logits_processors`` transforms the (S, V) logits with whole-batch tensor ops: no Python loop over the
vocabulary, and rows that use no processor cost nothing beyond the shared ops. The order and formulas are
vLLM's (v1 sampler): grammar bitmask; bad words, min_tokens, logit_bias; penalties over the raw logits;
then min_p on the temperature-scaled distribution (top-k / top-p follow in the sampler).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from qserve.engine.sequence import Sequence


@dataclass
class LogitsBatch:
    """Everything the processors need for one step, as tensors on the logits' device.

    Row indices refer to rows of the step's (S, V) logits. ``None`` fields mean no row uses that processor.
    Token-id tensors are right-padded with ``V`` (a scratch column dropped after counting).
    """

    penalty_rows: torch.Tensor | None = None  # (P,) int64: rows with any penalty
    repetition: torch.Tensor | None = None  # (P,) float32, 1.0 = off
    frequency: torch.Tensor | None = None  # (P,) float32
    presence: torch.Tensor | None = None  # (P,) float32
    prompt_ids: torch.Tensor | None = None  # (P, Lp) int64, padded with V
    output_ids: torch.Tensor | None = None  # (P, Lo) int64, padded with V
    bias_rows: torch.Tensor | None = None  # (N,) int64
    bias_cols: torch.Tensor | None = None  # (N,) int64
    bias_values: torch.Tensor | None = None  # (N,) float32
    banned_rows: torch.Tensor | None = None  # (M,) int64: (row, col) pairs set to -inf
    banned_cols: torch.Tensor | None = None  # (M,) int64
    min_p_rows: torch.Tensor | None = None  # (Q,) int64
    min_p: torch.Tensor | None = None  # (Q,) float32
    min_p_temperature: torch.Tensor | None = (
        None  # (Q,) float32: the rows' temperature (min_p reads T-scaled probs)
    )
    bitmask: torch.Tensor | None = None  # (S, ceil(V / 32)) int32 on CPU: xgrammar's allowed-token bitmask


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.int64, device=device)


def bad_words_token_ids(tokenizer: Any, words: list[str]) -> list[list[int]]:
    """vLLM's rule: each word as encoded alone and, when that gives a different first token and the same
    length, with a leading space (so it is banned at the start and in the middle of text)."""
    out: list[list[int]] = []
    for word in words:
        bare = list(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if bare:
            out.append(bare)
        spaced = list(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if spaced and (not bare or (spaced[0] != bare[0] and len(spaced) == len(bare))):
            out.append(spaced)
    return out


def banned_bad_words(bad_words_ids: list[list[int]], output: Seq[int]) -> list[int]:
    """Tokens banned now: the last token of every bad word whose other tokens end the output (vLLM's rule;
    a one-token bad word is always banned)."""
    out = []
    for ids in bad_words_ids:
        k = len(ids) - 1
        if k == 0 or (len(output) >= k and list(output[len(output) - k :]) == ids[:-1]):
            out.append(ids[-1])
    return out


def prepare_logits(seqs: list[Sequence], vocab_size: int, device: torch.device) -> LogitsBatch | None:
    """The step's :class:`LogitsBatch` for sampling sequences ``seqs`` (row i = seqs[i]); None if no
    sequence uses a processor (the sampler's fast path)."""
    from qserve.engine.structured import fill_bitmask

    batch = LogitsBatch()
    pen: list[int] = []
    bias: list[tuple[int, int, float]] = []
    banned: list[tuple[int, int]] = []
    min_p: list[int] = []
    for i, seq in enumerate(seqs):
        p = seq.params
        if not p.processes_logits:
            continue
        if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
            pen.append(i)
        if p.logit_bias:
            bias.extend((i, t, b) for t, b in p.logit_bias.items() if t < vocab_size)
        out = seq.output_token_ids
        if seq.grammar is None and len(out) < p.min_tokens:  # a grammar decides its own end
            banned.extend((i, t) for t in seq.min_tokens_stop_ids if t < vocab_size)
        if seq.bad_words_ids:
            banned.extend((i, t) for t in banned_bad_words(seq.bad_words_ids, out) if t < vocab_size)
        if p.min_p > 0 and not p.greedy:
            min_p.append(i)
    if pen:
        ps = [seqs[i] for i in pen]
        batch.penalty_rows = torch.tensor(pen, dtype=torch.int64, device=device)
        f32 = torch.float32
        batch.repetition = torch.tensor([q.params.repetition_penalty for q in ps], dtype=f32, device=device)
        batch.frequency = torch.tensor([q.params.frequency_penalty for q in ps], dtype=f32, device=device)
        batch.presence = torch.tensor([q.params.presence_penalty for q in ps], dtype=f32, device=device)
        batch.prompt_ids = _padded([q.token_ids[: q.num_prompt_tokens] for q in ps], vocab_size, device)
        batch.output_ids = _padded([q.output_token_ids for q in ps], vocab_size, device)
    if bias:
        rows, cols, vals = zip(*bias, strict=True)
        batch.bias_rows = torch.tensor(rows, dtype=torch.int64, device=device)
        batch.bias_cols = torch.tensor(cols, dtype=torch.int64, device=device)
        batch.bias_values = torch.tensor(vals, dtype=torch.float32, device=device)
    if banned:
        rows, cols = zip(*banned, strict=True)
        batch.banned_rows = torch.tensor(rows, dtype=torch.int64, device=device)
        batch.banned_cols = torch.tensor(cols, dtype=torch.int64, device=device)
    if min_p:
        batch.min_p_rows = torch.tensor(min_p, dtype=torch.int64, device=device)
        batch.min_p = torch.tensor([seqs[i].params.min_p for i in min_p], dtype=torch.float32, device=device)
        temps = [seqs[i].params.temperature for i in min_p]
        batch.min_p_temperature = torch.tensor(temps, dtype=torch.float32, device=device)
    batch.bitmask = fill_bitmask(seqs, vocab_size)
    if all(v is None for v in vars(batch).values()):
        return None
    return batch


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: torch.Tensor,
    output_ids: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> torch.Tensor:
    """vLLM's penalties on (P, V) logits; token-id tensors are padded with V. Returns new logits.

    repetition r: on tokens seen in the prompt or the output, logit / r when positive, logit * r otherwise;
    frequency f and presence p: minus f * count and minus p * [count > 0], over the output only.
    """
    p, v = logits.shape
    counts = torch.zeros(p, v + 1, dtype=logits.dtype, device=logits.device)  # (P, V + 1)
    counts.scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=logits.dtype))
    counts = counts[:, :v]  # (P, V): the pad column dropped
    seen_out = counts > 0
    seen = torch.zeros(p, v + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, prompt_ids, True)
    seen = seen[:, :v] | seen_out  # (P, V)
    r = torch.where(seen, repetition[:, None], torch.ones_like(logits))  # (P, V): 1 where unseen
    logits = torch.where(logits > 0, logits / r, logits * r)
    return logits - frequency[:, None] * counts - presence[:, None] * seen_out.to(logits.dtype)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """-inf on tokens whose probability at the rows' temperature is below min_p x the top one. (Q, V)."""
    probs = torch.softmax(logits / temperature[:, None], dim=-1)  # (Q, V)
    keep = probs >= min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(~keep, float("-inf"))


def apply_logits_processors(logits: torch.Tensor, batch: LogitsBatch) -> torch.Tensor:
    """The processed copy of (S, V) float32 ``logits`` (the input stays the model's own distribution)."""
    logits = logits.clone()
    if batch.bitmask is not None:
        from qserve.engine.structured import apply_bitmask

        apply_bitmask(logits, batch.bitmask)
    if batch.banned_rows is not None and batch.banned_cols is not None:
        allowed = logits.clone() if batch.bitmask is not None else None
        logits[batch.banned_rows, batch.banned_cols] = float("-inf")
        if allowed is not None:  # bans that leave a row's grammar no token are dropped for that row
            dead = torch.isneginf(logits).all(dim=-1)  # (S,)
            logits[dead] = allowed[dead]
    if batch.bias_rows is not None and batch.bias_cols is not None and batch.bias_values is not None:
        logits.index_put_((batch.bias_rows, batch.bias_cols), batch.bias_values, accumulate=True)
    if batch.penalty_rows is not None:
        assert batch.prompt_ids is not None and batch.output_ids is not None
        assert batch.presence is not None and batch.frequency is not None and batch.repetition is not None
        rows = batch.penalty_rows
        logits[rows] = apply_penalties(
            logits[rows],
            batch.prompt_ids,
            batch.output_ids,
            batch.presence,
            batch.frequency,
            batch.repetition,
        )
    if batch.min_p_rows is not None:
        assert batch.min_p is not None and batch.min_p_temperature is not None
        rows = batch.min_p_rows
        logits[rows] = apply_min_p(logits[rows], batch.min_p, batch.min_p_temperature)
    return logits
