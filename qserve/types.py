"""Boundary dataclasses of the public API: what goes into the engine and what comes out."""

from __future__ import annotations

from dataclasses import dataclass, field

from qserve.errors import QServeError


@dataclass
class SamplingParams:
    """How to sample one request; mirrors vLLM's offline API.

    temperature 0 means greedy. ``seed`` gives the request its own generator, so its samples do not
    depend on what else is in the batch. ``stop`` strings end generation and are cut from the text.
    ``logprobs`` N returns the sampled token's logprob and the top-N alternatives per step.
    ``prompt_logprobs`` N does the same for the prompt's own tokens (used by echo / evaluation).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise QServeError(f"max_tokens must be a non-negative integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise QServeError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise QServeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise QServeError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= 20:
                raise QServeError(f"{name} must be between 0 and 20, got {n}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5


@dataclass
class TokenLogprob:
    """Logprob of one chosen token, with the top alternatives at that step (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class RequestOutput:
    """The state of one request after an engine step (``finished`` says whether it is final).

    ``text``/``token_ids`` hold the whole generated output so far; ``delta_text``/``delta_token_ids``
    what this step added (streaming). ``text`` never ends in half a UTF-8 character.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_cached_tokens: int = 0
