"""Turns logits into tokens: greedy, temperature, top-k, top-p, per-request seeds, logprobs."""

from __future__ import annotations

import torch

from qserve.engine.logits_processors import LogitsBatch, apply_logits_processors
from qserve.types import SamplingParams, TokenLogprob


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (V,) logits outside the top-k and the top-p nucleus with -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))
    return logits


def sample(
    raw_logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    processors: LogitsBatch | None = None,
) -> tuple[list[int], list[TokenLogprob | None]]:
    """:func:`sample_tensor` with the token ids as a list."""
    tokens, lps = sample_tensor(raw_logits, params, generators, processors)
    return tokens.tolist(), lps


def sample_tensor(
    raw_logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    processors: LogitsBatch | None = None,
) -> tuple[torch.Tensor, list[TokenLogprob | None]]:
    """raw_logits: (S, V) float32, one row per sequence; ``processors`` (grammar, penalties, bias, min_p...)
    shape what is sampled, while logprobs stay those of the model. Returns the token ids, (S,) int64 on the
    logits' device, and the logprobs.

    A batch of greedy rows without logprobs never waits for the device (argmax stays there). A random row
    draws with its generator, which lives on the host (seeds give the same tokens on every device), from
    probabilities copied there; a row with logprobs reads its token on the host."""
    logits = raw_logits if processors is None else apply_logits_processors(raw_logits, processors)
    # (S,) one pass for every greedy row (all random: only the dtype and device matter)
    tokens = (
        logits.argmax(dim=-1)
        if any(p.greedy for p in params)
        else logits.new_empty(len(params), dtype=torch.long)
    )
    shared: dict[int, tuple[torch.Generator | None, list[int]]] = {}  # rows without a seed, by generator
    for i, p in enumerate(params):
        if p.greedy:
            continue
        gen = generators[i]
        if p.seed is None:  # the engine's generator, shared by every unseeded request: one draw for them all
            shared.setdefault(id(gen), (gen, []))[1].append(i)
            continue
        row = apply_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
        probs = row.softmax(-1)
        if gen is not None and probs.device != gen.device:
            probs = probs.cpu()  # a CUDA tensor cannot draw with a CPU generator
        tokens[i] = torch.multinomial(probs, 1, generator=gen)[0]
    for gen, rows in shared.values():
        tokens[rows] = _draw_rows(logits, [params[i] for i in rows], rows, gen)
    lps: list[TokenLogprob | None] = [None] * len(params)
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if want:
        logp = torch.log_softmax(raw_logits[want], dim=-1)  # (W, V): the model's own distribution
        picked = tokens[want].tolist()
        for r, i in enumerate(want):
            lps[i] = token_logprob(logp[r], picked[r], params[i].logprobs or 0)
    return tokens, lps


def _draw_rows(
    logits: torch.Tensor, params: list[SamplingParams], rows: list[int], gen: torch.Generator | None
) -> torch.Tensor:
    """One draw for several random rows at once, by inverting each row's CDF at one uniform number: one
    random number a row where a per-row multinomial cost ~17% of a concurrency-32 serving step on CPU (and
    the exponential race, one random number per vocabulary entry, 15%). -> (R,) token ids on the logits'
    device."""
    temps = torch.tensor([p.temperature for p in params], device=logits.device)
    picked = logits[: len(rows)] if rows[-1] == len(rows) - 1 else logits[torch.tensor(rows)]  # (R, V)
    scaled = picked / temps[:, None]
    for r, p in enumerate(params):
        if (p.top_k > 0 and p.top_k < scaled.shape[-1]) or p.top_p < 1.0:
            scaled[r] = apply_top_k_top_p(scaled[r], p.top_k, p.top_p)
    cdf = scaled.softmax(-1).cumsum(-1)  # (R, V)
    # on the generator's device (a CPU generator for a CUDA step)
    u = torch.rand(len(rows), generator=gen, device=gen.device if gen is not None else logits.device)
    total = cdf[:, -1:]
    target = torch.minimum(u.to(cdf.device)[:, None] * total, total.nextafter(torch.zeros_like(total)))
    # the first token whose CDF passes the target: a token of probability 0 adds nothing, so is never chosen
    return torch.searchsorted(cdf, target, right=True).squeeze(1)


def token_logprob(logp: torch.Tensor, token: int, top_n: int) -> TokenLogprob:
    """The chosen token's logprob and the ``top_n`` best alternatives, from a (V,) log-softmax row."""
    top: dict[int, float] = {}
    if top_n > 0:
        vals, ids = torch.topk(logp, top_n)
        top = dict(zip(ids.tolist(), vals.tolist(), strict=True))
    return TokenLogprob(token, float(logp[token]), top)
