"""The front door of both fronts: who may call, how many at once, how big.

`Guard` bundles the access policy (keys, per-key rate), the in-flight bound
and the input limits; one instance is shared by the HTTP app and the gRPC
server so the bound covers both. `GuardMiddleware` applies it to HTTP before
any routing, and bounds the body as the app reads it, taking the in-flight
slot once the body is in; api/grpc_guard.py applies it to gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bon_gateway.api.auth import AccessPolicy
from bon_gateway.api.http_errors import error_response
from bon_gateway.api.limits import InFlightLimiter
from bon_gateway.config import LimitsConfig, ServerConfig
from bon_gateway.errors import BonError, InvalidRequest, Overloaded, RequestTooLarge

__all__ = ["ALWAYS_OPEN_PATHS", "Guard", "GuardMiddleware"]

# Liveness must answer whatever the load and whoever asks: a kubelet probe
# carries no key, and a probe shed under load would get the pod killed.
ALWAYS_OPEN_PATHS = frozenset({"/health"})
# Monitoring paths need no in-flight slot: shedding them would blind the
# operator exactly when the gateway is overloaded.
_UNBOUNDED_PATHS = frozenset({"/health", "/ready", "/metrics"})
# Methods whose requests carry no body unless they declare one.
_NO_BODY = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


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
    """Pure ASGI: key and rate check, then the app with its body bounded, and the
    in-flight slot once the request is in.

    Nothing is buffered here. A declared Content-Length over `max_body_bytes` is
    refused before the app runs; otherwise the app's `receive` counts the bytes
    as the app pulls them and refuses the message that passes the bound (as
    Starlette's RequestBodyLimitMiddleware does), so a chunked body is never
    held past the bound either. (Its time bound, `body_timeout_s`, is the HTTP
    protocol's: api/http_protocol.py.) A request without a body takes its
    in-flight slot before the app runs; one with a body takes it from `receive`,
    with the body's last message: a slow or stalled sender holds a connection
    (server.limits.max_connections bounds those), never a slot that HTTP and gRPC
    share. Each refusal is a BonError raised from `receive`: handlers map it like
    any gateway error; one that escapes the app is answered here.
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
        limits = guard.limits
        authorization, declared, chunked = _request_headers(scope)
        bounded = path not in _UNBOUNDED_PATHS
        try:
            if not guard.open_path(path):
                guard.access.check(authorization)
            size = 0 if declared is None else _content_length(declared)
            if size > limits.max_body_bytes:
                raise _too_large(limits.max_body_bytes)
            # A body may follow unless the framing says none (HTTP/1.1: no Content-Length and
            # no Transfer-Encoding is an empty body; a POST is still read, to be sure).
            has_body = chunked or size > 0 or (declared is None and scope.get("method") not in _NO_BODY)
            if bounded and not has_body:
                guard.in_flight.enter()
        except BonError as err:
            await error_response(err)(scope, receive, send)
            return
        if not has_body:  # HTTP/1.1 framing: nothing will come but the disconnect
            try:
                await self.app(scope, receive, send)
            finally:
                if bounded:
                    guard.in_flight.leave()
            return
        body = _BoundedBody(receive, limits.max_body_bytes, guard.in_flight if bounded else None)
        try:
            await self.app(scope, body.receive, send)
        except BonError as err:
            if err is not body.refusal:
                raise
            # The handlers read the body before they answer, so no response has started.
            await error_response(err)(scope, receive, send)
        finally:
            if body.holds_slot:
                guard.in_flight.leave()


class _BoundedBody:
    """A `receive` that bounds the body (RequestTooLarge past `max_body_bytes`) and takes
    the in-flight slot (Overloaded) with its last message."""

    __slots__ = ("_receive", "holds_slot", "in_flight", "limit", "reading", "received", "refusal")

    def __init__(self, receive: Receive, limit: int, in_flight: InFlightLimiter | None) -> None:
        self._receive = receive
        self.limit = limit
        self.in_flight = in_flight
        self.reading = True  # until the body's last message; then only the disconnect comes
        self.received = 0
        self.holds_slot = False
        self.refusal: BonError | None = None

    async def receive(self) -> Message:
        message = await self._receive()
        if not self.reading or message["type"] != "http.request":
            return message
        self.received += len(message.get("body", b""))
        if self.received > self.limit:
            self.refusal = _too_large(self.limit)
            raise self.refusal
        if not message.get("more_body", False):
            self.reading = False
            if self.in_flight is not None:
                try:
                    self.in_flight.enter()
                except Overloaded as err:
                    self.refusal = err
                    raise
                self.holds_slot = True
        return message


def _request_headers(scope: Scope) -> tuple[str | None, bytes | None, bool]:
    """The first Authorization and Content-Length of the raw ASGI headers (names arrive
    lower-case), and whether a Transfer-Encoding says a body follows: one pass, no
    Headers object."""
    authorization: str | None = None
    content_length: bytes | None = None
    chunked = False
    name: bytes
    value: bytes
    for name, value in scope["headers"]:
        if name == b"authorization" and authorization is None:
            authorization = value.decode("latin-1")
        elif name == b"content-length" and content_length is None:
            content_length = value
        elif name == b"transfer-encoding":
            chunked = True
    return authorization, content_length, chunked


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
