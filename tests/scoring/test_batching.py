"""Batching policy (pure) and the batcher's timing, with a fake forward."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator

import pytest

from bon_gateway.scoring.worker.batching import Batcher, pick_batch
from bon_gateway.scoring.worker.forward import Group


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
    async with running(fake, max_batch_tokens=1000, max_wait_ms=2000) as batcher:
        started = time.perf_counter()
        result, queued = await batcher.submit(group(7))
        assert result == 7
        assert time.perf_counter() - started < 0.5
        assert queued < 0.5


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
