"""The FastAPI app: routes, API-key check, body-size limit, OpenAI-format errors, engine-thread lifespan.

Bodies are read and validated here (never by FastAPI's automatic 422 path), so every bad input is one 4xx
in OpenAI's ``{"error": {...}}`` format and nothing a client sends produces a 500. ``/openapi.json``
still documents each body's schema (qserve.server.openapi); the docs UI stays off.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from qserve import __version__
from qserve.config import resolve_model_path
from qserve.engine.llm_engine import LLMEngine
from qserve.server.access import RequestTrackerMiddleware, Tracker
from qserve.server.engine_thread import EngineClient, EngineThread
from qserve.server.logs import log_stats
from qserve.server.metrics import ServerMetrics
from qserve.server.openapi import install_openapi
from qserve.server.protocol import (
    MAX_BODY_BYTES,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    error_body,
    validation_error,
)
from qserve.server.serving import OpenAIServing
from qserve.server.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    check_model,
    detokenize,
    tokenize,
)
from qserve.tokenizer import load_tokenizer

logger = logging.getLogger("qserve.server")
B = TypeVar("B", bound=BaseModel)


def create_app(
    engine: LLMEngine | EngineClient,
    *,
    served_model_name: str,
    api_key: str | None = None,
    max_queue: int = 256,
    max_body_bytes: int = MAX_BODY_BYTES,
    access_log: bool = True,
    stats_interval: float = 10.0,
    tool_call_parser: str | None = None,
) -> FastAPI:
    """An app serving ``engine``: an LLMEngine (run on a thread of this process) or a started
    `EngineProcess`. The app starts the engine on startup and stops it (aborting whatever still runs) on
    shutdown. ``app.state.engine_thread.begin_drain()`` makes it refuse new work (503);
    ``app.state.tracker.inflight`` counts the requests in flight that were admitted before that.
    ``access_log``: one ``qserve.access`` line per request; ``stats_interval``: seconds between
    ``qserve.stats`` lines while busy (0: none). ``tool_call_parser`` names the parser of tool calls for
    ``tool_choice: auto`` (server/tool_parsers.py)."""
    thread: EngineClient = EngineThread(engine, max_queue) if isinstance(engine, LLMEngine) else engine
    info = thread.info
    metrics = ServerMetrics(lambda: thread.snapshot)
    thread.on_queue_times = metrics.observe_queue_times
    tracker = Tracker(metrics, lambda: thread.draining, access_log)
    # the HTTP side's own tokenizer copy: the engine's detokenizers never share one with it
    tokenizer = load_tokenizer(resolve_model_path(info.model))
    serving = OpenAIServing(
        thread, tokenizer, served_model_name, info.max_model_len, info.vocab_size, metrics, tool_call_parser
    )
    key = api_key.encode() if api_key else None
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        thread.start()
        stats = (
            asyncio.ensure_future(log_stats(lambda: thread.snapshot, stats_interval))
            if stats_interval > 0
            else None
        )
        try:
            yield
        finally:
            if stats is not None:
                stats.cancel()
            thread.begin_drain()
            await asyncio.to_thread(thread.stop)
            serving.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="qserve",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.engine_thread = thread
    app.state.metrics = metrics
    app.state.tracker = tracker

    def check_key(request: Request) -> None:
        if key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')")

    async def read_body(request: Request, model: type[B]) -> B:
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body_bytes:
            raise APIError(413, f"request body of {length} bytes is over the {max_body_bytes}-byte limit")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise APIError(413, f"request body is over the {max_body_bytes}-byte limit")
        try:
            return model.model_validate_json(bytes(body))
        except ValidationError as e:
            raise validation_error(e) from None

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse(error_body(500, f"internal error: {type(exc).__name__}"), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if not thread.is_alive():
            return JSONResponse(error_body(503, "the engine is not running"), status_code=503)
        if thread.draining:
            return JSONResponse(error_body(503, "shutting down (draining)"), status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_key(request)
        card = {
            "id": served_model_name,
            "object": "model",
            "created": created,
            "owned_by": "qserve",
            "root": info.model,
            "max_model_len": info.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrival = time.monotonic()
        check_key(request)
        body = await read_body(request, CompletionRequest)
        return await serving.completions(body, request, arrival)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrival = time.monotonic()
        check_key(request)
        body = await read_body(request, ChatCompletionRequest)
        return await serving.chat(body, request, arrival)

    @app.post("/tokenize", responses={200: {"model": TokenizeResponse}})
    async def tokenize_(request: Request) -> dict[str, Any]:
        check_key(request)
        body = await read_body(request, TokenizeRequest)
        check_model(body.model, served_model_name)
        return await serving.off_loop(tokenize, body, tokenizer, info.max_model_len)

    @app.post("/detokenize", responses={200: {"model": DetokenizeResponse}})
    async def detokenize_(request: Request) -> dict[str, Any]:
        check_key(request)
        body = await read_body(request, DetokenizeRequest)
        check_model(body.model, served_model_name)
        return await serving.off_loop(detokenize, body, tokenizer, info.vocab_size)

    install_openapi(
        app,
        {
            "/v1/completions": CompletionRequest,
            "/v1/chat/completions": ChatCompletionRequest,
            "/tokenize": TokenizeRequest,
            "/detokenize": DetokenizeRequest,
        },
    )
    tracker.paths = {getattr(r, "path", "") for r in app.routes}
    app.add_middleware(RequestTrackerMiddleware, tracker=tracker)
    return app
