"""The OpenAI-compatible HTTP front (FastAPI), built by `build_app`.

Handlers only convert: JSON -> engine types -> engine -> JSON. Errors are
raised as BonError and turned into responses in http_errors.py. Nothing is
created at import time; importing this module never imports torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bon_gateway import __version__
from bon_gateway.api.guard import Guard, GuardMiddleware, replay_messages
from bon_gateway.api.http_errors import (
    CatchAllMiddleware,
    error_body,
    error_response,
    install_error_handlers,
)
from bon_gateway.api.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    RewardsRequest,
    chat_completion_body,
    chat_completion_chunks,
    completion_body,
    completion_chunks,
    models_body,
    rewards_body,
)
from bon_gateway.engine.admission import AdmittedBon
from bon_gateway.engine.engine import Engine
from bon_gateway.errors import BonError
from bon_gateway.metrics import Metrics
from bon_gateway.types import BonRequest, BonResult, Deadline

GenerateBody = ChatCompletionRequest | CompletionRequest
ToBody = Callable[[BonResult, BonRequest], dict[str, Any]]

__all__ = ["API_LABELS", "METRICS_CONTENT_TYPE", "build_app"]

log = logging.getLogger("bon_gateway.api")

T = TypeVar("T")

# The classic text format: what Prometheus and `promtool check metrics` parse.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# `api` label of bon_requests_total & co: a fixed set, so the label stays bounded
# whatever paths clients probe.
API_LABELS = {
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/v1/rewards": "rewards",
    "/v1/models": "models",
}

# A streamed request sends an SSE comment this often while it generates and
# scores, so that idle-connection timeouts (proxies, clients) do not fire.
SSE_KEEPALIVE_S = 5.0

# nginx's "client closed request": the client left before the answer was ready.
CLIENT_CLOSED = 499


class ClientGone(Exception):
    """The client disconnected while its request was being processed."""


class RequestMetricsMiddleware:
    """bon_requests_total{api,status}, duration and in-flight for the API routes.

    Pure ASGI (not BaseHTTPMiddleware) so the duration of a streamed response
    covers its whole body and nothing is buffered.
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api = API_LABELS.get(scope.get("path", "")) if scope["type"] == "http" else None
        if api is None:
            await self.app(scope, receive, send)
            return
        status = 500
        in_flight = self.metrics.child(self.metrics.requests_in_flight, api)

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        in_flight.inc()
        started = time.perf_counter()
        try:
            await self.app(scope, receive, recording_send)
        finally:
            in_flight.dec()
            self.metrics.child(self.metrics.request_duration, api).observe(time.perf_counter() - started)
            self.metrics.child(self.metrics.requests, api, str(status)).inc()


async def _wait_disconnect(receive: Receive) -> None:
    # The body has been read by the time a handler runs, so the next message
    # the server hands us is the disconnect (or the end of the response).
    while (await receive())["type"] != "http.disconnect":
        pass


