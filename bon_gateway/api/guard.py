"""The front door of both fronts: who may call, how many at once, how big.

`Guard` bundles the access policy (keys, per-key rate), the in-flight bound
and the input limits; one instance is shared by the HTTP app and the gRPC
server so the bound covers both. `GuardMiddleware` applies it to HTTP before
any routing or body parsing; api/grpc_guard.py applies it to gRPC.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bon_gateway.api.auth import AccessPolicy
from bon_gateway.api.http_errors import error_response
from bon_gateway.api.limits import InFlightLimiter
from bon_gateway.config import LimitsConfig, ServerConfig
from bon_gateway.errors import BonError, InvalidRequest, RequestTooLarge

__all__ = ["ALWAYS_OPEN_PATHS", "Guard", "GuardMiddleware", "replay_messages"]

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
    """Pure ASGI: key and rate check, in-flight slot, body size bound, then the app.

    The body is read here (at most `max_body_bytes`) and replayed to the app,
    so an oversized body is refused without being held in memory, whether it
    declares a Content-Length or is chunked.
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
        try:
            if not guard.open_path(path):
                guard.access.check(Headers(scope=scope).get("authorization"))
            bounded = path not in _UNBOUNDED_PATHS
            if bounded:
                guard.in_flight.enter()
        except BonError as err:
            await error_response(err)(scope, receive, send)
            return
        try:
            try:
                messages = await self._read_body(scope, receive)
            except BonError as err:
                await error_response(err)(scope, receive, send)
                return
            await self.app(scope, replay_messages(messages, receive), send)
        finally:
            if bounded:
                guard.in_flight.leave()

    async def _read_body(self, scope: Scope, receive: Receive) -> list[Message]:
        limit = self.guard.limits.max_body_bytes
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise InvalidRequest("invalid Content-Length header") from None
            if size > limit:
                raise _too_large(limit)
        messages: list[Message] = []
        received = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages  # a disconnect: the app sees it in order
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(limit)
            if not message.get("more_body", False):
                return messages


def _too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"request body is larger than {limit} bytes (server.limits.max_body_bytes)")


def replay_messages(messages: list[Message], receive: Receive) -> Receive:
    """A receive that hands out `messages` again, then whatever `receive` has next."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
