"""Choosing among the replicas of one HTTP backend (generator upstreams, vLLM scoring
servers): least outstanding requests, ejection with cooldown after repeated failures,
and what each generator upstream is known to support (`n`).

Pure state, no I/O: the caller reports each call's start, end and outcome.
The clock is injectable so tests need no sleeps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from bon_gateway.logs import log_phase

__all__ = ["Balancer", "Endpoint", "upstream_label"]

log = logging.getLogger("bon_gateway.generation")


def upstream_label(url: str, index: int = 0) -> str:
    """A bounded `upstream` label for a configured generator URL: `host:port`, never
    credentials, path or query; `upstream<index>` when the URL has no host."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        host, port = None, None
    if not host:
        return f"upstream{index}"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return f"{host}:{port}" if port is not None else host


@dataclass(slots=True)
class Endpoint:
    """One upstream base URL and what the balancer knows about it."""

    url: str
    label: str  # bounded metrics label (host:port)
    outstanding: int = 0
    consecutive_failures: int = 0
    # The requests whose calls failed since the last success: ejection needs
    # `eject_after_failures` different ones (one request retrying counts once).
    failing_requests: set[object] = field(default_factory=set)
    ejected_until: float = 0.0
    # Whether a call with n=N returned N choices; None until probed (mode "auto").
    honours_n: bool | None = None


class Balancer:
    """Least-outstanding-requests choice over the endpoints that are not ejected."""

    def __init__(
        self,
        urls: Collection[str],
        *,
        eject_after_failures: int = 3,
        eject_cooldown_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError("at least one upstream URL is needed")
        self.endpoints = [Endpoint(url.rstrip("/"), upstream_label(url, i)) for i, url in enumerate(urls)]
        self.eject_after_failures = eject_after_failures
        self.eject_cooldown_s = eject_cooldown_s
        self._clock = clock
        # Called with the endpoint whenever one is ejected or recovers (readiness listeners).
        self.on_change: Callable[[Endpoint], None] | None = None
        self._turn = 0  # rotates the tie-break so equal endpoints share the load

    def available(self, endpoint: Endpoint, now: float | None = None) -> bool:
        return endpoint.ejected_until <= (self._clock() if now is None else now)

    def any_available(self) -> bool:
        """False while every upstream is ejected: readiness reports NOT_SERVING then."""
        now = self._clock()
        return any(self.available(e, now) for e in self.endpoints)

    def pick(self, avoid: Collection[Endpoint] = ()) -> Endpoint:
        """The endpoint for the next call.

        Prefers endpoints not ejected and not in `avoid` (those that just failed
        this call); falls back to ejected ones rather than failing outright, the
        one whose cooldown ends first: a fully ejected pool still probes.
        """
        self._turn += 1
        count = len(self.endpoints)
        if count == 1:
            return self.endpoints[0]  # every branch below picks it: the common single upstream
        now = self._clock()
        rotated = [self.endpoints[(self._turn + i) % count] for i in range(count)]
        for candidates in (
            [e for e in rotated if self.available(e, now) and e not in avoid],
            [e for e in rotated if self.available(e, now)],
        ):
            if candidates:
                return min(candidates, key=lambda e: e.outstanding)
        return min(rotated, key=lambda e: (e.ejected_until, e.outstanding))

    def started(self, endpoint: Endpoint) -> None:
        endpoint.outstanding += 1

    def finished(self, endpoint: Endpoint, ok: bool | None, request: object = None) -> None:
        """Record a call's end: `ok` False for failures that say the upstream is unwell,
        None when the call was cancelled (which says nothing about the upstream).
        `request` is the client request the call served (None: a request of its own)."""
        endpoint.outstanding -= 1
        if ok is None:
            return
        if ok:
            was_ejected = endpoint.consecutive_failures >= self.eject_after_failures
            endpoint.consecutive_failures = 0
            endpoint.failing_requests.clear()
            endpoint.ejected_until = 0.0
            if was_ejected:
                log_phase(log, "upstream_recovered", upstream=endpoint.label)
                self._changed(endpoint)
            return
        if len(endpoint.failing_requests) < self.eject_after_failures:  # bounded: enough to decide
            endpoint.failing_requests.add(object() if request is None else request)
        endpoint.consecutive_failures = len(endpoint.failing_requests)
        if endpoint.consecutive_failures >= self.eject_after_failures:
            now = self._clock()
            newly = endpoint.ejected_until <= now
            endpoint.ejected_until = now + self.eject_cooldown_s
            if newly:
                log_phase(
                    log,
                    "upstream_ejected",
                    logging.WARNING,
                    upstream=endpoint.label,
                    failures=endpoint.consecutive_failures,
                    cooldown_s=self.eject_cooldown_s,
                )
            # Every extension too: the listeners re-read readiness when the new cooldown ends.
            self._changed(endpoint)

    def _changed(self, endpoint: Endpoint) -> None:
        if self.on_change is not None:
            self.on_change(endpoint)
