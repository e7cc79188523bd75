"""OpenAI-compatible request bodies (pydantic, strict types) and OpenAI's error format.

Bodies are validated straight from the raw JSON bytes in strict mode: ``"max_tokens": "5"`` is a type
error, as it is for OpenAI, rather than a silent coercion. Fields we do not know pass (one warning per name,
see server/fields.py), except known output-changing ones we do not support: those get a 400.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qserve.errors import QServeError
from qserve.types import SamplingParams, StructuredOutputsParams

MAX_CHOICES = 256  # prompts x n in one request
MAX_BODY_BYTES = 4 << 20  # request bodies past this get 413 (the single server and a --replicas front)

# status -> (OpenAI error type, default code)
_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "queue_full"),
    500: ("server_error", None),
    503: ("service_unavailable", "server_not_ready"),
}

# What a field must be, for type errors on union-typed fields (pydantic lists one error per member).
_TYPE_HINTS = {
    "prompt": "a string, an array of strings, an array of token ids or an array of token-id arrays",
    "stop": "a string or an array of strings",
    "messages": "an array of {role, content} objects",
}


class APIError(Exception):
    """An error answered to the client as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code if code is not None else _ERROR_KINDS.get(status, ("", None))[1]
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = _ERROR_KINDS.get(status, ("invalid_request_error" if status < 500 else "server_error", None))
    code = code if code is not None else kind[1]
    return {"error": {"message": message, "type": kind[0], "param": param, "code": code}}


def validation_error(e: ValidationError) -> APIError:
    """The first problem of a pydantic ValidationError as one 400 with the offending field as ``param``."""
    err = e.errors()[0]
    if err["type"] == "json_invalid":
        return APIError(400, f"malformed JSON body: {err['msg'].removeprefix('Invalid JSON: ')}")
    loc = [str(p) for p in err["loc"]]
    if not loc:
        return APIError(400, "the request body must be a JSON object")
    field = loc[0]
    if field in _TYPE_HINTS and err["type"] != "missing" and len(e.errors()) > 1:
        return APIError(400, f"'{field}' must be {_TYPE_HINTS[field]}", param=field)
    path = ".".join(p for p in loc if not p.startswith(("list[", "str", "int")))
    return APIError(400, f"'{path}': {err['msg']}", param=field)


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool | None = False


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None  # always enforced: the output is constrained to the schema either way


class ResponseFormat(_Body):
    """OpenAI's ``response_format``: ``text``, ``json_object`` or ``json_schema``."""

    type: str
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(_Body):
    """vLLM's ``structured_outputs`` extra body (exactly one of these)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class FunctionDef(_Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: str = "function"
    function: FunctionDef


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: str = "function"
    function: NamedFunction


class FunctionCallIn(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Body):
    id: str | None = None
    type: str = "function"
    function: FunctionCallIn


class SamplingFields(_Body):
    """Fields both endpoints share; None means "the default" (some clients send explicit nulls)."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool | None = False  # vLLM extension: keep generating past EOS (benchmarks)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    min_p: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    skip_special_tokens: bool | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names for structured_outputs
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted, ignored: xgrammar serves every grammar
    # change no output
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    priority: int | None = None

    def check(self, model_name: str) -> int:
        """Model name (404), unsupported options, n and seed (400); returns n."""
        from qserve.server.fields import check_unknown_fields

        if self.model is not None and self.model != model_name:
            raise APIError(
                404, f"The model `{self.model}` does not exist.", param="model", code="model_not_found"
            )
        check_unknown_fields(self.model_extra or {})
        n = 1 if self.n is None else self.n
        if not 1 <= n <= MAX_CHOICES:
            raise APIError(400, f"'n' must be between 1 and {MAX_CHOICES}, got {n}", param="n")
        if self.seed is not None and not -(1 << 63) <= self.seed < (1 << 64) - MAX_CHOICES:
            raise APIError(400, "'seed' must be a 64-bit integer", param="seed")
        return n

    def sampling_params(
        self,
        max_tokens: int,
        i: int,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        structured: StructuredOutputsParams | None = None,
    ) -> SamplingParams:
        """The engine's parameters for choice ``i``: with a seed, choice i samples with seed + i."""
        try:
            bias = {int(k): v for k, v in (self.logit_bias or {}).items()}
        except ValueError:
            raise APIError(400, "'logit_bias' keys must be token ids", param="logit_bias") from None
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p,
                top_k=-1 if self.top_k is None else self.top_k,
                min_p=self.min_p or 0.0,
                min_tokens=self.min_tokens or 0,
                presence_penalty=self.presence_penalty or 0.0,
                frequency_penalty=self.frequency_penalty or 0.0,
                repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
                logit_bias=bias or None,
                bad_words=self.bad_words,
                seed=None if self.seed is None else (self.seed + i) % (1 << 64),
                stop=self.stop,
                stop_token_ids=self.stop_token_ids,
                ignore_eos=bool(self.ignore_eos),
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=True if self.skip_special_tokens is None else self.skip_special_tokens,
                structured_outputs=structured,
            )
        except QServeError as e:
            raise APIError(400, str(e), param=e.param) from None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


ChatRole = Literal["system", "developer", "user", "assistant", "tool", "function"]  # OpenAI's roles


class ChatMessage(_Body):
    role: ChatRole
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


def check_length(num_prompt: int, max_tokens: int, max_model_len: int, param: str) -> None:
    """400 for a negative max_tokens, an empty prompt, or prompt + max_tokens over max_model_len."""
    if max_tokens < 0:
        raise APIError(400, f"'max_tokens' must be at least 0, got {max_tokens}", param="max_tokens")
    if num_prompt == 0:
        raise APIError(400, "the prompt is empty", param=param)
    if num_prompt + max_tokens > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{num_prompt + max_tokens} tokens ({num_prompt} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.",
            param=param,
        )


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
