"""OpenAI completions and chat completions over the engine thread: body -> engine requests -> JSON or SSE.

Tokenization (and chat-template rendering, and formatting long logprob lists) runs on a one-thread pool
with its own tokenizer copy, so neither the asyncio loop nor the engine thread waits on it.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from qserve.server.engine_thread import (
    Delta,
    DrainingError,
    EngineClient,
    EngineRequest,
    QueueFullError,
    RequestGroup,
)
from qserve.server.fields import checked, structured_spec
from qserve.server.formatting import Choice, TokenTexts, chat_logprobs, completion_logprobs
from qserve.server.metrics import ServerMetrics
from qserve.server.protocol import (
    MAX_CHOICES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    check_length,
    usage,
)
from qserve.server.tools import ToolStreamer, final_message, template_messages, tool_setup
from qserve.types import SamplingParams, StructuredOutputsParams

T = TypeVar("T")


class EngineStreamResponse(StreamingResponse):
    """A StreamingResponse that aborts its engine requests however the response ends (client gone too)."""

    def __init__(self, content: AsyncIterator[str], group: RequestGroup):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.group = group

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.group.abort()


def record_usage(request: Request, prompt_tokens: int, choices: list[Choice]) -> None:
    """Leave the token counts for the access log (qserve.server.access), which reads them at the end."""
    info = request.scope.get("qserve")
    if info is not None:
        info["prompt_tokens"] = prompt_tokens
        info["choices"] = choices


def stops(params: SamplingParams) -> list[str]:
    return [params.stop] if isinstance(params.stop, str) else list(params.stop or [])


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def chat_text(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    generation_prompt: bool = True,
) -> tuple[str, bool]:
    """The text a chat renders to, and whether the tokenizer's chat template made it (then the text carries
    its own special tokens). Without a template: a plain ``role: content`` transcript ending in
    ``assistant:`` (with ``generation_prompt``), which the model can continue (it cannot show tools: a 400
    then)."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # jinja raises TemplateError (e.g. roles out of order) and friends
            raise APIError(400, f"chat template error: {e}", param="messages") from None
        return str(text), True
    if tools:
        raise APIError(400, "this model has no chat template to render 'tools' with", param="tools")
    transcript = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
    return transcript + ("assistant:" if generation_prompt else ""), False


