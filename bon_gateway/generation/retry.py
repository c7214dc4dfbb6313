"""When to retry an upstream call and how long to wait: pure policy, no I/O.

Retried: connect errors, timeouts, 429 and 5xx (the upstream or the network
may recover). Not retried: other 4xx (the same body fails the same way).
Waits grow exponentially with full jitter, a Retry-After header sets the
floor, and no wait may run past the request's deadline.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

__all__ = ["RetryPolicy", "client_fault", "parse_retry_after", "retryable_status"]

# The upstream's 4xx that mean "this request is wrong" (too long a prompt, bad
# parameter values): the client gets them as a 400. 401/403/404 mean the
# gateway's own configuration is wrong (key, model name, path) and stay 503s.
CLIENT_FAULT_STATUSES = frozenset({400, 413, 422})


def retryable_status(status: int) -> bool:
    return status == 429 or status == 408 or status >= 500


def client_fault(status: int) -> bool:
    return status in CLIENT_FAULT_STATUSES


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int = 2
    base_s: float = 0.05
    max_s: float = 2.0

    def delay(
        self, attempt: int, retry_after_s: float | None = None, rng: random.Random | None = None
    ) -> float:
        """Wait before retry number `attempt` (1-based): full jitter over an exponential cap.

        Full jitter spreads the retries of the N candidates of a request (and of
        every request hit by the same outage) instead of sending them in waves.
        """
        cap = min(self.max_s, self.base_s * (2 ** (attempt - 1)))
        wait = (rng or random).uniform(0.0, cap)
        if retry_after_s is not None:
            # The upstream said when it can take more; sooner is a wasted call.
            wait = max(wait, retry_after_s)
        return wait
