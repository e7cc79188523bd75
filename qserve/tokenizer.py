"""Tokenizer loading and incremental detokenization."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from qserve.errors import QServeError


def load_tokenizer(path: Path) -> Any:
    """A transformers fast tokenizer from a local directory (never downloads)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types for a missing or broken tokenizer
        raise QServeError(
            f"cannot load a tokenizer from {path}: {type(e).__name__}: {e}".splitlines()[0]
        ) from None
    # Whole texts are tokenized here (eval, AWQ calibration) and then split into windows; the length
    # limit that matters is max_model_len, enforced per request. Without this, transformers warns
    # "Token indices sequence length is longer than the specified maximum" on every long text.
    tok.model_max_length = sys.maxsize
    return tok


class IncrementalDetokenizer:
    """Turns output token ids into text a step at a time, never emitting half a character.

    It decodes a short sliding window rather than the whole output: ``prefix`` is text already emitted
    that gives the next tokens their context (e.g. a leading-space marker), and new text is emitted only
    once it no longer ends in U+FFFD, i.e. once a multi-byte character is complete.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Seed the window with the prompt's tail so the first output token decodes in context.
        self.ids: list[int] = list(prompt_token_ids[-6:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens))

    def step(self, new_token_ids: list[int]) -> str:
        """Add tokens; return the text they complete (possibly empty)."""
        self.ids.extend(new_token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta
