"""The in-flight bound shared by the HTTP and gRPC fronts: excess requests are
shed at once instead of queueing. (Input bounds are checked by the engine's
admission step, engine/admission.py, for both fronts.)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from bon_gateway.errors import Overloaded

__all__ = ["InFlightLimiter"]


class InFlightLimiter:
    """At most `limit` requests served at once; the next one is shed with Overloaded.

    Shedding (rather than waiting for a slot) is what keeps memory flat: a
    waiting request still holds its body and its connection.
    """

    def __init__(self, limit: int, retry_after_s: float = 1.0) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self._count = 0
        self._lock = threading.Lock()  # both fronts share one event loop today; cheap insurance

    @property
    def in_flight(self) -> int:
        return self._count

    def try_enter(self) -> bool:
        with self._lock:
            if self._count >= self.limit:
                return False
            self._count += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._count -= 1

    def enter(self) -> None:
        """Take a slot or raise Overloaded (429 / RESOURCE_EXHAUSTED)."""
        if not self.try_enter():
            raise Overloaded(
                f"server busy: {self.limit} requests in flight (server.limits.max_in_flight)",
                retry_after_s=self.retry_after_s,
            )

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()
