"""Which upstream HTTP replies are worth a retry, and what Retry-After says: pure, no I/O.

Retried: connect errors, timeouts, 429 and 5xx (the upstream or the network
may recover). Not retried: other 4xx (the same body fails the same way).
How long to wait is bon_gateway/retry.py's RetryPolicy (a Retry-After header
sets the floor; no wait runs past the request's deadline).
"""

from __future__ import annotations

import email.utils
import re
import time

__all__ = ["client_fault", "parse_retry_after", "retryable_status", "validation_failure"]

# The upstream's 4xx that mean "this request is wrong" (too long a prompt, bad
# parameter values, a model it does not serve): the client gets them as its own
# 4xx. 401/403 mean the gateway's configuration (its key) is wrong: a 503. No 4xx
# counts against the upstream's health: it answered, and correctly.
CLIENT_FAULT_STATUSES = frozenset({400, 404, 413, 422})
# llama-cpp-python answers a request that fails its own validation (top_p > 1, an
# unknown role, a bad response_format) with a 500 whose message is pydantic's
# "N validation error(s)": the client's fault, not the upstream's.
_VALIDATION_MESSAGE = re.compile(r"^\s*\d+ validation errors?\b")


def validation_failure(status: int, message: str) -> bool:
    """A 5xx that is really the upstream refusing the request's fields (llama-cpp-python)."""
    return status == 500 and _VALIDATION_MESSAGE.match(message) is not None


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
