"""The RewardWorker gRPC service (grpc.aio) with health and reflection."""

from __future__ import annotations

import asyncio
import logging
import os

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from bon_gateway.logs import log_phase
from bon_gateway.scoring.worker.formatting import InvalidInput
from bon_gateway.scoring.worker.runtime import ModelRuntime
from bon_gateway.scoring.worker.status import ERROR_PARAM_KEY
from bon_gateway.types import ACTIVATIONS, Message, RawInput
from bon_gateway.v1 import reward_worker_pb2 as pb
from bon_gateway.v1 import reward_worker_pb2_grpc as pb_grpc

log = logging.getLogger("bon_gateway.worker")

SERVICE_NAME = "bon_gateway.v1.RewardWorker"


async def _invalid(context: grpc.aio.ServicerContext, param: str, message: str) -> None:
    """INVALID_ARGUMENT with the field in the trailing metadata (the pool reads it there)."""
    await context.abort(
        grpc.StatusCode.INVALID_ARGUMENT, message, trailing_metadata=((ERROR_PARAM_KEY, param),)
    )


class RewardWorkerService(pb_grpc.RewardWorkerServicer):
    def __init__(self, runtimes: dict[str, ModelRuntime]) -> None:
        self.runtimes = runtimes
        self.groups_scored = 0

    async def _runtime(self, name: str, context: grpc.aio.ServicerContext) -> ModelRuntime:
        if not name and len(self.runtimes) == 1:
            return next(iter(self.runtimes.values()))
        runtime = self.runtimes.get(name)
        if runtime is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"reward model {name!r} is not served here (serving: {', '.join(self.runtimes)})",
            )
        assert runtime is not None
        return runtime

    async def Score(
        self, request: pb.WorkerScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerScoreResponse:
        runtime = await self._runtime(request.model, context)
        activation = request.activation or runtime.entry.activation
        if activation not in ACTIVATIONS:
            await _invalid(
                context,
                "activation",
                f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}",
            )
        messages = [Message(m.role, m.content) for m in request.messages]
        steps = [tuple(s.steps) for s in request.steps]
        candidates = list(request.candidates) or [request_steps_text(s) for s in steps]
        raw = [RawInput(r.text, tuple(r.token_ids)) for r in request.raw]
        if not candidates and not raw:
            await _invalid(context, "candidates", "candidates must be a non-empty list")
        runtime.batcher.announce()
        try:
            group, prompt_tokens = await asyncio.to_thread(
                runtime.prepare, messages, candidates, steps, raw, request.truncate_prompt_tokens
            )
        except InvalidInput as err:
            await _invalid(context, err.param, str(err))
        finally:
            runtime.batcher.withdraw()
        if runtime.overloaded(group):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"reward model {runtime.entry.name!r} is overloaded: {runtime.batcher.queued_tokens} tokens "
                f"queued (limit {runtime.max_queue_tokens})",
            )
        owner = runtime.group(request.group_id)
        scored = await runtime.score(
            group, prompt_tokens, activation, keep=request.keep_candidates, owner=owner
        )
        outcome = scored.outcome
        stats = pb.WorkerStats(
            queue_seconds=scored.queue_seconds,
            compute_seconds=outcome.compute_seconds,
            reused_prompt_tokens=outcome.reused_tokens,
        )
        if runtime.cache is not None:
            stats.cache_bytes = runtime.cache.used_bytes
            stats.cache_entries = runtime.cache.entries
        self.groups_scored += 1
        if outcome.figures is not None:
            stats.batch_size = outcome.figures.rows
            stats.batch_tokens = outcome.figures.batch_tokens
            stats.padded_tokens = outcome.figures.padded_tokens
        return pb.WorkerScoreResponse(
            scores=[
                pb.WorkerScore(
                    reward=reward,
                    step_rewards=list(step_rewards),
                    tokens=tokens,
                    logits=logits.flatten().tolist(),
                    labels=int(logits.shape[-1]),
                )
                for (reward, step_rewards), tokens, logits in zip(
                    scored.rewards, scored.tokens, outcome.logits, strict=True
                )
            ],
            prompt_tokens=scored.prompt_tokens,
            total_tokens=sum(scored.tokens),
            stats=stats,
        )

    async def OpenGroup(
        self, request: pb.WorkerOpenGroupRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerOpenGroupResponse:
        runtime = await self._runtime(request.model, context)
        messages = [Message(m.role, m.content) for m in request.messages]
        try:
            group, kept = await runtime.open_group(messages, request.ttl_s)
        except InvalidInput as err:
            await _invalid(context, err.param, str(err))
        log_phase(
            log,
            "open-group",
            logging.DEBUG,
            model=runtime.entry.name,
            id=request.request_id,
            group=group.id,
            prompt_tokens=group.prompt_tokens,
            kept=kept,
        )
        return pb.WorkerOpenGroupResponse(group_id=group.id, prompt_tokens=group.prompt_tokens, kept=kept)

    async def CloseGroup(
        self, request: pb.WorkerCloseGroupRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerCloseGroupResponse:
        runtime = await self._runtime(request.model, context)
        return pb.WorkerCloseGroupResponse(found=runtime.close_group(request.group_id))

    async def Info(
        self, request: pb.WorkerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.WorkerInfoResponse:
        # The pool's probe reads the backend servers here: a model none of whose servers is
        # up takes this worker out of service there (and /ready follows) until one is.
        servers = [
            pb.BackendServer(
                model=name,
                server=figures.label,
                up=figures.up,
                in_flight=figures.in_flight,
                calls=figures.stats.calls,
                latency_counts=figures.stats.latency_counts,
                latency_sum=figures.stats.latency_sum,
                errors=figures.stats.errors,
            )
            for name, rt in self.runtimes.items()
            for figures in rt.backend_servers()
        ]
        models = [
            pb.WorkerModel(
                name=name,
                architecture=rt.adapter.architecture,
                kind=rt.adapter.kind,
                max_length=min(rt.adapter.max_length, 2**31 - 1),
            )
            for name, rt in self.runtimes.items()
        ]
        device = next(iter(self.runtimes.values())).device if self.runtimes else ""
        return pb.WorkerInfoResponse(
            models=models,
            device=device,
            pid=os.getpid(),
            groups_scored=self.groups_scored,
            backend_servers=servers,
        )


def request_steps_text(steps: tuple[str, ...]) -> str:
    return "".join(steps)


async def build_server(runtimes: dict[str, ModelRuntime], listen: str) -> grpc.aio.Server:
    """A started server on `listen` (unix:PATH or HOST:PORT), health SERVING."""
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    )
    pb_grpc.add_RewardWorkerServicer_to_server(  # type: ignore[no-untyped-call]
        RewardWorkerService(runtimes), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    port = server.add_insecure_port(listen)
    if port == 0 and not listen.startswith("unix:"):
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    # The models are loaded before the server starts, so it is ready as soon as it listens.
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return server
