"""Retrying a failed call: how long to wait, whether to try again, and the one
loop that does it, bounded by the request's deadline.

Used by the upstream calls (generation/caller.py), the reward-worker calls
(scoring/pool.py) and the batch job's requests (batch/runner.py). What counts
as retryable is each caller's business (`retry_after` returns None for a
failure not worth another try); the policy and the deadline decide the rest.
No I/O but `asyncio.sleep`.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from bon_gateway.types import Deadline

__all__ = ["GaveUp", "RetryPolicy", "retry_call"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int = 2
    base_s: float = 0.05
    max_s: float = 2.0
    # Full jitter spreads the retries of the N candidates of a request (and of
    # every request hit by the same outage) instead of sending them in waves.
    jitter: bool = True

    def delay(
        self, attempt: int, retry_after_s: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Wait before retry number `attempt` (1-based): full jitter over an exponential cap."""
        cap = min(self.max_s, self.base_s * (2 ** (attempt - 1)))
        wait = (rng or random).uniform(0.0, cap) if self.jitter else cap
        if retry_after_s is not None:
            # The peer said when it can take more; sooner is a wasted call.
            wait = max(wait, retry_after_s)
        return wait


class GaveUp(Exception):
    """No further attempt: `last` is the final failure, `why` says what stopped the retrying."""

    def __init__(self, last: Exception, why: str, attempts: int) -> None:
        super().__init__(f"{why} after {attempts} attempt(s): {last}")
        self.last = last
        self.why = why  # "not_retryable" | "attempts" | "deadline"
        self.attempts = attempts


async def retry_call(
    attempt: Callable[[int], Awaitable[T]],
    policy: RetryPolicy,
    *,
    retry_after: Callable[[Exception], float | None],
    deadline: Deadline | None = None,
    before_retry: Callable[[Exception, int], Awaitable[None]] | None = None,
    rng: random.Random | None = None,
) -> T:
    """`await attempt(n)` for n = 1, 2, ... until it succeeds or retrying must stop.

    `retry_after(error)` is None for a failure not worth another try, else the
    least wait the peer asked for (0.0 for none). A wait that would reach the
    deadline is not taken. `before_retry(error, n)` runs before attempt n + 1
    (e.g. to see whether a worker is dying). Raises GaveUp with the last failure.
    """
    number = 1
    while True:
        try:
            return await attempt(number)
        except Exception as error:
            floor = retry_after(error)
            if floor is None:
                raise GaveUp(error, "not_retryable", number) from error
            if number > policy.retries:
                raise GaveUp(error, "attempts", number) from error
            wait = policy.delay(number, floor or None, rng)
            if deadline is not None and wait >= deadline.remaining():
                raise GaveUp(error, "deadline", number) from error
            if before_retry is not None:
                await before_retry(error, number)
            if wait > 0:
                await asyncio.sleep(wait)
            number += 1
