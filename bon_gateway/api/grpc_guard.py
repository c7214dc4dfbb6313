"""The Guard on the gRPC front: a grpc.aio server interceptor.

Policy: `grpc.health.v1.Health` is always open (kubelet gRPC probes and load
balancers carry no key); every other service, reflection included, needs a
key when keys are configured (reflection maps the API surface, which is for
the key holders). BestOfN calls also take an in-flight slot shared with HTTP.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from bon_gateway.api.grpc_service import status_of
from bon_gateway.api.guard import Guard
from bon_gateway.errors import BonError
from bon_gateway.metrics import Metrics

__all__ = ["OPEN_SERVICES", "GuardInterceptor"]

OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
_BOUNDED_SERVICES = frozenset({"bon_gateway.v1.BestOfN"})

Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def _split(method: str) -> tuple[str, str]:
    """`/pkg.Service/Method` -> (`pkg.Service`, `Method`)."""
    service, _, name = method.lstrip("/").partition("/")
    return service, name


def _api_label(name: str) -> str:
    # Same labels as grpc_service's metrics: GenerateStream -> grpc_generate_stream.
    return "grpc_" + re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for item in details.invocation_metadata or ():
        k, v = item
        if k == key:
            return v if isinstance(v, str) else None
    return None


class GuardInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without a valid key (UNAUTHENTICATED), over the key's rate or
    over the in-flight bound (RESOURCE_EXHAUSTED + retry-after), before the servicer runs."""

    def __init__(self, guard: Guard, metrics: Metrics | None = None) -> None:
        self.guard = guard
        self.metrics = metrics

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, name = _split(handler_call_details.method)
        if service in OPEN_SERVICES:
            return handler
        try:
            self.guard.access.check(_metadata_value(handler_call_details, "authorization"))
        except BonError as err:
            self._record(service, name, err)
            return _refusing(handler, err)
        if service in _BOUNDED_SERVICES:
            return self._bounded(handler, service, name)
        return handler

    def _record(self, service: str, name: str, err: BonError) -> None:
        # Refused calls count in bon_requests_total like served ones (shedding alerts read it).
        if self.metrics is not None and service in _BOUNDED_SERVICES:
            self.metrics.requests.labels(_api_label(name), status_of(err)[0].name).inc()

    def _bounded(self, handler: grpc.RpcMethodHandler, service: str, name: str) -> grpc.RpcMethodHandler:
        limiter = self.guard.in_flight

        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await self._admit(context, service, name)
                try:
                    return await inner_unary(request, context)
                finally:
                    limiter.leave()

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await self._admit(context, service, name)
                try:
                    async for item in inner_stream(request, context):
                        yield item
                finally:
                    limiter.leave()

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # BestOfN has no client-streaming RPCs

    async def _admit(self, context: grpc.aio.ServicerContext, service: str, name: str) -> None:
        """Take an in-flight slot, or abort the call with RESOURCE_EXHAUSTED (context.abort raises)."""
        try:
            self.guard.in_flight.enter()
        except BonError as err:
            self._record(service, name, err)
            code, details, metadata = status_of(err)
            await context.abort(code, details, trailing_metadata=metadata)


def _refusing(handler: grpc.RpcMethodHandler, error: BonError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only aborts with `error`'s status."""
    code, details, metadata = status_of(error)

    async def abort(_: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, details, trailing_metadata=metadata)

    async def abort_stream(_: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, details, trailing_metadata=metadata)
        yield  # pragma: no cover - abort raises; this only makes a generator

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)
