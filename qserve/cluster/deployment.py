"""The two Ray Serve deployments: `EngineReplica` (one qserve engine) and `Ingress` (the HTTP front).

::

    client -> Serve proxy -> Ingress --(SessionAffinityRouter)--> EngineReplica: create_app(EngineProcess)
                               /metrics <- ClusterStats actor <- every replica, the autoscaling policy

Each engine replica builds exactly what `qserve serve` builds: the flags validated and the KV cache sized
by `launch.engine_config` (the planner on ``--memory-budget``, on the replica's own device), the engine in
its own process, and `create_app`'s FastAPI app. The ingress reads a request's body, derives its session
key (`routing.request_session_key`) and hands the raw request to a replica's ``forward``, which runs it
through that app in-process and streams the response back, so the API, its errors (400/401/404/413/429)
and SSE streams are the single server's. A client that goes away cancels the call, which aborts the
replica's engine requests. /metrics is the cluster's (`stats`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qserve.cluster import routing, stats
from qserve.server.protocol import MAX_BODY_BYTES, error_body

logger = logging.getLogger("ray.serve")
HEALTH_TIMEOUT_S = 10.0


class EngineReplica:
    """One engine and `qserve serve`'s app, driven through ``forward`` instead of a socket.

    Signals for Serve: ``record_autoscaling_stats`` (the autoscaling policy's four), ``record_routing_stats``
    (the router's headroom), ``check_health`` (the engine process is alive); every ``stats_interval_s`` it
    reports its /metrics text to the ClusterStats actor.
    """

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        options: dict[str, Any],
        stats_actor: str,
        namespace: str,
        threads: int | None = None,
        stats_interval_s: float = 1.0,
    ):
        from uvicorn.config import Config
        from uvicorn.lifespan.on import LifespanOn

        from qserve.config import resolve_model_path
        from qserve.server.app import create_app
        from qserve.server.engine_process import EngineProcess
        from qserve.server.launch import ServeOptions, engine_config
        from qserve.tokenizer import load_tokenizer

        opts = ServeOptions(**options)
        self.engine = EngineProcess(engine_config(opts), opts.max_queue, threads)
        # the app's tokenizer imports transformers: here, while the engine process starts
        warm = asyncio.to_thread(load_tokenizer, resolve_model_path(opts.model))
        info, _ = await asyncio.gather(asyncio.to_thread(self.engine.start), warm)
        self.plan = info.plan
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        print(f"qserve replica {self.replica_id}: sized itself with this plan", flush=True)
        for line in self.plan:
            print("  " + line, flush=True)
        name = opts.served_model_name or opts.model
        self.app = create_app(
            self.engine,
            served_model_name=name,
            api_key=opts.api_key,
            max_queue=opts.max_queue,
            tool_call_parser=opts.tool_call_parser,
        )
        self.lifespan = LifespanOn(Config(self.app, lifespan="on", log_config=None))
        await self.lifespan.startup()
        self.stats = stats.actor(stats_actor, namespace)
        self.pusher = asyncio.create_task(self._push_stats(stats_interval_s))

    async def forward(self, req: routing.ForwardedRequest) -> AsyncIterator[dict[str, Any] | bytes]:
        """Run one HTTP request through the app: yields {"status", "headers"}, then the body's chunks."""
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": req.method,
            "scheme": "http",
            "path": req.path,
            "raw_path": req.path.encode(),
            "query_string": req.query_string,
            "root_path": "",
            "headers": list(req.headers),
            "client": None,
            "server": None,
        }
        sent: asyncio.Queue[MutableMapping[str, Any] | None] = asyncio.Queue()
        gone = asyncio.Event()  # set when the caller cancels (client disconnected): the app aborts its work
        body_read = False

        async def receive() -> dict[str, Any]:
            nonlocal body_read
            if not body_read:
                body_read = True
                return {"type": "http.request", "body": req.body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def run() -> None:
            try:
                await self.app(scope, receive, sent.put)
            finally:
                sent.put_nowait(None)

        task = asyncio.create_task(run())
        try:
            while (msg := await sent.get()) is not None:
                if msg["type"] == "http.response.start":
                    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in msg.get("headers", [])]
                    yield {"status": msg["status"], "headers": headers}
                elif msg["type"] == "http.response.body":
                    if msg.get("body"):
                        yield bytes(msg["body"])
                    if not msg.get("more_body"):
                        break
        finally:
            gone.set()
            if not task.done():
                await asyncio.wait([task], timeout=5.0)

    def record_autoscaling_stats(self) -> dict[str, float]:
        m = self.engine.snapshot
        return {name: float(m.get(name, 0.0)) for name in _AUTOSCALING_SIGNALS}

    def record_routing_stats(self) -> dict[str, Any]:
        m = self.engine.snapshot
        return {"admission_headroom_sequences": int(m.get("admission_headroom_sequences", 0))}

    def check_health(self) -> None:
        if not self.engine.is_alive():
            raise RuntimeError("the engine process is not running")

    def plan_lines(self) -> list[str]:
        return list(self.plan)

    async def _push_stats(self, interval: float) -> None:
        warned = False
        while True:
            m = self.engine.snapshot
            numbers = {k: float(v) for k, v in m.items() if isinstance(v, int | float)}
            try:
                text = self.app.state.metrics.render().decode()
                await asyncio.wait_for(self.stats.report_replica.remote(self.replica_id, text, numbers), 10)
            except Exception as e:  # the stats actor restarting: /metrics misses this replica a moment
                if not warned:
                    logger.warning("qserve replica %s: cannot report metrics: %s", self.replica_id, e)
                warned = True
            await asyncio.sleep(interval)

    async def __del__(self) -> None:
        if not hasattr(self, "pusher"):  # the constructor failed; the engine process died with it
            return
        self.pusher.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.stats.remove_replica.remote(self.replica_id), 5)
        await self.lifespan.shutdown()  # stop admitting, abort what is left, end the engine process


