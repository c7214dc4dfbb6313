"""A reward model whose forward runs on vLLM pooling servers (backend = "vllm").

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
from bon_gateway.scoring.worker.runtime import GroupOutcome, ModelRuntime, OpenedGroup, Scored
from bon_gateway.scoring.worker.vllm_backend import VllmBackend

__all__ = ["VllmRuntime"]


class _ServerBatches:
    """Stands in for the Batcher: the vLLM server queues and batches; this counts what
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


class VllmRuntime(ModelRuntime):
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
        self.backend = VllmBackend(entry, adapter)

    @property
    def device(self) -> str:
        return f"vllm:{self.backend.label}"

    def available(self) -> bool:
        return self.backend.available()

    async def start_backend(self) -> None:
        await self.backend.check()

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