async def _guarded(receive: Receive, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` (bounded by its own deadline); cancel it when the client hangs up.

    Cancelling the engine call cancels its upstream calls and queued scoring:
    nobody is left to read the answer.
    """
    task = asyncio.ensure_future(work())
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # Let the engine unwind (close upstream calls) before we answer.
            await asyncio.gather(task, return_exceptions=True)
    if task in done:
        return task.result()
    raise ClientGone


def _sse_data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _sse_best_of_n(
    engine: Engine,
    admitted: AdmittedBon,
    deadline: Deadline,
    to_chunks: Callable[[BonResult], list[dict[str, Any]]],
) -> AsyncIterator[bytes]:
    """OpenAI server-sent events for a streamed request: comments while the
    candidates are generated and scored, then the chosen answer as `data:`
    chunks and `[DONE]`.

    The best answer is only known once every candidate is scored, so nothing
    real can be streamed before that; the comments (which SSE clients, the
    openai SDK included, skip) show the client and any proxy that the request
    is alive. An error after the headers went out is sent as an OpenAI error
    event, which the SDK raises as an APIError. The client hanging up cancels
    this generator (Starlette listens for the disconnect), and so the engine.
    """
    yield b": generating\n\n"
    task = asyncio.ensure_future(engine.run(admitted, deadline))
    try:
        while not (await asyncio.wait({task}, timeout=SSE_KEEPALIVE_S))[0]:
            yield b": keep-alive\n\n"
        try:
            result = task.result()
        except BonError as err:
            yield _sse_data(error_body(err.message, err.code, err.param, err.code))
            return
        except Exception:
            log.exception("unhandled error in a streamed request")
            yield _sse_data(error_body("internal server error", "internal_error"))
            return
        for chunk in to_chunks(result):
            yield _sse_data(chunk)
        yield b"data: [DONE]\n\n"
    finally:
        if not task.done():
            task.cancel()
            # Let the engine unwind (close upstream calls) before the response ends.
            # asyncio.wait, not gather: Starlette's cancel scope cancels this
            # generator again at every await, and gather would pass each of those
            # on to the engine, interrupting httpx while it closes its connections.
            await asyncio.wait({task})


async def _answer(engine: Engine, body: GenerateBody, receive: Receive, to_body: ToBody) -> Response:
    """A non-streamed best-of-N request, from its validated body to its response."""
    server = engine.config.server
    deadline = Deadline.after(server.request_timeout_s)
    admitted = engine.admit(body.to_bon_request(server.default_best_of))
    try:
        result = await _guarded(receive, lambda: engine.run(admitted, deadline))
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    return JSONResponse(to_body(result, admitted.request))


@dataclass(frozen=True, slots=True)
class _FastRoute:
    model: type[ChatCompletionRequest] | type[CompletionRequest]
    to_body: ToBody


def _is_json(scope: Scope) -> bool:
    """No Content-Type or application/json: the bodies FastAPI itself would decode as JSON."""
    name: bytes
    value: bytes
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return True


class FastGenerateRoutes:
    """Pure ASGI, between the guard and FastAPI: non-streamed POST /v1/chat/completions
    and /v1/completions with a valid JSON body are answered here.

    FastAPI's per-request layers (exception middleware, routing, dependency
    solving, content-type sniffing) cost about 0.3 ms of event-loop CPU per
    best_of=4 request (bench/gateway_overhead.py's upstream and driver, side by
    side). Anything but that common case (a body that is not a JSON object or
    fails validation, `stream: true`, a disconnect while reading) goes on to the
    FastAPI app with the body replayed, so every error and the OpenAPI schema
    stay FastAPI's own. The answer is the same `_answer` the FastAPI routes use.
    """

    def __init__(self, app: ASGIApp, engine: Engine, routes: Mapping[str, _FastRoute]) -> None:
        self.app = app
        self.engine = engine
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get(scope.get("path", "")) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        # The guard has read and bounded the body already: these come from its replay.
        messages: list[Message] = []
        chunks: list[bytes] = []
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = _validated(route.model, scope, messages, chunks)
        if body is None or body.stream:
            await self.app(scope, replay_messages(messages, receive), send)
            return
        try:
            response = await _answer(self.engine, body, receive, route.to_body)
        except BonError as err:
            response = error_response(err)
        # Anything else is a bug: CatchAllMiddleware, outside this layer, logs it and answers 500.
        await response(scope, receive, send)


def _validated(
    model: type[GenerateBody], scope: Scope, messages: list[Message], chunks: list[bytes]
) -> GenerateBody | None:
    """The body as `model`, or None where FastAPI must answer (with its own error)."""
    if messages[-1]["type"] != "http.request" or not _is_json(scope):
        return None
    try:
        data = json.loads(b"".join(chunks))
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


class _GatewayApp(FastAPI):
    """FastAPI with the gateway's own pure-ASGI layers outside its middleware stack.

    `front` wraps the stack FastAPI builds (its server-error, exception and
    routing layers): request metrics, the guard and the fast routes run first,
    once per request, and the fast routes skip FastAPI's layers entirely.
    """

    front: Callable[[ASGIApp], ASGIApp] | None = None

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        return stack if self.front is None else self.front(stack)


def build_app(engine: Engine, metrics: Metrics, guard: Guard | None = None) -> FastAPI:
    """The HTTP app serving `engine`; metrics recorded into `metrics`.

    `guard` (keys, rate and in-flight bounds, body size) is shared with the gRPC
    front when both are served; None builds one from the config and environment.
    """
    server = engine.config.server
    guard = guard if guard is not None else Guard.from_config(server)
    app = _GatewayApp(title="bon-gateway", version=__version__, docs_url="/docs", redoc_url=None)
    install_error_handlers(app, [ChatCompletionRequest, CompletionRequest, RewardsRequest])
    fast_routes = {
        "/v1/chat/completions": _FastRoute(ChatCompletionRequest, chat_completion_body),
        "/v1/completions": _FastRoute(CompletionRequest, completion_body),
    }
    # Metrics outermost: refused and shed requests are counted too, and so is the 500 that
    # CatchAllMiddleware makes of a bug in the guard or the fast routes; then the guard.
    app.front = lambda stack: RequestMetricsMiddleware(
        CatchAllMiddleware(GuardMiddleware(FastGenerateRoutes(stack, engine, fast_routes), guard=guard)),
        metrics=metrics,
    )

    async def best_of_n(
        request: Request,
        body: GenerateBody,
        to_body: ToBody,
        to_chunks: Callable[..., list[dict[str, Any]]],
    ) -> Response:
        if not body.stream:
            return await _answer(engine, body, request.receive, to_body)
        deadline = Deadline.after(server.request_timeout_s)
        # Bad input is still a plain 400: admitted before the 200 and the stream start.
        admitted = engine.admit(body.to_bon_request(server.default_best_of))
        bon = admitted.request
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse_best_of_n(engine, admitted, deadline, lambda r: to_chunks(r, bon, include_usage=usage)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await best_of_n(request, body, chat_completion_body, chat_completion_chunks)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await best_of_n(request, body, completion_body, completion_chunks)

    @app.post("/v1/rewards", response_model=None)
    async def rewards(body: RewardsRequest, request: Request) -> Response:
        deadline = Deadline.after(server.request_timeout_s)
        admitted = engine.admit_score(body.to_score_request())
        try:
            result = await _guarded(request.receive, lambda: engine.score(admitted, deadline))
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(rewards_body(result))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return models_body(engine.list_models())

    @app.get("/health")
    async def health() -> dict[str, str]:
        # Liveness only: answering at all is the signal.
        return {"status": "ok"}

    @app.get("/ready", response_model=None)
    async def ready() -> JSONResponse:
        if engine.ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "not_ready"}, status_code=503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    return app
