"""``POST /tokenize`` and ``POST /detokenize`` in vLLM's request and response shapes.

/tokenize takes either ``prompt`` (a completion prompt; ``add_special_tokens`` defaults to true) or
``messages`` (rendered with the chat template exactly as /v1/chat/completions renders them, the
generation prompt added by default). It answers ``{"count", "max_model_len", "tokens", "token_strs"}``;
``token_strs`` (each token's own text) only with ``return_token_strs: true``, else null.
/detokenize takes ``{"tokens": [...]}`` and answers ``{"prompt": text}``.
"""

from __future__ import annotations

from typing import Any

from qserve.server.protocol import APIError, ChatMessage, _Body
from qserve.server.serving import chat_text
from qserve.server.tools import template_messages


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # default: true with prompt, false with messages (as vLLM)
    add_generation_prompt: bool | None = True  # messages only
    return_token_strs: bool | None = False


class TokenizeResponse(_Body):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(_Body):
    prompt: str


def check_model(model: str | None, served: str) -> None:
    if model is not None and model != served:
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def tokenize(req: TokenizeRequest, tokenizer: Any, max_model_len: int) -> dict[str, Any]:
    """Run on the tokenizer pool (never on the asyncio loop)."""
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of 'prompt' and 'messages'", param="prompt")
    if req.messages is not None:
        if not req.messages:
            raise APIError(400, "'messages' must not be empty", param="messages")
        gen = req.add_generation_prompt is not False
        text, templated = chat_text(tokenizer, template_messages(req.messages), generation_prompt=gen)
        special = bool(req.add_special_tokens) if req.add_special_tokens is not None else not templated
    else:
        assert req.prompt is not None
        text = req.prompt
        special = req.add_special_tokens is not False
    ids = [int(t) for t in tokenizer.encode(text, add_special_tokens=special)]
    strs = tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(req: DetokenizeRequest, tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    if not all(0 <= t < vocab_size for t in req.tokens):
        raise APIError(400, f"token ids must be in [0, {vocab_size})", param="tokens")
    return {"prompt": str(tokenizer.decode(req.tokens))}
