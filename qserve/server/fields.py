"""Which request fields pass, which are refused, and the structured-output spec a request asks for.

Policy: a field that changes no output may pass; a known field that would change the output and that qserve
does not support gets a 400 (never silently ignored); a field nobody told us about passes, with one warning
per field name for the server's lifetime (clients send many vendor extras).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from qserve.errors import QServeError
from qserve.server.protocol import APIError
from qserve.types import StructuredOutputsParams

if TYPE_CHECKING:
    from qserve.server.protocol import SamplingFields

logger = logging.getLogger("qserve.server")

# Fields of OpenAI's, vLLM's, SGLang's or llama.cpp's APIs that change what is generated, and that qserve
# does not implement: refused with a 400.
UNSUPPORTED_FIELDS = frozenset(
    {
        # OpenAI
        "functions",
        "function_call",
        "audio",
        "modalities",
        "prediction",
        "reasoning_effort",
        "web_search_options",
        "verbosity",
        # vLLM
        "use_beam_search",
        "length_penalty",
        "include_stop_str_in_output",
        "allowed_token_ids",
        "truncate_prompt_tokens",
        "prompt_logprobs",
        "spaces_between_special_tokens",
        "logits_processors",
        "structural_tag",
        "guided_whitespace_pattern",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "chat_template_kwargs",
        "documents",
        "vllm_xargs",
        "echo",  # on chat (vLLM: repeat the last message); completions implement it
        "return_tokens_as_token_ids",
        "thinking_token_budget",
        # llama.cpp / SGLang sampling knobs
        "typical_p",
        "top_a",
        "tfs_z",
        "mirostat",
        "mirostat_tau",
        "mirostat_eta",
        "repeat_penalty",
        "repeat_last_n",
        "penalize_nl",
        "dynatemp_range",
        "dynatemp_exponent",
        "dry_multiplier",
        "xtc_probability",
        "xtc_threshold",
        "n_probs",
        "grammar",
        "json_schema",
        "regex",
        "ebnf",
    }
)

_warned: set[str] = set()
_warned_lock = threading.Lock()


def check_unknown_fields(extra: dict[str, Any]) -> None:
    """400 on a known unsupported output-changing field; one warning per other unknown field name."""
    for name, value in extra.items():
        if name in UNSUPPORTED_FIELDS:
            if value is None or value is False:
                continue  # an explicit null / false asks for the default: nothing changes
            raise APIError(400, f"'{name}' is not supported by this server", param=name)
        with _warned_lock:
            if name in _warned:
                continue
            _warned.add(name)
        logger.warning("ignoring unknown request field %r (it is not known to change the output)", name)


def _spec(field: str, **kw: Any) -> StructuredOutputsParams:
    try:
        return StructuredOutputsParams(**kw)
    except QServeError as e:
        raise APIError(400, str(e), param=field) from None


def structured_spec(req: SamplingFields) -> tuple[StructuredOutputsParams, str] | None:
    """The grammar a request's ``response_format``, ``structured_outputs`` or ``guided_*`` fields ask for,
    with the field's name (400 when they conflict or are malformed). Parsing the grammar is :func:`checked`'s."""
    found: list[tuple[str, StructuredOutputsParams]] = []
    rf = req.response_format
    if rf is not None:
        if rf.type == "json_object":
            found.append(("response_format", _spec("response_format", json_object=True)))
        elif rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise APIError(
                    400, "'response_format.json_schema.schema' is required", param="response_format"
                )
            found.append(("response_format", _spec("response_format", json=rf.json_schema.schema_)))
        elif rf.type != "text":
            raise APIError(
                400,
                f"'response_format.type' must be text, json_object or json_schema, got {rf.type!r}",
                param="response_format",
            )
    so = req.structured_outputs
    if so is not None:
        kw = {
            "json": so.json_,
            "regex": so.regex,
            "choice": so.choice,
            "grammar": so.grammar,
            "json_object": bool(so.json_object),
        }
        found.append(("structured_outputs", _spec("structured_outputs", **kw)))
    for name, key in (
        ("guided_json", "json"),
        ("guided_regex", "regex"),
        ("guided_choice", "choice"),
        ("guided_grammar", "grammar"),
    ):
        value = getattr(req, name)
        if value is not None:
            found.append((name, _spec(name, **{key: value})))
    if len(found) > 1:
        names = ", ".join(f"'{n}'" for n, _ in found)
        raise APIError(400, f"only one output constraint per request (got {names})", param=found[1][0])
    return (found[0][1], found[0][0]) if found else None


def checked(spec: StructuredOutputsParams, param: str) -> StructuredOutputsParams:
    """``spec`` once its grammar parses (400 with the parser's message otherwise). Run off the event loop."""
    from qserve.engine.structured import check_spec

    try:
        check_spec(spec)
    except QServeError as e:
        raise APIError(400, str(e), param=param) from None
    return spec
