"""The one place where errors become HTTP responses (OpenAI error shape).

Every error body is `{"error": {"message", "type", "param", "code"}}`, the
shape the OpenAI SDKs parse into `APIStatusError`. Unexpected exceptions are
logged here with their traceback and reach the client as a bare 500: internals
(paths, upstream bodies, stack traces) never leak.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bon_gateway.errors import (
    BonError,
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    RequestTooLarge,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "CatchAllMiddleware",
    "describe_validation_errors",
    "error_body",
    "error_response",
    "http_status",
    "install_error_handlers",
    "request_field_names",
    "validation_error_response",
    "validation_param",
]

log = logging.getLogger("bon_gateway.api")


def http_status(error: BonError) -> int:
    """HTTP status of a gateway error (subclasses first: UpstreamError is an Unavailable)."""
    if isinstance(error, RequestTooLarge):
        return 413
    if isinstance(error, ModelNotFound):
        return 404
    if isinstance(error, InvalidRequest):
        return 400
    if isinstance(error, Unauthenticated):
        return 401
    if isinstance(error, Overloaded):
        return 429
    if isinstance(error, Unavailable):  # also UpstreamError, WorkerError
        return 503
    if isinstance(error, DeadlineExceeded):
        return 504
    return 500


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(error: BonError) -> JSONResponse:
    """The JSON response for a gateway error."""
    status = http_status(error)
    if status == 500:
        # A BonError without a mapping is still a bug on our side: say nothing more.
        log.error("unmapped gateway error %s: %s", type(error).__name__, error.message)
        return JSONResponse(error_body("internal server error", "internal_error"), status_code=500)
    headers: dict[str, str] = {}
    if isinstance(error, Overloaded):
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    if isinstance(error, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(
        error_body(error.message, error.code, error.param, error.code), status_code=status, headers=headers
    )


def request_field_names(models: Sequence[type[BaseModel]]) -> frozenset[str]:
    """Every field name reachable from the request schemas."""
    names: set[str] = set()
    pending = list(models)
    seen: set[type[BaseModel]] = set()
    while pending:
        model = pending.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, info in model.model_fields.items():
            names.add(name)
            pending.extend(_nested_models(info.annotation))
    return frozenset(names)


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in getattr(annotation, "__args__", ()) or ():
        found.extend(_nested_models(arg))
    return found


def validation_param(loc: Sequence[str | int], field_names: frozenset[str]) -> str | None:
    """`("body", "messages", 0, "role")` -> `"messages[0].role"`.

    pydantic puts union member tags ("str", "list[TextPart]") into the location;
    only real field names and list indices are kept so the client sees its own field.
    """
    param = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in field_names:
            param += f".{part}" if param else part
    return param or None


def describe_validation_errors(
    errors: Sequence[Mapping[str, Any]], field_names: frozenset[str]
) -> tuple[str | None, str, str]:
    """`(param, message, code)` for FastAPI/pydantic validation errors (locations with or
    without FastAPI's leading "body")."""
    if not errors:
        return None, "invalid request", "invalid_request_error"
    if errors[0].get("type") == "json_invalid":
        detail = (errors[0].get("ctx") or {}).get("error", "")
        return None, f"malformed JSON body: {detail}" if detail else "malformed JSON body", "invalid_json"
    # A value that fits no member of a union fails once per member; the deepest
    # location is the member the client meant (a list of parts missing "text"
    # rather than "not a string").
    chosen = max(errors, key=lambda e: len(e.get("loc", ())))
    param = validation_param(chosen.get("loc", ()), field_names)
    message = str(chosen.get("msg", "invalid value"))
    if param:
        message = f"{param}: {message}"
    others = {validation_param(e.get("loc", ()), field_names) for e in errors} - {param}
    if others:
        message += f" (and {len(others)} more invalid field(s))"
    return param, message, "invalid_request_error"


def validation_error_response(
    errors: Sequence[Mapping[str, Any]], field_names: frozenset[str]
) -> JSONResponse:
    """The 400 for a body that failed pydantic validation (or FastAPI's), naming the field."""
    param, message, code = describe_validation_errors(errors, field_names)
    return JSONResponse(error_body(message, "invalid_request_error", param, code), status_code=400)


def install_error_handlers(app: FastAPI, request_models: Sequence[type[BaseModel]]) -> None:
    """Route gateway errors, validation errors and HTTP errors to OpenAI-shaped bodies."""
    field_names = request_field_names(request_models)

    async def on_bon_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, BonError)
        return error_response(exc)

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return validation_error_response(exc.errors(), field_names)

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(str(exc.detail), type_), status_code=exc.status_code, headers=exc.headers
        )

    app.add_exception_handler(BonError, on_bon_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    # Unexpected exceptions are not handled here but by CatchAllMiddleware, installed
    # once outside the guard (http_app.build_app): an Exception handler would be
    # followed by Starlette re-raising, so the server would log every bug twice and
    # outer middleware would see no response.


class CatchAllMiddleware:
    """Turns an unexpected exception into a bare 500, logged once with its traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise  # headers are out; the server can only drop the connection
            response = JSONResponse(error_body("internal server error", "internal_error"), status_code=500)
            await response(scope, receive, send)
