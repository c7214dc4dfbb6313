"""The front door of both fronts: who may call, how many at once, how big.

`Guard` bundles the access policy (keys, per-key rate), the in-flight bound
and the input limits; one instance is shared by the HTTP app and the gRPC
server so the bound covers both. `GuardMiddleware` applies it to HTTP before
any routing, and bounds the body as the app reads it; api/grpc_guard.py
applies it to gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bon_gateway.api.auth import AccessPolicy
from bon_gateway.api.http_errors import error_response
from bon_gateway.api.limits import InFlightLimiter
from bon_gateway.config import LimitsConfig, ServerConfig
from bon_gateway.errors import BonError, InvalidRequest, RequestTooLarge

__all__ = ["ALWAYS_OPEN_PATHS", "Guard", "GuardMiddleware"]

# Liveness must answer whatever the load and whoever asks: a kubelet probe
# carries no key, and a probe shed under load would get the pod killed.
ALWAYS_OPEN_PATHS = frozenset({"/health"})
# Monitoring paths need no in-flight slot: shedding them would blind the
# operator exactly when the gateway is overloaded.
_UNBOUNDED_PATHS = frozenset({"/health", "/ready", "/metrics"})


@dataclass
class Guard:
    access: AccessPolicy
    in_flight: InFlightLimiter
    limits: LimitsConfig
    metrics_require_key: bool = True
    ready_requires_key: bool = True

    @classmethod
    def from_config(cls, server: ServerConfig, environ: Mapping[str, str] | None = None) -> Guard:
        """Keys are read here, once: from the environment (or `environ`) and the keys file."""
        limits = server.limits
        return cls(
            access=AccessPolicy.from_config(server.auth, environ),
            in_flight=InFlightLimiter(limits.max_in_flight, limits.retry_after_s),
            limits=limits,
            metrics_require_key=server.auth.metrics_require_key,
            ready_requires_key=server.auth.ready_requires_key,
        )

    def open_path(self, path: str) -> bool:
        """True for HTTP paths served without a key."""
        if path in ALWAYS_OPEN_PATHS:
            return True
        if path == "/metrics":
            return not self.metrics_require_key
        if path == "/ready":
            return not self.ready_requires_key
        return False


class GuardMiddleware:
    """Pure ASGI: key and rate check, in-flight slot, then the app, with the body bounded.

    Nothing is buffered here. A declared Content-Length over `max_body_size` is
    refused before the app runs; otherwise the app's `receive` counts the bytes
    as the app pulls them and refuses the message that passes the bound (as
    Starlette's RequestBodyLimitMiddleware does), so a chunked body is never
    held past the bound either. The refusal is a RequestTooLarge raised from
    `receive`: handlers map it like any gateway error; one that escapes the app
    is answered here.
    """

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        guard = self.guard
        limit = guard.limits.max_body_bytes
        authorization, declared = _request_headers(scope)
        try:
            if not guard.open_path(path):
                guard.access.check(authorization)
            if declared is not None and _content_length(declared) > limit:
                raise _too_large(limit)
            bounded = path not in _UNBOUNDED_PATHS
            if bounded:
                guard.in_flight.enter()
        except BonError as err:
            await error_response(err)(scope, receive, send)
            return
        body = _BoundedBody(receive, limit)
        try:
            await self.app(scope, body.receive, send)
        except RequestTooLarge as err:
            if err is not body.refusal:
                raise
            # The handlers read the body before they answer, so no response has started.
            await error_response(err)(scope, receive, send)
        finally:
            if bounded:
                guard.in_flight.leave()


class _BoundedBody:
    """A `receive` that counts body bytes and raises RequestTooLarge past `limit`."""

    __slots__ = ("_receive", "limit", "received", "refusal")

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self.limit = limit
        self.received = 0
        self.refusal: RequestTooLarge | None = None

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.refusal = _too_large(self.limit)
                raise self.refusal
        return message


def _request_headers(scope: Scope) -> tuple[str | None, bytes | None]:
    """The first Authorization and Content-Length of the raw ASGI headers (names arrive
    lower-case): one pass, no Headers object."""
    authorization: str | None = None
    content_length: bytes | None = None
    name: bytes
    value: bytes
    for name, value in scope["headers"]:
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == b"content-length" and content_length is None:
            content_length = value
    return authorization, content_length


def _content_length(value: bytes) -> int:
    try:
        size = int(value)
    except ValueError:
        raise InvalidRequest("invalid Content-Length header") from None
    if size < 0:
        raise InvalidRequest("invalid Content-Length header")
    return size


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"request body is larger than {limit} bytes (server.limits.max_body_bytes)")
