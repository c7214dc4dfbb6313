"""Cross-request dynamic batching under a token budget.

Policy (pure, `pick_batch`): the oldest queued group always goes first (no
starvation); the groups closest to it in length join while the padded batch
stays within `max_batch_tokens`, so padding stays small. A group larger than
the budget runs alone.

Dependencies: a group whose context holds a span that a queued stem computes
(batch groups, groups.py) runs in that stem's batch, after it, or later; a stem
that continues a span still being computed waits for the batch after it. When a
stem's batch fails, or its request drops it before it ran, the groups that read
it fail with ContextLost and their requests plan them again.

Timing (`Batcher`): the forward pass runs in one thread, one batch at a time.
Requests that arrive while it is busy queue up and form the next batch, so a
loaded worker batches without waiting; an idle worker starts at once, waiting
up to `max_wait_ms` only while other requests are still being tokenized (they
are known to be on their way), so a lone request is not delayed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from bon_gateway.logs import log_phase
from bon_gateway.scoring.worker.groups import ContextLost, Group, batch_cost
from bon_gateway.scoring.worker.packed import FAILED, PENDING, KVSpan

log = logging.getLogger("bon_gateway.worker")

R = TypeVar("R")


def length_key(group: Group) -> int:
    return group.max_suffix if group.prefix else group.max_len


def _provided(group: Group) -> list[KVSpan]:
    return [group.stem.span] if group.stem is not None else []


def pick_batch(queue: Sequence[Group], max_batch_tokens: int) -> list[int]:
    """Indices (into the queue, oldest first) of the groups to run next.

    A group that reads spans still to be computed comes with the queued stems that
    compute them (a group computing a stem itself must find its context computed).
    """
    if not queue:
        return []
    provider = {id(span): i for i, g in enumerate(queue) for span in _provided(g)}

    def needs(i: int) -> list[int] | None:
        """The queued stems group i must run with; None: it cannot run in this batch."""
        out: list[int] = []
        for span in queue[i].waiting_on():
            j = provider.get(id(span))
            if j is None or queue[i].computes_stem or queue[j].waiting_on():
                return None
            out.append(j)
        return out

    first = next((i for i in range(len(queue)) if needs(i) is not None), None)
    if first is None:
        return []
    chosen = {first, *(needs(first) or [])}
    anchor = length_key(queue[first])
    others = sorted(range(len(queue)), key=lambda i: (abs(length_key(queue[i]) - anchor), i))
    for i in others:
        if i in chosen:
            continue
        required = needs(i)
        if required is None:
            continue
        trial = chosen | {i, *required}
        if batch_cost([queue[j] for j in trial]) <= max_batch_tokens:
            chosen = trial
    return sorted(chosen)


def _lost(group: Group, queued: set[int]) -> bool:
    """Whether a group reads a span that no batch will compute any more."""
    return any(
        span.state == FAILED or (span.state == PENDING and id(span) not in queued)
        for span in group.waiting_on()
    )


@dataclass(slots=True)
class _Item(Generic[R]):
    group: Group
    future: asyncio.Future[tuple[R, float]]
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher(Generic[R]):
    """Queues groups and runs them in batches; `run` executes one batch (in a thread)."""

    def __init__(
        self,
        run: Callable[[list[Group]], list[R]],
        *,
        max_batch_tokens: int,
        max_wait_ms: float,
    ) -> None:
        self._run = run
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: list[_Item[R]] = []
        self._wakeup = asyncio.Event()
        self._incoming = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batcher")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    @property
    def queued_tokens(self) -> int:
        """Real tokens waiting for a batch (the worker sheds load above a bound)."""
        return sum(item.group.real_tokens for item in self._queue if not item.future.done())

    def announce(self) -> None:
        """A request arrived and is being tokenized: worth waiting for briefly."""
        self._incoming += 1
        self._wakeup.set()

    def withdraw(self) -> None:
        self._incoming -= 1
        self._wakeup.set()

    def enqueue(self, group: Group) -> asyncio.Future[tuple[R, float]]:
        """Queue a group now (a stem before the groups that read it); its future gives the
        batch result and the queue time in seconds. Cancelling the future drops the group."""
        future: asyncio.Future[tuple[R, float]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Item(group, future))
        self._wakeup.set()
        return future

    async def submit(self, group: Group) -> tuple[R, float]:
        """The batch result for this group and its queue time in seconds."""
        return await self.enqueue(group)

    def _drop_lost(self) -> None:
        """Drop cancelled groups (failing the stems they would have computed) and fail the
        groups that read spans no batch will compute any more, until nothing changes."""
        while True:
            kept: list[_Item[R]] = []
            for item in self._queue:
                if item.future.done():
                    for span in _provided(item.group):
                        if span.state == PENDING:
                            span.state = FAILED
                else:
                    kept.append(item)
            self._queue = kept
            queued = {id(span) for item in kept for span in _provided(item.group)}
            lost = [item for item in kept if _lost(item.group, queued)]
            if not lost:
                return
            for item in lost:
                item.future.set_exception(ContextLost("a stem this group reads was not computed"))

    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            self._drop_lost()
            if not self._queue:
                continue
            deadline = self._queue[0].enqueued + self.max_wait_s
            while self._incoming > 0 and time.perf_counter() < deadline:
                if batch_cost([item.group for item in self._queue]) >= self.max_batch_tokens:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), deadline - time.perf_counter())
                except TimeoutError:
                    break
            picked = pick_batch([item.group for item in self._queue], self.max_batch_tokens)
            if not picked:  # cannot happen while _drop_lost holds; never spin on it
                oldest = self._queue.pop(0)
                oldest.future.set_exception(ContextLost("no batch can run this group"))
                self._wakeup.set()
                continue
            items = [self._queue[i] for i in picked]
            self._queue = [item for i, item in enumerate(self._queue) if i not in set(picked)]
            started = time.perf_counter()
            try:
                results = await asyncio.to_thread(self._run, [item.group for item in items])
            except Exception as err:  # a failed batch fails its requests, not the worker
                log_phase(log, "batch", logging.ERROR, exc_info=True, error=type(err).__name__)
                for item in items:
                    for span in _provided(item.group):
                        if span.state == PENDING:
                            span.state = FAILED
                    if not item.future.done():
                        item.future.set_exception(err)
            else:
                for item, result in zip(items, results, strict=True):
                    if not item.future.done():
                        item.future.set_result((result, started - item.enqueued))
            if self._queue:
                self._wakeup.set()
