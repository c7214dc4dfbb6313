"""A reward model whose forward runs on HTTP pooling servers (backend = "vllm" / "sglang").

The same runtime as for our own forward where it decides what is scored: the
adapter's tokenization and checks (`prepare`, InputTooLong naming the field),
open groups, rewards from head outputs. What differs: no prefix cache and no
batcher here (the server keeps its own prefix cache and batches continuously, so
each group goes to it at once, as one request), and logits come from the server.
"""

from __future__ import annotations

import time
from collections import OrderedDict

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.adapters import Adapter
from bon_gateway.scoring.worker.groups import Group
from bon_gateway.scoring.worker.http_backend import HttpScoringBackend
from bon_gateway.scoring.worker.runtime import (
    BackendServerFigures,
    GroupOutcome,
    ModelRuntime,
    OpenedGroup,
    Scored,
)

__all__ = ["RemoteRuntime", "backend_class", "backend_task"]


def backend_class(backend: str) -> type[HttpScoringBackend]:
    """The HTTP backend of a model entry's `backend` ("vllm" or "sglang")."""
    if backend == "sglang":
        from bon_gateway.scoring.worker.sglang_backend import SglangBackend

        return SglangBackend
    if backend == "vllm":
        from bon_gateway.scoring.worker.vllm_backend import VllmBackend

        return VllmBackend
    raise ValueError(f"backend {backend!r} has no HTTP servers")


def backend_task(backend: str, adapter: Adapter) -> str:
    """The server task for this adapter; ValueError (one line) when that server cannot score it."""
    return backend_class(backend).task_for(adapter)


class _ServerBatches:
    """Stands in for the Batcher: the server queues and batches; this counts what
    is outstanding there, for the worker's overload bound."""

    def __init__(self) -> None:
        self.queued_tokens = 0

    def start(self) -> None:
        pass

    def announce(self) -> None:
        pass

    def withdraw(self) -> None:
        pass

    async def aclose(self) -> None:
        pass


class RemoteRuntime(ModelRuntime):
    # ModelRuntime.__init__ is not called: it builds the local forward, the cache and the
    # batcher, none of which exist here. The attributes its shared methods read are set below.
    def __init__(
        self, entry: RewardModelConfig, adapter: Adapter, *, max_queue_tokens: int | None = None
    ) -> None:
        self.entry = entry
        self.adapter = adapter
        self.max_queue_tokens = max_queue_tokens or 64 * entry.max_batch_tokens
        self.prefix_reuse = False
        self.cache = None
        self.cache_limit = None
        self.groups: OrderedDict[str, OpenedGroup] = OrderedDict()
        self.outstanding = _ServerBatches()
        self.batcher = self.outstanding  # type: ignore[assignment]
        self.backend = backend_class(entry.backend)(entry, adapter)

    @property
    def device(self) -> str:
        return f"{self.entry.backend}:{self.backend.label}"

    async def start_backend(self) -> None:
        await self.backend.check()

    async def aclose_backend(self) -> None:
        await self.backend.aclose()

    def backend_servers(self) -> list[BackendServerFigures]:
        balancer = self.backend.balancer
        return [
            BackendServerFigures(e.label, balancer.available(e), e.outstanding, self.backend.stats[e.label])
            for e in balancer.endpoints
        ]

    async def score(
        self,
        group: Group,
        prompt_tokens: int,
        activation: str,
        *,
        keep: bool = False,
        owner: OpenedGroup | None = None,
    ) -> Scored:
        tokens = group.real_tokens
        self.outstanding.queued_tokens += tokens
        started = time.perf_counter()
        try:
            logits = await self.backend.logits(group.seqs, group.positions)
        finally:
            self.outstanding.queued_tokens -= tokens
        seconds = time.perf_counter() - started
        outcome = GroupOutcome(logits, None, 0, seconds)
        rewards = [self.adapter.reward(lg, activation) for lg in logits]
        return Scored(rewards, [len(s) for s in group.seqs], prompt_tokens, outcome, 0.0)