_AUTOSCALING_SIGNALS = (
    "admission_headroom_sequences",
    "kv_cache_usage_ratio",
    "requests_waiting",
    "requests_running",
)


class Ingress:
    """The HTTP front: OpenAI requests go to an engine replica chosen by the deployment's router (session
    affinity, then headroom); /metrics answers for the whole cluster."""

    def __init__(
        self,
        engine: DeploymentHandle,
        model: str,
        stats_actor: str,
        namespace: str,
        block_size: int = 16,
        routing_mode: str = "affinity",
    ):
        from qserve.config import resolve_model_path
        from qserve.tokenizer import load_tokenizer

        self.engine = engine.options(stream=True)
        self.tokenizer = load_tokenizer(resolve_model_path(model))
        self.block_size = block_size
        self.routing_mode = routing_mode
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qserve-session-key")
        self.stats = stats.actor(stats_actor, namespace)

    def __serve_build_asgi_app__(self) -> Starlette:
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
        routes = [
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/{path:path}", self.forward, methods=methods),
        ]
        return Starlette(routes=routes)

    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        snapshot = await self.stats.snapshot.remote()
        return Response(stats.render(snapshot, routing.DECISIONS), media_type=CONTENT_TYPE_LATEST)

    async def forward(self, request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                message = f"request body is over the {MAX_BODY_BYTES}-byte limit"
                return JSONResponse(error_body(413, message), status_code=413)
        path = "/" + request.path_params.get("path", "")  # below the application's route prefix
        key = None
        if request.method == "POST":
            loop = asyncio.get_running_loop()
            args = (path, bytes(body), self.tokenizer, self.block_size)
            key = await loop.run_in_executor(self.pool, routing.request_session_key, *args)
        req = routing.ForwardedRequest(
            request.method,
            path,
            request.scope.get("query_string", b""),
            tuple(request.headers.raw),
            bytes(body),
            key,
            self.routing_mode,
        )
        gen = cast(DeploymentResponseGenerator, self.engine.forward.remote(req))
        try:
            first = gen.__anext__()
            head = await (asyncio.wait_for(first, HEALTH_TIMEOUT_S) if path == "/health" else first)
        except BaseException as e:  # cancelled (the client left), a full queue, or no replica answered
            gen.cancel()
            if not isinstance(e, Exception):
                raise
            if isinstance(e, BackPressureError):
                message = f"server busy: {e.message}; retry later"
                return JSONResponse(error_body(429, message), status_code=429, headers={"Retry-After": "1"})
            logger.warning("qserve ingress: %s %s failed: %s: %s", request.method, path, type(e).__name__, e)
            return JSONResponse(error_body(503, "no engine replica answered"), status_code=503)

        async def rest() -> AsyncIterator[bytes]:
            done = False
            try:
                async for chunk in gen:
                    yield chunk
                done = True
            finally:
                if not done:
                    gen.cancel()

        # streamed on (chunked): the replica's content-length would let a client hang up before the end
        headers = {
            k: v for k, v in head["headers"] if k.lower() not in ("content-length", "transfer-encoding")
        }
        return StreamingResponse(rest(), status_code=head["status"], headers=headers)
