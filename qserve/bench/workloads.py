"""Request generators: arrival schedules and prompts, deterministic for a given seed.

Arrival times and prompts come from separate random streams, so changing ``--rate`` does not change the
prompts. Prompts are token-id lists (exact lengths on any server whose vocabulary covers the id range), or
text from a JSONL dataset. An agent session's turn k+1 prompt is turn k's prompt + turn k's reply + new
user tokens: a growing shared prefix. The reply the client re-sends is a stand-in of exactly the turn's
output length (``RequestSpec.reply``), not the server's text, so every server gets the same bytes.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from qserve.bench.config import BenchConfig, LengthDist
from qserve.errors import QServeError

Prompt = list[int] | str

# Token ids become these words when a prompt must be text (the chat endpoint, or extending a text prompt).
# fmt: off
WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be",
    "by", "this", "are", "from", "at", "or", "an", "which", "have", "not", "one", "all", "but",
    "they", "more", "can", "has", "were", "their", "will", "would", "there", "been", "other",
    "when", "some", "what", "into",
)
# fmt: on


@dataclass(frozen=True)
class RequestSpec:
    """One request to send.

    ``output_len`` is sent as ``max_tokens`` with ``ignore_eos``, so a server that honours it generates
    exactly that many tokens. Agent turns carry their session id (sent as ``user``), their turn number, and
    ``reply``: the stand-in for this turn's output that the session's next prompt includes.
    """

    prompt: Prompt
    output_len: int
    session: str | None = None
    turn: int = 0
    reply: list[int] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int | None:
        """Exact prompt length for token-id prompts; None for text (the server's tokenizer decides)."""
        return len(self.prompt) if isinstance(self.prompt, list) else None


def to_text(ids: list[int]) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in ids)


def extend(prompt: Prompt, ids: list[int]) -> Prompt:
    """``prompt`` followed by ``ids`` (as words when the prompt is text)."""
    if isinstance(prompt, list):
        return prompt + ids
    return prompt + " " + to_text(ids) if ids else prompt


# ---------------------------------------------------------------------------------------------- arrivals
def poisson_arrivals(rate: float, rng: random.Random) -> Iterator[float]:
    """Arrival times (s) of a Poisson process at ``rate`` per second; every arrival at 0 when rate is inf."""
    t = 0.0
    while True:
        if not math.isinf(rate):
            t += rng.expovariate(rate)
        yield t


def bursty_arrivals(rate: float, on: float, off: float, rng: random.Random) -> Iterator[float]:
    """A Poisson process at ``rate`` that only runs during ``on``-second phases, each followed by ``off``
    seconds of silence: the process's own clock is mapped onto the on-phases of the wall clock."""
    for t in poisson_arrivals(rate, rng):
        cycle = math.floor(t / on)
        yield cycle * (on + off) + (t - cycle * on)


def arrival_times(cfg: BenchConfig) -> Iterator[float]:
    """Send times for requests (agent: session starts), seconds from the run's start."""
    rng = random.Random(f"{cfg.seed}-arrivals")
    if cfg.workload == "closed":
        return poisson_arrivals(math.inf, rng)
    if cfg.workload == "bursty":
        return bursty_arrivals(cfg.rate, cfg.burst_on, cfg.burst_off, rng)
    return poisson_arrivals(cfg.rate, rng)


# ----------------------------------------------------------------------------------------------- prompts
def load_dataset(path: Path) -> list[tuple[Prompt, int | None]]:
    """JSONL lines ``{"prompt": str | [ids], "output_len": int}`` (output_len optional); blank lines skipped."""
    rows: list[tuple[Prompt, int | None]] = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, out = row["prompt"], row.get("output_len")
        except (json.JSONDecodeError, TypeError, KeyError):
            raise QServeError(f"{path}:{n}: expected a JSON object with a 'prompt'") from None
        ids_ok = isinstance(prompt, list) and all(isinstance(t, int) and t >= 0 for t in prompt)
        if not (isinstance(prompt, str) or ids_ok) or not prompt:
            raise QServeError(f"{path}:{n}: 'prompt' must be a non-empty string or list of token ids")
        if out is not None and (not isinstance(out, int) or out < 1):
            raise QServeError(f"{path}:{n}: 'output_len' must be a positive integer")
        rows.append((prompt, out))
    if not rows:
        raise QServeError(f"{path}: no prompts")
    return rows


class PromptSource:
    """Prompts and output lengths in a fixed order for a seed: dataset rows in file order (cycling), or
    synthetic token ids with lengths from the configured distributions."""

    def __init__(self, cfg: BenchConfig):
        self.rng = random.Random(f"{cfg.seed}-prompts")
        self.prompt_len = LengthDist.parse(cfg.prompt_len)
        self.output_len = LengthDist.parse(cfg.output_len)
        self.user_len = LengthDist.parse(cfg.user_len)
        self.lo, self.hi = cfg.vocab_range
        self.rows = load_dataset(cfg.dataset) if cfg.dataset is not None else None
        self.n = 0

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(self.lo, self.hi) for _ in range(n)]

    def next(self) -> tuple[Prompt, int]:
        """The next (prompt, output length)."""
        if self.rows is None:
            prompt: Prompt = self.ids(self.prompt_len.sample(self.rng))
            return prompt, self.output_len.sample(self.rng)
        prompt, out = self.rows[self.n % len(self.rows)]
        self.n += 1
        return prompt, out if out is not None else self.output_len.sample(self.rng)


def request_specs(cfg: BenchConfig) -> Iterator[RequestSpec]:
    """Independent requests (steady, bursty, closed), endless; the runner bounds them."""
    source = PromptSource(cfg)
    while True:
        prompt, out = source.next()
        yield RequestSpec(prompt, out)


def agent_session(source: PromptSource, sid: str, turns: int, max_len: int | None) -> list[RequestSpec]:
    """One session's turns. It ends early when a turn's prompt + output would exceed ``max_len`` tokens
    (the server's max_model_len, when known and the prompts are token ids)."""
    prompt, out = source.next()
    specs: list[RequestSpec] = []
    for turn in range(turns):
        if turn > 0:
            prev = specs[-1]
            prompt = extend(extend(prev.prompt, prev.reply), source.ids(source.user_len.sample(source.rng)))
            out = source.output_len.sample(source.rng)
        if max_len is not None and isinstance(prompt, list) and len(prompt) + out > max_len and specs:
            break
        specs.append(RequestSpec(prompt, out, session=sid, turn=turn, reply=source.ids(out)))
    return specs


def agent_sessions(cfg: BenchConfig, max_len: int | None = None) -> Iterator[list[RequestSpec]]:
    """Endless agent sessions ``s0``, ``s1``, ... (ids unique per seed, sent as the ``user`` field)."""
    source = PromptSource(cfg)
    n = 0
    while True:
        yield agent_session(source, f"bench-{cfg.seed}-s{n}", cfg.turns, max_len)
        n += 1
