"""Boundary dataclasses of the public API: what goes into the engine and what comes out."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from qserve.errors import QServeError


@dataclass
class StructuredOutputsParams:
    """A grammar the output must follow (vLLM's ``structured_outputs``); set exactly one field.

    ``json``: a JSON schema (dict or its JSON text); ``json_object``: any JSON object; ``regex``: a regular
    expression; ``choice``: one of these strings exactly; ``grammar``: an EBNF grammar (GBNF dialect, root rule
    ``root``). JSON outputs are held to one layout (no free whitespace between tokens), so a sampling model
    cannot pad a JSON output with whitespace until it runs out of tokens.
    """

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        kinds = self.kinds()
        if len(kinds) != 1:
            raise QServeError(
                "structured_outputs takes exactly one of json, json_object, regex, choice, grammar"
                + (f" (got {', '.join(kinds)})" if kinds else "")
            )
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise QServeError("structured_outputs.choice must be a non-empty list of strings")

    def kinds(self) -> list[str]:
        return [
            k
            for k in ("json", "json_object", "regex", "choice", "grammar")
            if getattr(self, k) not in (None, False)
        ]

    def key(self) -> str:
        """A canonical text of the spec: the grammar cache's key (equal specs share one compiled grammar)."""
        kind = self.kinds()[0]
        value = getattr(self, kind)
        if kind == "json" and isinstance(value, str):
            with contextlib.suppress(ValueError):  # a bad one is reported by the grammar check
                value = json.loads(value)
        return json.dumps([kind, value], sort_keys=True, separators=(",", ":"))


@dataclass
class SamplingParams:
    """How to sample one request; mirrors vLLM's offline API.

    temperature 0 means greedy. ``seed`` gives the request its own generator, so its samples do not
    depend on what else is in the batch. ``stop`` strings end generation and are cut from the text.
    ``logprobs`` N returns the sampled token's logprob and the top-N alternatives per step.
    ``prompt_logprobs`` N does the same for the prompt's own tokens (used by echo / evaluation).

    Logits processing follows vLLM's formulas and order: grammar mask, ``bad_words`` (token sequences
    banned at their last token), ``min_tokens`` (EOS and ``stop_token_ids`` banned, stop strings not
    checked, until that many tokens), ``logit_bias`` (added), then penalties over the raw logits:
    ``repetition_penalty`` r on every token seen in prompt or output (logit / r if > 0 else logit * r),
    ``frequency_penalty`` f * count and ``presence_penalty`` p * [count > 0] over output tokens (subtracted);
    then temperature, ``min_p`` (drop tokens below min_p x the top probability), top-k, top-p.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    bad_words: list[str] | None = None
    structured_outputs: StructuredOutputsParams | None = None
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
        self.bad_words = [w for w in (self.bad_words or []) if w.strip()]
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise QServeError(
                f"max_tokens must be a non-negative integer, got {self.max_tokens!r}", "max_tokens"
            )
        if not 0.0 <= self.temperature <= 100.0:
            raise QServeError(f"temperature must be in [0, 100], got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise QServeError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            raise QServeError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}", "top_k")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and not 0 <= n <= 20:
                raise QServeError(f"{name} must be between 0 and 20, got {n}", name)
        if not 0.0 <= self.min_p <= 1.0:
            raise QServeError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise QServeError(
                f"min_tokens must be a non-negative integer, got {self.min_tokens!r}", "min_tokens"
            )
        if self.min_tokens > self.max_tokens:
            raise QServeError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})", "min_tokens"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise QServeError(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise QServeError(
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}", "repetition_penalty"
            )
        for tok, bias in (self.logit_bias or {}).items():
            if not isinstance(tok, int) or tok < 0:
                raise QServeError(
                    f"logit_bias keys must be token ids (non-negative integers), got {tok!r}", "logit_bias"
                )
            if not -100.0 <= bias <= 100.0:
                raise QServeError(
                    f"logit_bias values must be in [-100, 100], got {bias} for token {tok}", "logit_bias"
                )
        if any(t < 0 for t in self.stop_token_ids or ()):
            raise QServeError("stop_token_ids must be non-negative token ids", "stop_token_ids")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def processes_logits(self) -> bool:
        """Whether any logits processor beyond temperature / top-k / top-p applies (the fast path skips)."""
        return bool(
            self.min_p > 0
            or self.min_tokens
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.bad_words
        )


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
