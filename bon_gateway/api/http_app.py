"""The OpenAI-compatible HTTP front (FastAPI), built by `build_app`.

One pipeline for every request: request metrics, the catch-all, the guard
(keys, rate, in-flight, body bound), then FastAPI's router and one set of
routes. The API routes read their body once and validate it with pydantic
themselves (see `_DirectRoute` for why); handlers only convert: JSON ->
engine types -> engine -> JSON. Errors become responses in http_errors.py.
Nothing is created at import time; importing this module never imports torch.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bon_gateway import __version__
from bon_gateway.api.guard import Guard, GuardMiddleware
from bon_gateway.api.http_errors import (
    CatchAllMiddleware,
    error_response,
    install_error_handlers,
    request_field_names,
    validation_error_response,
)
from bon_gateway.api.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    RewardsRequest,
    chat_completion_body,
    chat_completion_chunks,
    completion_body,
    completion_chunks,
    live_chunks,
    models_body,
    rewards_body,
)
from bon_gateway.api.rlhf_routes import RLHF_API_LABELS, RLHF_REQUEST_MODELS, rlhf_routes
from bon_gateway.api.sse import sse_best_of_n, start_run
from bon_gateway.engine.engine import Engine, new_request_id
from bon_gateway.engine.search import OnWinnerText
from bon_gateway.errors import BonError, InvalidRequest
from bon_gateway.metrics import Metrics
from bon_gateway.types import BonRequest, BonResult, Deadline

GenerateBody = ChatCompletionRequest | CompletionRequest
ToBody = Callable[[BonResult, BonRequest], dict[str, Any]]
ToChunks = Callable[..., list[dict[str, Any]]]
Endpoint = Callable[[Request], Coroutine[Any, Any, Response]]

__all__ = ["API_LABELS", "METRICS_CONTENT_TYPE", "build_app"]

log = logging.getLogger("bon_gateway.api")

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# The classic text format: what Prometheus and `promtool check metrics` parse.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# `api` label of bon_requests_total & co: a fixed set, so the label stays bounded
# whatever paths clients probe.
API_LABELS = {
    "/v1/chat/completions": "chat_completions",
    "/v1/completions": "completions",
    "/v1/rewards": "rewards",
    "/v1/models": "models",
    **RLHF_API_LABELS,
}

# nginx's "client closed request": the client left before the answer was ready.
CLIENT_CLOSED = 499

REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    ChatCompletionRequest,
    CompletionRequest,
    RewardsRequest,
    *RLHF_REQUEST_MODELS,
)


class _JSONResponse(JSONResponse):
    """JSONResponse rendering through one kept encoder: the bytes Starlette's render makes
    (json.dumps with these options builds a new encoder for every response)."""

    _encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":"))

    def render(self, content: Any) -> bytes:
        return self._encoder.encode(content).encode("utf-8")


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


# -- the request body -------------------------------------------------------------------------


def _content_type_is_json(request: Request) -> bool:
    """application/json or application/*+json (parameters such as charset ignored), as
    FastAPI reads a JSON body; no Content-Type at all is taken as JSON too (the common
    generate request always was: clients that send none mean JSON)."""
    value = request.headers.get("content-type")
    if not value:
        return True
    media_type = value.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


async def _read_body(request: Request, model: type[M]) -> M:
    """The body, read once (the guard bounds it as it arrives), validated as `model` by
    pydantic-core straight from the bytes. Raises InvalidRequest or RequestValidationError
    (400s, mapped in http_errors.py; a ValidationError from anywhere else stays a bug, a
    500); ClientDisconnect when the client leaves mid-body."""
    if not _content_type_is_json(request):
        raise InvalidRequest(
            f"unsupported Content-Type {request.headers['content-type'][:100]!r}: send a JSON body "
            "(Content-Type: application/json)"
        )
    raw = await request.body()
    if not raw:
        raise InvalidRequest("the request body is empty: a JSON object is expected")
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        errors = err.errors(include_url=False)
        if errors[0]["type"] != "json_invalid" or _too_deep(errors[0]):
            # Too deep for pydantic-core is too deep: Python's json would only hit its own
            # recursion limit (a RecursionError, a 500) a few hundred levels further down.
            raise RequestValidationError(errors) from None
    try:
        return model.model_validate(_python_json(raw))
    except ValidationError as err:
        raise RequestValidationError(err.errors(include_url=False)) from None


def _too_deep(error: Any) -> bool:
    return "recursion limit" in str((error.get("ctx") or {}).get("error", ""))


def _python_json(raw: bytes) -> Any:
    """`raw` decoded by Python's json, as FastAPI decoded bodies: for what pydantic-core's
    UTF-8-only parser refuses, so UTF-16/32 and a leading BOM still work, and malformed
    JSON is reported with the same words as before."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        detail, pos = err.msg, err.pos
    except UnicodeDecodeError as err:
        detail, pos = "not valid UTF-8", err.start
    except RecursionError:
        detail, pos = "nested too deeply", 0
    error = {"type": "json_invalid", "loc": (pos,), "msg": "JSON decode error", "ctx": {"error": detail}}
    raise RequestValidationError([error])


# -- the engine, once per route family --------------------------------------------------------


async def _wait_disconnect(receive: Receive) -> None:
    # The body has been read by the time a handler runs, so the next message
    # the server hands us is the disconnect (or the end of the response).
    while (await receive())["type"] != "http.disconnect":
        pass


async def _guarded(receive: Receive, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work` (the engine bounds it by the request's deadline); cancel it when the
    client hangs up. Cancelling the engine call cancels its upstream calls and queued
    scoring: nobody is left to read the answer."""
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


class _RunStreamingResponse(StreamingResponse):
    """A StreamingResponse over an engine run started before it: the run is cancelled
    (and waited for) however the response ends, even if its body never started
    (a client gone before the headers went out)."""

    def __init__(self, task: asyncio.Future[BonResult], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._task = task

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._task.done():
                self._task.cancel()
                await asyncio.wait({self._task})


@dataclass(frozen=True, slots=True)
class _GenerateApi:
    """What differs between the two generate routes: the body model and the reply shapes."""

    model: type[ChatCompletionRequest] | type[CompletionRequest]
    to_body: ToBody
    to_chunks: ToChunks


_CHAT = _GenerateApi(ChatCompletionRequest, chat_completion_body, chat_completion_chunks)
_COMPLETION = _GenerateApi(CompletionRequest, completion_body, completion_chunks)


async def _best_of_n(engine: Engine, api: _GenerateApi, body: GenerateBody, receive: Receive) -> Response:
    """The generate family's one trip through the engine: body -> BonRequest -> admission
    -> run under the request's deadline -> reply, streamed or not."""
    server = engine.config.server
    deadline = Deadline.after(server.request_timeout_s)
    request = replace(body.to_bon_request(server.default_best_of), request_id=new_request_id())
    # Bad input is a plain 400, before a stream starts.
    admitted = engine.admit(request)
    bon = admitted.request
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        model = bon.model or engine.generator.default_model
        chat = api.model is ChatCompletionRequest

        def run(on_winner_text: OnWinnerText | None, on_opened: Callable[[], None]) -> Awaitable[BonResult]:
            return engine.run(admitted, deadline, on_winner_text=on_winner_text, on_opened=on_opened)

        def live(text: str, first: bool) -> list[dict[str, Any]]:
            return live_chunks(chat, bon.request_id, model, text, first=first)

        # One choice asked for: it may stream as it grows.
        live_text = live if bon.n == 1 else None
        # Until the reward model has the prompt, an error is still a plain status (a 400).
        started = await start_run(run, live_text is not None)
        return _RunStreamingResponse(
            started.task,
            sse_best_of_n(
                started,
                live_text,
                lambda result, streamed: api.to_chunks(result, bon, include_usage=usage, streamed=streamed),
            ),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        result = await _guarded(receive, lambda: engine.run(admitted, deadline))
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    return _JSONResponse(api.to_body(result, bon))


async def _score(engine: Engine, body: RewardsRequest, receive: Receive) -> Response:
    """The rewards route's one trip through the engine: body -> ScoreRequest -> admission
    -> score under the request's deadline -> reply."""
    deadline = Deadline.after(engine.config.server.request_timeout_s)
    admitted = engine.admit_score(body.to_score_request())
    try:
        result = await _guarded(receive, lambda: engine.score(admitted, deadline))
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    return _JSONResponse(rewards_body(result))


# -- FastAPI --------------------------------------------------------------------------------------


class _DirectRoute(APIRoute):
    """An APIRoute whose endpoint takes the Request and returns the Response itself.

    FastAPI documents it like any route (OpenAPI, /docs; the body schema comes
    from `openapi_extra`), but a request goes straight from the router to the
    endpoint: no dependency solving, no body parsing by FastAPI, no per-request
    exit stacks. The endpoint reads and validates its body (`_read_body`) and
    gateway errors become responses here, through http_errors.py.

    Why: FastAPI's per-route machinery (request_response's exit stacks,
    dependency solving, its own JSON decode and model validation) is what made a
    hand-built fast path beside FastAPI worth having. Instructions per
    non-streamed best_of=4 chat request through the whole app, stub engine
    (`python bench/http_pipeline.py --instructions --gateway-src ...`, one run,
    2026-12): FastAPI body-parameter routes 832k; these endpoints in plain
    APIRoutes 698k; this route 591k, 560k with FastAPI's telemetry off
    (`_no_fastapi_telemetry`); the old fast path with its FastAPI routes beside
    it 522k. One pipeline thus costs 7% more than the fast path did and a third
    less than FastAPI's body parameters; bench/gateway_overhead.py says what
    that is end to end (README, Performance).
    """

    def __init__(self, path: str, endpoint: Endpoint, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        field_names = request_field_names(REQUEST_MODELS)

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                response = await endpoint(Request(scope, receive, send))
            except BonError as err:  # RequestTooLarge from the guard's receive too
                response = error_response(err)
            except RequestValidationError as err:
                response = validation_error_response(err.errors(), field_names)
            except (ClientDisconnect, ClientGone):
                response = Response(status_code=CLIENT_CLOSED)
            # Anything else is a bug: CatchAllMiddleware logs it and answers 500.
            await response(scope, receive, send)

        self.app = app


def _json_body_docs(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that reads `model` itself: its request body, documented
    as FastAPI documents a body parameter (the schema itself: `_GatewayApp.openapi`)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


class _GatewayApp(FastAPI):
    """FastAPI with the gateway's own pure-ASGI layers outside its middleware stack.

    `front` wraps the stack FastAPI builds (exception handlers, routing): request
    metrics, the catch-all and the guard run first, once per request. FastAPI's
    outermost layer, Starlette's ServerErrorMiddleware, is left out: it answers a
    plain-text 500 and re-raises, while CatchAllMiddleware (in `front`, outside the
    guard, so a bug there is caught too) answers it once, in OpenAI shape.
    """

    front: Callable[[ASGIApp], ASGIApp] | None = None
    request_models: Sequence[type[BaseModel]] = ()

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        while isinstance(stack, ServerErrorMiddleware):
            stack = stack.app
        return stack if self.front is None else self.front(stack)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's schema plus the request models the direct routes read themselves."""
        if self.openapi_schema is not None:
            return self.openapi_schema
        schema = super().openapi()  # cached by FastAPI in self.openapi_schema: completed in place
        _, definitions = models_json_schema(
            [(model, "validation") for model in self.request_models],
            ref_template="#/components/schemas/{model}",
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions.get("$defs", {}))
        return schema


def _no_fastapi_telemetry() -> dict[str, Any]:
    """FastAPI's native OpenTelemetry off, where this FastAPI has it (0.16x): with it on,
    every request first asks OpenTelemetry whether any provider is configured (32k of a 591k-instruction
    request: bench/http_pipeline.py --instructions).
    The gateway reports through its own Prometheus metrics and phase logs."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def build_app(engine: Engine, metrics: Metrics, guard: Guard | None = None) -> FastAPI:
    """The HTTP app serving `engine`; metrics recorded into `metrics`.

    `guard` (keys, rate and in-flight bounds, body size) is shared with the gRPC
    front when both are served; None builds one from the config and environment.
    """
    guard = guard if guard is not None else Guard.from_config(engine.config.server)
    app = _GatewayApp(
        title="bon-gateway", version=__version__, docs_url="/docs", redoc_url=None, **_no_fastapi_telemetry()
    )
    app.request_models = REQUEST_MODELS
    # For what reaches FastAPI's own layers: unknown paths (404), wrong methods (405).
    install_error_handlers(app, REQUEST_MODELS)
    # Metrics outermost: refused and shed requests are counted too, and so is the 500
    # that CatchAllMiddleware makes of a bug in the guard or a route; then the guard.
    app.front = lambda stack: RequestMetricsMiddleware(
        CatchAllMiddleware(GuardMiddleware(stack, guard=guard)), metrics=metrics
    )

    def direct(path: str, endpoint: Endpoint, model: type[BaseModel]) -> None:
        app.router.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            response_model=None,
            responses={400: {"description": "Invalid request: an OpenAI error object naming the field"}},
            openapi_extra=_json_body_docs(model),
            route_class_override=_DirectRoute,
        )

    async def chat_completions(request: Request) -> Response:
        body = await _read_body(request, ChatCompletionRequest)
        return await _best_of_n(engine, _CHAT, body, request.receive)

    async def completions(request: Request) -> Response:
        body = await _read_body(request, CompletionRequest)
        return await _best_of_n(engine, _COMPLETION, body, request.receive)

    async def rewards(request: Request) -> Response:
        body = await _read_body(request, RewardsRequest)
        return await _score(engine, body, request.receive)

    direct("/v1/chat/completions", chat_completions, ChatCompletionRequest)
    direct("/v1/completions", completions, CompletionRequest)
    direct("/v1/rewards", rewards, RewardsRequest)
    # vLLM's pooling API and OpenRLHF's remote reward model (rlhf_routes.py).
    for path, endpoint, model in rlhf_routes(engine, _read_body, _guarded):
        direct(path, endpoint, model)

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
