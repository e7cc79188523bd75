"""Constrained decoding with xgrammar: grammar checks, off-thread compilation with a cache, per-sequence state.

Why xgrammar: its token-mask is precomputed per grammar state (context-independent tokens cached at compile
time), so the per-step cost is a bitmask fill of microseconds; it compiles JSON schema, regex and EBNF, is
what vLLM and SGLang default to, and ships a manylinux wheel for our Python with no Rust toolchain needed.

Flow: the HTTP side (or ``LLM.generate``) calls :func:`check_spec`, which parses the spec without the
tokenizer and raises ``QServeError`` with the parser's message. The engine's :class:`GrammarCache` compiles
against the tokenizer on its own worker thread, keyed by the spec's canonical text, so equal specs compile
once. A sequence waits in the queue (the scheduler skips it) until its :class:`GrammarState` is ready; each
step :func:`fill_bitmask` writes the allowed tokens of every constrained row, and after a token is accepted
the engine calls :meth:`GrammarState.accept` (the step loop's token-resolution point).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from qserve.errors import QServeError
from qserve.types import StructuredOutputsParams

if TYPE_CHECKING:
    from qserve.engine.sequence import Sequence

logger = logging.getLogger("qserve")
CACHE_SIZE = 512  # compiled grammars kept (LRU by spec)
JSON_OBJECT = '{"type": "object"}'
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar's "[12:00:00] /path/file.cc:42: " prefix


def _xgr() -> Any:
    try:
        import xgrammar
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise QServeError("structured outputs need the xgrammar package (pip install xgrammar)") from e
    return xgrammar


def _schema_text(spec: StructuredOutputsParams) -> str:
    value = spec.json
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise QServeError(f"invalid JSON schema: not JSON: {e}") from None
    if not isinstance(value, dict | bool):
        raise QServeError("invalid JSON schema: a schema must be a JSON object")
    return json.dumps(value)


def _choice_regex(choices: list[str]) -> str:
    import re

    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def _grammar(spec: StructuredOutputsParams) -> Any:
    """The spec as an ``xgrammar.Grammar`` (parsing only: no tokenizer needed). Raises ``QServeError``."""
    xgr = _xgr()
    kind = spec.kinds()[0]
    try:
        if kind == "json":
            return xgr.Grammar.from_json_schema(_schema_text(spec), any_whitespace=False, strict_mode=True)
        if kind == "json_object":  # any JSON object (OpenAI's json_object), one layout like json schemas
            return xgr.Grammar.from_json_schema(JSON_OBJECT, any_whitespace=False, strict_mode=False)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec.regex)
        if kind == "choice":
            return xgr.Grammar.from_regex(_choice_regex(spec.choice or []))
        return xgr.Grammar.from_ebnf(spec.grammar or "")
    except QServeError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError / ValueError with the parser's message
        what = {"json": "JSON schema", "json_object": "JSON", "regex": "regex", "choice": "choice"}.get(
            kind, "grammar"
        )
        raise QServeError(f"invalid {what}: {_LOG_PREFIX.sub('', str(e).strip())}") from None


def check_spec(spec: StructuredOutputsParams) -> None:
    """Raise ``QServeError`` with the parser's message if the spec does not parse."""
    _grammar(spec)


class GrammarCache:
    """Compiles specs against one tokenizer on a worker thread; equal specs share one compile (LRU)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]):
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_ids = sorted(stop_token_ids)
        self._compiler: Any = None
        self._lock = threading.Lock()
        self._futures: OrderedDict[str, Future[Any]] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qserve-grammar")
        self.compile_seconds: list[float] = []  # per compile (not per cache hit), newest last

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            xgr = _xgr()
            info = xgr.TokenizerInfo.from_huggingface(
                self._tokenizer, vocab_size=self._vocab_size, stop_token_ids=self._stop_ids or None
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        import time

        t0 = time.perf_counter()
        compiler = self._get_compiler()
        compiled = compiler.compile_grammar(_grammar(spec))
        self.compile_seconds.append(time.perf_counter() - t0)
        del self.compile_seconds[:-1000]
        return compiled

    def submit(self, spec: StructuredOutputsParams) -> Future[Any]:
        """The compiled grammar for ``spec``, compiled off this thread (a cache hit is already done)."""
        key = spec.key()
        with self._lock:
            fut = self._futures.get(key)
            if fut is not None and not (fut.done() and fut.exception() is not None):
                self._futures.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, spec)
            self._futures[key] = fut
            while len(self._futures) > CACHE_SIZE:
                self._futures.popitem(last=False)
            return fut

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class GrammarState:
    """One sequence's grammar: its compile future, then its matcher (advanced once per accepted token).

    Preemption by recompute keeps the sequence's tokens, so the matcher stays where it is.
    """

    def __init__(self, future: Future[Any]):
        self.future = future
        self.matcher: Any = None
        self.error: str | None = None
        self.ready = False

    def poll(self) -> bool:
        """Whether compilation has finished (successfully or not: see ``error``); builds the matcher."""
        if self.ready:
            return True
        if not self.future.done():
            return False
        try:
            compiled = self.future.result()
            self.matcher = _xgr().GrammarMatcher(compiled)
        except Exception as e:
            self.error = f"grammar compilation failed: {e}"
        self.ready = True
        return True

    def accept(self, token: int) -> bool:
        """Advance past ``token``; False if the grammar does not allow it (it then stays put)."""
        return bool(self.matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        return bool(self.matcher is not None and self.matcher.is_terminated())


def fill_bitmask(seqs: list[Sequence], vocab_size: int) -> torch.Tensor | None:
    """(S, ceil(V/32)) int32 bitmask, all-allowed except the rows of constrained sequences; None if none is."""
    rows = [i for i, s in enumerate(seqs) if s.grammar is not None and s.grammar.matcher is not None]
    if not rows:
        return None
    xgr = _xgr()
    bitmask = xgr.allocate_token_bitmask(len(seqs), vocab_size)  # (S, W) int32, all bits set
    for i in rows:
        grammar = seqs[i].grammar
        assert grammar is not None
        grammar.matcher.fill_next_token_bitmask(bitmask, i)
    return bitmask


_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """-inf on (S, V) ``logits`` where the bitmask's bit is 0, in place, for the whole batch at once.

    On CUDA: xgrammar's kernel. On CPU: bits unpacked with one shift-and-mask and one masked_fill, which
    measured 6x faster than xgrammar's CPU path on a 16 x 4096 batch (0.23 vs 1.4 ms, one thread).
    """
    if logits.device.type != "cpu":
        _xgr().apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True))
        return
    s, v = logits.shape
    # bit j of word w allows token 32 w + j (little-endian within each int32 word)
    allowed = ((bitmask[:, :, None] >> _SHIFTS) & 1).view(s, -1)[:, :v]  # (S, 32 W) -> (S, V)
    logits.masked_fill_(allowed == 0, float("-inf"))
