"""One loaded reward model inside a worker: tokenize, batch, run, reward."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bon_gateway.config import RewardModelConfig
from bon_gateway.logs import log_phase
from bon_gateway.scoring.worker.adapters import Adapter
from bon_gateway.scoring.worker.batching import Batcher
from bon_gateway.scoring.worker.forward import BatchFigures, Forward, Group, batch_cost, common_prefix
from bon_gateway.types import Message

log = logging.getLogger("bon_gateway.worker")


@dataclass(slots=True)
class GroupOutcome:
    logits: list[torch.Tensor]  # per candidate [positions, labels], fp32
    # The batch's figures ride on the first group of each batch only (None on the others),
    # so the gateway observes every batch exactly once.
    figures: BatchFigures | None
    reused_tokens: int
    compute_seconds: float


@dataclass(slots=True)
class Scored:
    rewards: list[tuple[float, tuple[float, ...]]]
    tokens: list[int]
    prompt_tokens: int
    outcome: GroupOutcome
    queue_seconds: float


class ModelRuntime:
    def __init__(
        self,
        entry: RewardModelConfig,
        adapter: Adapter,
        *,
        prefix_reuse: bool = True,
        max_queue_tokens: int | None = None,
    ) -> None:
        self.entry = entry
        # Bounded queue: beyond this many waiting tokens new groups are refused (RESOURCE_EXHAUSTED)
        # instead of piling up until memory or deadlines run out.
        self.max_queue_tokens = max_queue_tokens or 64 * entry.max_batch_tokens
        self.adapter = adapter
        device = next(adapter.model.parameters()).device
        self.forward = Forward(adapter, device)
        packed = self.forward.packed
        log_phase(
            log,
            "plan",
            model=entry.name,
            batches="packed" if packed else "transformers",
            linears="onednn-fused" if packed and packed.linear.onednn else "torch",
        )
        self.prefix_reuse = prefix_reuse and adapter.supports_prefix_reuse
        self.batcher: Batcher[GroupOutcome] = Batcher(
            self._run_batch, max_batch_tokens=entry.max_batch_tokens, max_wait_ms=entry.max_wait_ms
        )

    @property
    def device(self) -> str:
        return str(self.forward.device)

    def prepare(
        self, messages: Sequence[Message], candidates: Sequence[str], steps: Sequence[Sequence[str]]
    ) -> tuple[Group, int]:
        """Tokenize a group; InputTooLong names the candidate and the limit."""
        seqs: list[list[int]] = []
        positions: list[list[int]] = []
        prompt_tokens = 0
        for i, answer in enumerate(candidates):
            enc = self.adapter.encode(messages, answer, steps[i] if steps else (), what=f"candidates[{i}]")
            seqs.append(enc.ids)
            positions.append(enc.positions)
            prompt_tokens = max(prompt_tokens, enc.prompt_tokens)
        prefix = common_prefix(seqs) if self.prefix_reuse else 0
        return Group(seqs=seqs, positions=positions, prefix=prefix), prompt_tokens

    def _run_batch(self, groups: list[Group]) -> list[GroupOutcome]:
        started = time.perf_counter()
        logits, figures = self.forward.run(groups)
        seconds = time.perf_counter() - started
        log_phase(
            log,
            "batch",
            logging.DEBUG,
            model=self.entry.name,
            groups=len(groups),
            rows=figures.rows,
            tokens=figures.batch_tokens,
            seconds=seconds,
        )
        return [
            GroupOutcome(per, figures if i == 0 else None, (len(g.seqs) - 1) * g.prefix, seconds)
            for i, (g, per) in enumerate(zip(groups, logits, strict=True))
        ]

    def overloaded(self, group: Group) -> bool:
        queued = self.batcher.queued_tokens
        return queued > 0 and queued + group.real_tokens > self.max_queue_tokens

    async def score(self, group: Group, prompt_tokens: int, activation: str) -> Scored:
        parts = split_group(group, self.entry.max_batch_tokens)
        if len(parts) == 1:
            outcome, queued = await self.batcher.submit(group)
            logits = outcome.logits
        else:
            # A group above the token budget runs as several batches (bounded memory); each
            # part recomputes the shared prompt, which only such huge groups pay for.
            done = await asyncio.gather(*(self.batcher.submit(part) for part, _ in parts))
            by_index: dict[int, torch.Tensor] = {}
            for (_, indices), (part_outcome, _) in zip(parts, done, strict=True):
                by_index.update(zip(indices, part_outcome.logits, strict=True))
            logits = [by_index[i] for i in range(len(group.seqs))]
            queued = max(q for _, q in done)
            figures = [o.figures for o, _ in done]
            outcome = GroupOutcome(
                logits,
                next((f for f in figures if f is not None), None),
                sum(o.reused_tokens for o, _ in done),
                sum(o.compute_seconds for o, _ in done),
            )
        rewards = [self.adapter.reward(lg, activation) for lg in logits]
        return Scored(rewards, [len(s) for s in group.seqs], prompt_tokens, outcome, queued)


def split_group(group: Group, max_batch_tokens: int) -> list[tuple[Group, list[int]]]:
    """Parts of a group that each fit the token budget (one row at least), with their indices.

    Candidates are taken in length order so each part pads little.
    """
    if batch_cost([group]) <= max_batch_tokens or len(group.seqs) == 1:
        return [(group, list(range(len(group.seqs))))]
    order = sorted(range(len(group.seqs)), key=lambda i: len(group.seqs[i]))
    parts: list[tuple[Group, list[int]]] = []
    current: list[int] = []

    def make(indices: list[int]) -> Group:
        seqs = [group.seqs[i] for i in indices]
        prefix = min(group.prefix, min(len(s) for s in seqs) - 1) if len(seqs) > 1 else 0
        return Group(seqs=seqs, positions=[group.positions[i] for i in indices], prefix=max(prefix, 0))

    for i in order:
        if current and batch_cost([make([*current, i])]) > max_batch_tokens:
            parts.append((make(current), current))
            current = []
        current.append(i)
    parts.append((make(current), current))
    return parts
