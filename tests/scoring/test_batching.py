"""Batching policy (pure) and the batcher's timing, with a fake forward."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator

import pytest

from bon_gateway.scoring.worker.batching import Batcher, pick_batch
from bon_gateway.scoring.worker.forward import ContextLost, Group, Stem
from bon_gateway.scoring.worker.packed import FAILED, READY, Context


def group(length: int, n: int = 1) -> Group:
    return Group(seqs=[[1] * length] * n, positions=[[length - 1]] * n)


def test_oldest_first_then_closest_lengths_within_budget() -> None:
    queue = [group(100), group(10), group(95), group(400), group(105)]
    # 4 rows padded to 105 = 420: the short one still fits when the budget allows it
    assert pick_batch(queue, 420) == [0, 1, 2, 4]
    assert pick_batch(queue, 419) == [0, 2, 4]
    assert pick_batch(queue, 250) == [0, 2]  # 95 and 105 tie on distance: the older one
    # a group above the budget runs alone
    assert pick_batch([group(500, 4), group(10)], 100) == [0]
    assert pick_batch([], 100) == []


class FakeForward:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.batches: list[int] = []
        self.started = threading.Event()

    def __call__(self, groups: list[Group]) -> list[int]:
        self.batches.append(len(groups))
        self.started.set()
        time.sleep(self.seconds)
        return [g.max_len for g in groups]


@contextlib.asynccontextmanager
async def running(fake: FakeForward, **policy: float) -> AsyncIterator[Batcher[int]]:
    """A started Batcher over `fake`, closed even when an assertion fails."""
    batcher: Batcher[int] = Batcher(fake, **policy)  # type: ignore[arg-type]
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.aclose()


@pytest.mark.asyncio
async def test_lone_request_is_not_delayed() -> None:
    fake = FakeForward(0.0)
    # max_wait is 10 minutes: a batcher that waited for company would not answer at
    # all within the 60 s given here (pytest's own timeout is 300 s).
    async with running(fake, max_batch_tokens=1000, max_wait_ms=600_000) as batcher:
        result, queued = await asyncio.wait_for(batcher.submit(group(7)), 60)
        assert result == 7
        assert fake.batches == [1]
        assert queued < 60


@pytest.mark.asyncio
async def test_requests_arriving_while_busy_form_one_batch() -> None:
    fake = FakeForward(0.3)
    async with running(fake, max_batch_tokens=1000, max_wait_ms=0) as batcher:
        first = asyncio.create_task(batcher.submit(group(5)))
        await asyncio.to_thread(fake.started.wait)
        rest = [asyncio.create_task(batcher.submit(group(n))) for n in (6, 7, 8)]
        results = await asyncio.gather(first, *rest)
        assert [r for r, _ in results] == [5, 6, 7, 8]
        assert fake.batches == [1, 3]


@pytest.mark.asyncio
async def test_waits_for_announced_requests_up_to_max_wait() -> None:
    fake = FakeForward(0.0)
    async with running(fake, max_batch_tokens=1000, max_wait_ms=1000) as batcher:
        batcher.announce()  # a second request is being tokenized
        first = asyncio.create_task(batcher.submit(group(5)))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(batcher.submit(group(6)))
        batcher.withdraw()
        await asyncio.gather(first, second)
        assert fake.batches == [2]


@pytest.mark.asyncio
async def test_budget_splits_batches() -> None:
    fake = FakeForward(0.2)
    async with running(fake, max_batch_tokens=20, max_wait_ms=0) as batcher:
        first = asyncio.create_task(batcher.submit(group(10)))
        await asyncio.to_thread(fake.started.wait)
        rest = [asyncio.create_task(batcher.submit(group(10))) for _ in range(3)]
        await asyncio.gather(first, *rest)
        assert fake.batches == [1, 2, 1]


@pytest.mark.asyncio
async def test_queued_tokens_counts_waiting_groups_only() -> None:
    fake = FakeForward(0.3)
    async with running(fake, max_batch_tokens=1000, max_wait_ms=0) as batcher:
        first = asyncio.create_task(batcher.submit(group(5)))
        await asyncio.to_thread(fake.started.wait)
        assert batcher.queued_tokens == 0  # running, not waiting
        rest = [asyncio.create_task(batcher.submit(group(n, 2))) for n in (6, 7)]
        await asyncio.sleep(0.01)
        assert batcher.queued_tokens == 12 + 14
        await asyncio.gather(first, *rest)
        assert batcher.queued_tokens == 0


# -- stems and the groups that read them ---------------------------------------------------------
def stem(length: int, context: Context = ()) -> Group:
    return Group(seqs=[], positions=[], stem=Stem([1] * length, context))


def reader(stem_group: Group, own: int, n: int = 1) -> Group:
    assert stem_group.stem is not None
    span = stem_group.stem.span
    context = ((span, len(stem_group.stem.ids)),)
    return Group(seqs=[[1] * (len(stem_group.stem.ids) + own)] * n, positions=[[0]] * n, context=context)


def test_a_reader_runs_with_the_stem_it_needs() -> None:
    s = stem(100)
    other = group(30)
    r = reader(s, 30)
    # The stem and its reader go together, the unrelated group as the budget allows.
    assert pick_batch([s, other, r], 1000) == [0, 1, 2]
    # Oldest first: the stem alone when the reader does not fit with it.
    assert pick_batch([s, r], 120) == [0]
    # A stem still pending with no provider in the queue: the reader cannot run (the batcher
    # fails it with ContextLost before picking).
    assert pick_batch([r], 1000) == []


def test_a_stem_continuing_a_pending_stem_waits_for_the_next_batch() -> None:
    first = stem(50)
    assert first.stem is not None
    second = stem(20, ((first.stem.span, 50),))
    assert pick_batch([first, second], 1000) == [0]
    first.stem.span.state = READY  # its batch ran
    assert pick_batch([second], 1000) == [0]


class FailingStems(FakeForward):
    """Fails any batch that holds a stem."""

    def __call__(self, groups: list[Group]) -> list[int]:
        if any(g.stem is not None for g in groups):
            self.batches.append(len(groups))
            raise RuntimeError("stem failed")
        return super().__call__(groups)


@pytest.mark.asyncio
async def test_readers_of_a_failed_or_dropped_stem_get_context_lost() -> None:
    fake = FailingStems(0.0)
    async with running(fake, max_batch_tokens=1000, max_wait_ms=0) as batcher:
        s = stem(40)
        stem_future = batcher.enqueue(s)
        reader_future = batcher.enqueue(reader(s, 10))
        with pytest.raises(RuntimeError):
            await stem_future
        with pytest.raises(RuntimeError):
            await reader_future  # it ran in the stem's batch: a failed batch fails its groups
        assert s.stem is not None and s.stem.span.state == FAILED
        # A later reader of the failed stem is failed before any batch runs.
        with pytest.raises(ContextLost):
            await batcher.submit(reader(s, 5))
    fake = FakeForward(0.3)
    async with running(fake, max_batch_tokens=1000, max_wait_ms=0) as batcher:
        busy = batcher.enqueue(group(5))
        await asyncio.to_thread(fake.started.wait)
        s = stem(40)
        dropped = batcher.enqueue(s)
        waiting = batcher.enqueue(reader(s, 10))
        dropped.cancel()  # its request went away before the stem ran
        with pytest.raises(ContextLost):
            await waiting
        await busy
        assert fake.batches == [1]
