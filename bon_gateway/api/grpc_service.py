"""The BestOfN gRPC servicer (grpc.aio) and the one BonError -> status mapping.

Servicer methods only convert (grpc_convert.py) and call the engine; every
RPC runs inside `_rpc`, which records metrics and turns errors into statuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator

import grpc

from bon_gateway.api import grpc_convert as convert
from bon_gateway.api.grpc_decode import Undecodable, decoded
from bon_gateway.engine.engine import Engine
from bon_gateway.errors import (
    BonError,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    Unauthenticated,
    Unavailable,
)
from bon_gateway.metrics import Metrics
from bon_gateway.types import CandidateScore, CheckpointReport, Deadline, Generation
from bon_gateway.v1 import best_of_n_pb2 as pb
from bon_gateway.v1 import best_of_n_pb2_grpc as pb_grpc

__all__ = ["BestOfNService", "grpc_status", "status_of"]

log = logging.getLogger("bon_gateway.api")

# bon_requests_total{api} of each RPC.
_API_LABELS = {
    "Generate": "grpc_generate",
    "GenerateStream": "grpc_generate_stream",
    "Score": "grpc_score",
    "ListModels": "grpc_list_models",
}


def grpc_status(error: BonError) -> grpc.StatusCode:
    """gRPC status of a gateway error (subclasses first: UpstreamError is an Unavailable)."""
    if isinstance(error, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(error, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, Unavailable):  # also UpstreamError, WorkerError
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, DeadlineExceeded):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.INTERNAL


def _details(error: BonError) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Status details and trailing metadata; the details name the field for bad input."""
    metadata: list[tuple[str, str]] = [("bon-error-code", error.code)]
    message = error.message
    if error.param:
        metadata.append(("bon-error-param", error.param))
        if not message.startswith(error.param):
            message = f"{error.param}: {message}"
    if isinstance(error, Overloaded):
        metadata.append(("retry-after", str(max(1, math.ceil(error.retry_after_s)))))
    return message, tuple(metadata)


def status_of(error: BonError) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, details, trailing metadata) of a gateway error, for aborts outside a servicer."""
    details, metadata = _details(error)
    return grpc_status(error), details, metadata


class BestOfNService(pb_grpc.BestOfNServicer):
    """BestOfN over one Engine (the same one the HTTP front uses)."""

    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        self._default_best_of = engine.config.server.default_best_of

    # -- plumbing -------------------------------------------------------
    def _deadline(self, context: grpc.aio.ServicerContext) -> Deadline:
        """The request's one deadline: the client's when it set one, capped by the server's timeout."""
        limit = self.engine.config.server.request_timeout_s
        remaining = context.time_remaining()
        return Deadline.after(limit if remaining is None else max(0.0, min(limit, remaining)))

    @contextlib.asynccontextmanager
    async def _rpc(self, method: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Metrics for one RPC, and its error turned into a status."""
        api = _API_LABELS[method]
        in_flight = self.metrics.requests_in_flight.labels(api)
        in_flight.inc()
        started = time.perf_counter()
        error: BonError | None = None
        status = grpc.StatusCode.OK
        try:
            yield
        except asyncio.CancelledError:
            # The client cancelled or its deadline passed: grpc.aio cancels us.
            status = grpc.StatusCode.CANCELLED
            raise
        except BonError as exc:
            error = exc
            status = grpc_status(exc)
        except Exception:
            log.exception("unhandled error in %s", api)
            status = grpc.StatusCode.INTERNAL
        finally:
            in_flight.dec()
            self.metrics.request_duration.labels(api).observe(time.perf_counter() - started)
            self.metrics.requests.labels(api, status.name).inc()
        if status is grpc.StatusCode.OK:
            return
        if error is None or status is grpc.StatusCode.INTERNAL:
            # Internals (tracebacks, upstream bodies) stay in the log.
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        else:
            error.param = convert.grpc_param(error.param, method)
            details, metadata = _details(error)
            await context.abort(status, details, trailing_metadata=metadata)

    # -- RPCs -----------------------------------------------------------
    async def Generate(
        self, request: pb.GenerateRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        async with self._rpc("Generate", context):
            request = decoded(request)
            deadline = self._deadline(context)
            admitted = self.engine.admit(convert.bon_request_from_proto(request, self._default_best_of))
            result = await self.engine.run(admitted, deadline)
            return convert.generate_response(result, admitted.request)
        raise AssertionError("unreachable: _rpc aborts on error")

    async def GenerateStream(
        self, request: pb.GenerateRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateEvent]:
        async with self._rpc("GenerateStream", context):
            request = decoded(request)
            deadline = self._deadline(context)
            admitted = self.engine.admit(convert.bon_request_from_proto(request, self._default_best_of))
            # The engine reports progress through callbacks; a queue turns them
            # into stream messages without blocking the engine on a slow reader.
            events: asyncio.Queue[pb.GenerateEvent | None] = asyncio.Queue()

            async def on_generated(generation: Generation) -> None:
                events.put_nowait(convert.generated_event(generation))

            async def on_scored(index: int, score: CandidateScore) -> None:
                events.put_nowait(convert.scored_event(index, score))

            async def on_checkpoint(report: CheckpointReport) -> None:
                events.put_nowait(convert.checkpoint_event(report))

            run = asyncio.ensure_future(
                self.engine.run(
                    admitted,
                    deadline,
                    on_generated=on_generated,
                    on_scored=on_scored,
                    on_checkpoint=on_checkpoint,
                )
            )
            run.add_done_callback(lambda _: events.put_nowait(None))
            try:
                while (event := await events.get()) is not None:
                    yield event
                result = await run
            finally:
                run.cancel()
            yield pb.GenerateEvent(result=convert.generate_response(result, admitted.request))

    async def Score(
        self, request: pb.ScoreRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        async with self._rpc("Score", context):
            request = decoded(request)
            deadline = self._deadline(context)
            admitted = self.engine.admit_score(convert.score_request_from_proto(request))
            result = await self.engine.score(admitted, deadline)
            return convert.score_response(result)
        raise AssertionError("unreachable: _rpc aborts on error")

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        async with self._rpc("ListModels", context):
            return convert.list_models_response(self.engine.list_models())
        raise AssertionError("unreachable: _rpc aborts on error")
