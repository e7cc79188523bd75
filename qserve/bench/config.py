"""What a benchmark run is: `BenchConfig` (one frozen dataclass, validated once) and `LengthDist`.

Length specs (prompt, output and agent user-turn lengths, in tokens):

- ``128``: always 128;
- ``64:256``: uniform integer in [64, 256], both ends included;
- ``normal:128,32``: normal with mean 128 and standard deviation 32, rounded, clipped to at least 1.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qserve.errors import QServeError

WORKLOADS = ("steady", "bursty", "closed", "agent")
ENDPOINTS = ("completions", "chat")


@dataclass(frozen=True)
class LengthDist:
    """A distribution of positive integer lengths; ``spec`` is the text it was parsed from."""

    kind: str  # "fixed" | "uniform" | "normal"
    a: float  # fixed value, uniform low, or normal mean
    b: float  # fixed value, uniform high, or normal standard deviation
    spec: str

    @classmethod
    def parse(cls, spec: str | int) -> LengthDist:
        """'128', '64:256' or 'normal:128,32'; raises QServeError with the accepted forms otherwise."""
        text = str(spec).strip()
        try:
            if text.startswith("normal:"):
                mean, std = (float(x) for x in text[len("normal:") :].split(","))
                if mean >= 1 and std >= 0 and math.isfinite(mean + std):
                    return cls("normal", mean, std, text)
            elif ":" in text:
                lo, hi = (int(x) for x in text.split(":"))
                if 1 <= lo <= hi:
                    return cls("uniform", lo, hi, text)
            elif int(text) >= 1:
                return cls("fixed", int(text), int(text), text)
        except ValueError:
            pass
        raise QServeError(
            f"bad length {text!r}: use N (fixed), LO:HI (uniform, 1 <= LO <= HI) or normal:MEAN,STD"
        )

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    @property
    def mean(self) -> float:
        return (self.a + self.b) / 2 if self.kind != "normal" else self.a


def parse_range(spec: str) -> tuple[int, int]:
    """'1:256' -> (1, 256): token ids are drawn from [LO, HI)."""
    try:
        lo, hi = (int(x) for x in spec.split(":"))
    except ValueError:
        lo, hi = 0, -1
    if not 0 <= lo < hi:
        raise QServeError(f"bad --vocab-range {spec!r}: use LO:HI with 0 <= LO < HI (ids in [LO, HI))")
    return lo, hi


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run against an OpenAI-compatible server at ``url``.

    Arrivals: ``steady`` is a Poisson process at ``rate`` requests/s; ``bursty`` the same during
    ``burst_on``-second phases separated by ``burst_off`` seconds of silence; ``closed`` keeps exactly
    ``concurrency`` requests in flight; ``agent`` starts multi-turn sessions at ``rate`` sessions/s
    (``rate=inf``: ``concurrency`` sessions at once). ``concurrency`` caps requests (agent: sessions) in flight
    for every workload. The run stops issuing at ``requests`` requests (agent: turns) or after ``duration``
    seconds, whichever comes first; requests in flight then finish.
    """

    url: str
    workload: str = "steady"
    concurrency: int = 32
    requests: int | None = None  # None with no duration: DEFAULT_REQUESTS
    duration: float | None = None  # seconds
    rate: float = 8.0  # requests/s (agent: sessions/s); inf = all at once
    burst_on: float = 2.0  # seconds of arrivals at `rate` (bursty)
    burst_off: float = 2.0  # seconds of silence between bursts (bursty)
    prompt_len: str = "64:256"  # LengthDist spec (agent: the first turn's prompt)
    output_len: str = "64"  # LengthDist spec; sent as max_tokens with ignore_eos
    user_len: str = "16:64"  # agent: new user tokens added by each later turn
    turns: int = 4  # agent: turns per session
    think_time: float = 1.0  # agent: seconds between a turn's end and the next turn's send (a tool runs)
    dataset: Path | None = None  # JSONL of {"prompt": str | [ids], "output_len": int}
    model: str | None = None  # None: the first id of GET /v1/models
    api_key: str | None = None
    endpoint: str = "completions"  # or "chat"
    seed: int = 0
    vocab_range: tuple[int, int] = (1, 256)  # synthetic token ids are drawn from [lo, hi)
    timeout: float = 600.0  # seconds per request
    metrics_interval: float = 0.5  # seconds between /metrics samples
    progress: bool = False
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request body

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise QServeError(f"URL must start with http:// or https://, got {self.url!r}")
        if self.workload not in WORKLOADS:
            raise QServeError(f"--workload must be one of {', '.join(WORKLOADS)}, got {self.workload!r}")
        if self.endpoint not in ENDPOINTS:
            raise QServeError(f"--endpoint must be completions or chat, got {self.endpoint!r}")
        checks = [
            (self.concurrency >= 1, "--concurrency must be at least 1"),
            (self.requests is None or self.requests >= 1, "--requests must be at least 1"),
            (self.duration is None or self.duration > 0, "--duration must be positive"),
            (self.rate > 0, "--rate must be positive (inf: all at once)"),
            (self.burst_on > 0 and self.burst_off >= 0, "--burst-on must be > 0 and --burst-off >= 0"),
            (self.turns >= 1, "--turns must be at least 1"),
            (self.think_time >= 0, "--think-time must be >= 0"),
            (self.timeout > 0 and self.metrics_interval > 0, "--timeout must be positive"),
            (0 <= self.vocab_range[0] < self.vocab_range[1], "bad vocab range"),
        ]
        for ok, message in checks:
            if not ok:
                raise QServeError(message)
        for spec in (self.prompt_len, self.output_len, self.user_len):
            LengthDist.parse(spec)
        if self.dataset is not None and not Path(self.dataset).is_file():
            raise QServeError(f"dataset file not found: {self.dataset}")

    @property
    def max_requests(self) -> int | None:
        """The request bound in force: ``requests``, or DEFAULT_REQUESTS when neither bound is given."""
        if self.requests is None and self.duration is None:
            return DEFAULT_REQUESTS
        return self.requests

    def public(self) -> dict[str, Any]:
        """The config as JSON-ready values, without the API key."""
        d = asdict(self)
        d["api_key"] = "***" if self.api_key else None
        d["dataset"] = str(self.dataset) if self.dataset else None
        d["vocab_range"] = list(self.vocab_range)
        d["rate"] = None if math.isinf(self.rate) else self.rate
        d["requests"] = self.max_requests
        return d


DEFAULT_REQUESTS = 64