def render_chat(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    """A chat's prompt token ids (see chat_text)."""
    text, templated = chat_text(tokenizer, messages, tools)
    return list(tokenizer.encode(text, add_special_tokens=not templated))


class OpenAIServing:
    def __init__(
        self,
        thread: EngineClient,
        tokenizer: Any,
        served_model_name: str,
        max_model_len: int,
        vocab_size: int,
        metrics: ServerMetrics,
        tool_call_parser: str | None = None,
    ):
        self.tool_call_parser = tool_call_parser
        self.thread = thread
        self.tokenizer = tokenizer
        self.model_name = served_model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.metrics = metrics
        self.token_text = TokenTexts(tokenizer)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qserve-tokenize")

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _submit(self, reqs: list[EngineRequest]) -> RequestGroup:
        try:
            return self.thread.submit(reqs)
        except QueueFullError as e:
            raise APIError(429, f"server busy: {e}; retry later", headers={"Retry-After": "1"}) from None
        except DrainingError as e:
            raise APIError(503, str(e)) from None

    # ------------------------------------------------------------------ /v1/completions
    async def completions(self, req: CompletionRequest, request: Request, arrival: float) -> Response:
        n = req.check(self.model_name)
        if req.best_of is not None and req.best_of != n:
            raise APIError(400, "'best_of' other than n is not supported", param="best_of")
        if req.suffix:
            raise APIError(400, "'suffix' is not supported", param="suffix")
        echo = bool(req.echo)
        prompts = self._prompt_list(req.prompt)
        if len(prompts) * n > MAX_CHOICES:
            raise APIError(400, f"at most {MAX_CHOICES} prompts x n per request", param="prompt")
        spec = await self._structured(req, None)
        encoded = await self.off_loop(self._encode, prompts, echo)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        for _, ids in encoded:
            check_length(len(ids), max_tokens, self.max_model_len, "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        lp = req.logprobs
        reqs, choices = [], []
        for p, (text, ids) in enumerate(encoded):
            for i in range(n):
                params = req.sampling_params(
                    max_tokens, i, logprobs=lp, prompt_logprobs=lp if echo else None, structured=spec
                )
                reqs.append(EngineRequest(f"{rid}-{p}-{i}", ids, params))
                choices.append(Choice(ids, text if echo else "", stops(params), echo))
        group = self._submit(reqs)
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model_name}
        num_prompt = sum(len(ids) for _, ids in encoded)
        record_usage(request, num_prompt, choices)
        if req.stream:
            inc = bool(req.stream_options and req.stream_options.include_usage)
            gen = self._stream(group, choices, head, arrival, num_prompt, inc, lp is not None, chat=False)
            return EngineStreamResponse(gen, group)
        await self._collect(group, choices, request, arrival)
        out = []
        for i, c in enumerate(choices):
            logprobs = (
                await self.off_loop(completion_logprobs, c, self.token_text) if lp is not None else None
            )
            out.append(
                {"index": i, "text": c.echo_text + c.text, "logprobs": logprobs, "finish_reason": c.finish}
            )
        completion = sum(c.num_output_tokens for c in choices)
        return JSONResponse({**head, "choices": out, "usage": usage(num_prompt, completion)})

    def _prompt_list(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        if isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]

    def _encode(self, prompts: list[str | list[int]], echo: bool) -> list[tuple[str, list[int]]]:
        out = []
        for p in prompts:
            if isinstance(p, str):
                out.append((p, list(self.tokenizer.encode(p))))
            else:
                if not all(0 <= t < self.vocab_size for t in p):
                    raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size})", param="prompt")
                out.append((str(self.tokenizer.decode(p)) if echo else "", list(p)))
        return out

    # ------------------------------------------------------------------ /v1/chat/completions
    async def chat(self, req: ChatCompletionRequest, request: Request, arrival: float) -> Response:
        n = req.check(self.model_name)
        if not req.messages:
            raise APIError(400, "'messages' must not be empty", param="messages")
        messages = template_messages(req.messages)
        setup = tool_setup(req, self.tool_call_parser)
        spec = await self._structured(req, setup.spec)
        ids = await self.off_loop(self._render_chat, messages, setup.tools)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = max(self.max_model_len - len(ids), 0)
        check_length(len(ids), max_tokens, self.max_model_len, "messages")
        top = (req.top_logprobs or 0) if req.logprobs else None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        reqs, choices = [], []
        for i in range(n):
            params = req.sampling_params(max_tokens, i, logprobs=top, structured=spec)
            reqs.append(EngineRequest(f"{rid}-{i}", ids, params))
            choices.append(Choice(ids, "", stops(params), False))
            if setup.parser is not None:
                choices[-1].tools = ToolStreamer(setup)
        group = self._submit(reqs)
        head = {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": self.model_name}
        record_usage(request, len(ids), choices)
        if req.stream:
            inc = bool(req.stream_options and req.stream_options.include_usage)
            head["object"] = "chat.completion.chunk"
            gen = self._stream(group, choices, head, arrival, len(ids), inc, top is not None, chat=True)
            return EngineStreamResponse(gen, group)
        await self._collect(group, choices, request, arrival)
        out = []
        for i, c in enumerate(choices):
            logprobs = (
                await self.off_loop(chat_logprobs, c.logprobs, self.token_text) if top is not None else None
            )
            message, finish = final_message(c.text, c.finish, setup)
            out.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
        completion = sum(c.num_output_tokens for c in choices)
        return JSONResponse({**head, "choices": out, "usage": usage(len(ids), completion)})

    def _render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[int]:
        return render_chat(self.tokenizer, messages, tools)

    async def _structured(
        self, req: SamplingFields, imposed: StructuredOutputsParams | None
    ) -> StructuredOutputsParams | None:
        """The request's output constraint (``imposed`` by its tool choice, or asked for), parsed off the
        loop: 400 with the grammar parser's message when it does not parse."""
        spec = structured_spec(req)
        if imposed is not None:
            if spec is not None:
                raise APIError(
                    400,
                    "'tool_choice' required or named cannot be combined with an output format",
                    param="tool_choice",
                )
            return await self.off_loop(checked, imposed, "tools")
        if spec is None:
            return None
        return await self.off_loop(checked, *spec)

    # ------------------------------------------------------------------ running a group
    def _finish(self, c: Choice, d: Delta, arrival: float) -> None:
        if d.error is not None:
            raise APIError(500 if d.error.startswith("engine error") else 400, d.error)
        if c.token_gap is not None:
            self.metrics.observe_tokens(c.token_gap, len(d.token_ids))
        if d.finished:
            self.metrics.observe(arrival, c.first_token_time, time.monotonic(), c.num_output_tokens)

    async def _collect(
        self, group: RequestGroup, choices: list[Choice], request: Request, arrival: float
    ) -> None:
        """Run the group to completion; if the client goes away, abort it (freeing its KV blocks)."""

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.interrupt()

        watcher = asyncio.ensure_future(watch())
        try:
            while not group.done:
                d = await group.next()
                if d.index < 0:
                    raise APIError(400, "client disconnected")
                choices[d.index].update(d)
                self._finish(choices[d.index], d, arrival)
        finally:
            watcher.cancel()
            group.abort()

    async def _stream(
        self,
        group: RequestGroup,
        choices: list[Choice],
        head: dict[str, Any],
        arrival: float,
        num_prompt: int,
        include_usage: bool,
        want_logprobs: bool,
        chat: bool,
    ) -> AsyncIterator[str]:
        try:
            if chat:
                for i in range(len(choices)):
                    delta = {"role": "assistant", "content": ""}
                    yield sse(
                        {
                            **head,
                            "choices": [
                                {"index": i, "delta": delta, "logprobs": None, "finish_reason": None}
                            ],
                        }
                    )
            while not group.done:
                d = await group.next()
                c = choices[d.index]
                c.update(d)
                try:
                    self._finish(c, d, arrival)
                except APIError as e:
                    yield sse(e.body())
                    break
                text, tokens = c.take(d.finished)
                if not (text or d.finished or d.token_ids):
                    continue  # one chunk per step that made tokens, even when their text is held back
                finish = c.finish
                if chat:
                    lp = chat_logprobs(tokens, self.token_text) if want_logprobs else None
                    if c.tools is not None:
                        delta = c.tools.feed(text, d.finished)
                        if d.finished and c.tools.made_calls and finish == "stop":
                            finish = "tool_calls"
                        if not delta and not d.finished and not want_logprobs:
                            continue
                    else:
                        delta = {"content": text} if text or not d.finished else {}
                    piece: dict[str, Any] = {"index": d.index, "delta": delta}
                else:
                    lp = completion_logprobs(c, self.token_text, tokens) if want_logprobs else None
                    piece = {"index": d.index, "text": text}
                yield sse({**head, "choices": [{**piece, "logprobs": lp, "finish_reason": finish}]})
            if include_usage:
                completion = sum(c.num_output_tokens for c in choices)
                yield sse({**head, "choices": [], "usage": usage(num_prompt, completion)})
            yield "data: [DONE]\n\n"
        finally:
            group.abort()
