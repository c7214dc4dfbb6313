"""One logical upstream call: pick a replica, send, retry on transient
failures within the request deadline, record metrics for every attempt."""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from bon_gateway.balancer import Balancer, Endpoint
from bon_gateway.config import GeneratorConfig
from bon_gateway.generation.payload import completion_as_chunk, error_message
from bon_gateway.generation.retry import client_fault, parse_retry_after, retryable_status, validation_failure
from bon_gateway.generation.sse import event_json
from bon_gateway.generation.transport import HttpResponse, ProtocolError, ResponseTooLarge, UpstreamHttp
from bon_gateway.metrics import Metrics
from bon_gateway.retry import GaveUp, RetryPolicy, retry_call
from bon_gateway.types import Deadline, Dropped, DropReason

__all__ = ["CandidateFailed", "UpstreamCaller", "UpstreamRejected"]

log = logging.getLogger("bon_gateway.generation")

T = TypeVar("T")


class CandidateFailed(Exception):
    """A call failed for good; `reason` is a bounded word (a metrics label suffix)."""

    def __init__(self, reason: DropReason, detail: str, retry_after_s: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: DropReason = reason
        self.detail = detail
        self.retry_after_s = retry_after_s

    def dropped(self) -> Dropped:
        return Dropped(self.reason, self.detail, self.retry_after_s)


class UpstreamRejected(Exception):
    """The upstream refused the request itself (4xx such as context length): the client's fault."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class _Attempt(Exception):
    """One failed attempt; `retry` says whether another attempt may succeed."""

    def __init__(
        self,
        reason: DropReason,
        kind: str,
        detail: str,
        *,
        retry: bool,
        healthy: bool | None,
        retry_after_s: float | None = None,
        status: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status  # bon_upstream_requests_total{status}: the HTTP code, when one came
        self.reason = reason  # drop reason, if it is the last attempt
        self.kind = kind  # bon_upstream_errors_total{kind}
        self.detail = detail
        self.retry = retry
        self.healthy = healthy  # False: counts towards ejecting the endpoint; None: says nothing
        self.retry_after_s = retry_after_s


class _EmptyStream(Exception):
    """A 200 event stream that ended without a single event."""


class _BrokenStream(Exception):
    """A stream that failed after delivering events that cannot be taken back."""

    def __init__(self, error: BaseException, delivered: int) -> None:
        super().__init__(str(error))
        self.error = error
        self.delivered = delivered

    def describe(self) -> str:
        if isinstance(self.error, _Attempt):
            return self.error.detail
        return type(self.error).__name__


def _retry_after(error: Exception) -> float | None:
    """The retry policy's view of a failed attempt: None = not worth another try."""
    if isinstance(error, _Attempt) and error.retry:
        return error.retry_after_s or 0.0
    return None


# What json.dumps(body, separators=(",", ":"), allow_nan=False) builds on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _encode(body: dict[str, Any]) -> bytes:
    """Standard JSON only: admission refuses NaN / Infinity, and one that slipped through
    must fail here (ValueError) rather than reach the upstream as non-standard JSON."""
    return _ENCODER.encode(body).encode()


def _deadline_failure(detail: str, cause: _Attempt | None) -> CandidateFailed:
    """A candidate the deadline stopped: after failed attempts, their cause is the
    reason (the deadline only ended the retrying), whatever the timing of the last try."""
    if cause is None:
        return CandidateFailed("deadline", detail)
    return CandidateFailed(cause.reason, f"{cause.detail} (retrying until the deadline: {detail})")


class UpstreamCaller:
    """Sends calls to the generator's replicas through one keep-alive aiohttp session."""

    def __init__(
        self,
        config: GeneratorConfig,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.balancer = Balancer(
            config.base_urls,
            eject_after_failures=config.eject_after_failures,
            eject_cooldown_s=config.eject_cooldown_s,
        )
        self.policy = RetryPolicy(config.retries, config.backoff_base_s, config.backoff_max_s)
        self._rng = rng or random.Random()
        self._http = UpstreamHttp(
            max_connections=config.max_connections, connect_timeout_s=config.connect_timeout_s
        )

    async def call(
        self,
        path: str,
        body: dict[str, Any],
        deadline: Deadline,
        endpoint: Endpoint | None = None,
        *,
        request_key: object = None,
    ) -> tuple[Any, Endpoint]:
        """The decoded JSON reply and the endpoint that gave it.

        Raises CandidateFailed when retries are spent or the deadline leaves no
        time for another attempt, UpstreamRejected on a client-fault 4xx.
        `request_key` names the client request the call serves: an upstream is
        ejected only after failures across different requests, so one request's
        candidates and retries failing together count once.
        """
        payload = _encode(body)

        async def exchange(chosen: Endpoint, limit: float) -> Any:
            response = await self._http.post(
                chosen.url + path, payload, timeout_s=limit, max_bytes=self.config.max_response_bytes
            )
            self._check_status(response)
            try:
                return json.loads(response.content)
            except ValueError:
                raise _Attempt(
                    "bad_response", "bad_response", "upstream body is not JSON", retry=True, healthy=False
                ) from None

        return await self._with_retries(exchange, deadline, endpoint, request_key)

    async def stream(
        self,
        path: str,
        body: dict[str, Any],
        deadline: Deadline,
        on_chunk: Callable[[Any], Awaitable[None]],
        endpoint: Endpoint | None = None,
        *,
        request_key: object = None,
        start_over: Callable[[], bool] = lambda: False,
    ) -> Endpoint:
        """Stream an SSE call, `await on_chunk(json)` for every event; the endpoint that served it.

        Failures are retried as for `call` while no chunk was delivered; after
        that only when `start_over()` returns True (the consumer has forgotten
        the chunks delivered so far and takes the retry's from the start).
        Otherwise the stream's failure is final: CandidateFailed.
        """
        payload = _encode(body)
        delivered = 0

        async def on_event(data: str) -> None:
            nonlocal delivered
            try:
                chunk = event_json(data)
            except ValueError:
                raise _Attempt(
                    "bad_response", "bad_response", "an upstream event is not JSON", retry=True, healthy=False
                ) from None
            delivered += 1
            await on_chunk(chunk)

        async def exchange(chosen: Endpoint, limit: float) -> None:
            nonlocal delivered
            delivered = 0
            try:
                response = await self._http.stream(
                    chosen.url + path,
                    payload,
                    on_event,
                    timeout_s=limit,
                    max_bytes=self.config.max_response_bytes,
                )
            except (_Attempt, TimeoutError, ProtocolError, OSError) as err:
                if delivered and not start_over():
                    raise _BrokenStream(err, delivered) from None
                raise
            if response is not None:
                self._check_status(response)
                # A 200 that is not an event stream: the whole reply at once (a server that
                # ignores `stream`), delivered as the one chunk it amounts to.
                try:
                    whole = json.loads(response.content)
                except ValueError:
                    raise _Attempt(
                        "bad_response", "bad_response", "upstream body is not JSON", retry=True, healthy=False
                    ) from None
                await on_chunk(completion_as_chunk(whole))
                delivered += 1
            if not delivered:
                raise _EmptyStream

        try:
            _, served = await self._with_retries(exchange, deadline, endpoint, request_key)
        except _EmptyStream:
            # llama-cpp-python answers a streamed request it cannot run (a prompt over its
            # context) with an empty event stream; asked without streaming, it says why.
            whole, served = await self.call(
                path, {**body, "stream": False}, deadline, request_key=request_key
            )
            await on_chunk(completion_as_chunk(whole))
        return served

    async def _with_retries(
        self,
        exchange: Callable[[Endpoint, float], Awaitable[T]],
        deadline: Deadline,
        endpoint: Endpoint | None,
        request_key: object,
    ) -> tuple[T, Endpoint]:
        """The one retry loop of upstream calls: replica choice, deadline, cause of the failure."""
        key = object() if request_key is None else request_key
        avoid: list[Endpoint] = []
        cause: _Attempt | None = None  # the last real failure, when retrying

        async def attempt(number: int) -> tuple[T, Endpoint]:
            nonlocal cause
            chosen = endpoint if endpoint is not None and number == 1 else self.balancer.pick(avoid)
            if deadline.expired():
                raise _Attempt(
                    "deadline",
                    "timeout",
                    "the request deadline passed before the call",
                    retry=False,
                    healthy=True,
                )
            try:
                return await self._attempt(chosen, deadline.remaining(), key, exchange), chosen
            except _Attempt as failed:
                if failed.reason != "deadline":
                    cause = failed
                    avoid.append(chosen)
                    if failed.retry:
                        log.debug(
                            "upstream retry upstream=%s kind=%s attempt=%d", chosen.label, failed.kind, number
                        )
                raise

        try:
            return await retry_call(
                attempt, self.policy, retry_after=_retry_after, deadline=deadline, rng=self._rng
            )
        except GaveUp as gave_up:
            last = gave_up.last
            if not isinstance(last, _Attempt):
                raise last from None  # UpstreamRejected: the client's fault, not retried
            if last.reason == "deadline":
                raise _deadline_failure(last.detail, cause) from None
            if gave_up.why == "deadline":
                # Waiting would only end in the deadline: fail now, with the real cause.
                raise CandidateFailed(
                    last.reason, f"{last.detail} (no time left to retry)", last.retry_after_s
                ) from None
            raise CandidateFailed(last.reason, last.detail, last.retry_after_s) from None

    async def _attempt(
        self,
        endpoint: Endpoint,
        remaining: float,
        request_key: object,
        exchange: Callable[[Endpoint, float], Awaitable[T]],
    ) -> T:
        """One attempt on `endpoint`: its failure classified, its metrics and health recorded."""
        cfg = self.config
        cut_by_deadline = remaining < cfg.timeout_s
        limit = min(cfg.timeout_s, remaining)
        self.balancer.started(endpoint)
        started = time.perf_counter()
        healthy: bool | None = None  # None: cancelled, says nothing about the upstream
        status = "cancelled"
        try:
            try:
                result = await exchange(endpoint, limit)
                status, healthy = "200", True
                return result
            except _EmptyStream:
                status, healthy = "200", True  # it answered; what it meant is asked next
                raise
            except _BrokenStream as broken:
                status = "broken_stream"
                if isinstance(broken.error, TimeoutError) and cut_by_deadline:
                    # The request's deadline, not the upstream, ended it: says nothing of its health.
                    raise _Attempt(
                        "deadline",
                        "timeout",
                        f"the request deadline passed during the stream ({broken.delivered} events in)",
                        retry=False,
                        healthy=None,
                    ) from None
                raise _Attempt(
                    "timeout" if isinstance(broken.error, TimeoutError) else "connect_error",
                    "broken_stream",
                    f"the stream broke after {broken.delivered} events: {broken.describe()}",
                    retry=False,
                    healthy=False,
                ) from None
            except TimeoutError as err:
                status, healthy = "timeout", False
                if cut_by_deadline:
                    raise _Attempt(
                        "deadline",
                        "timeout",
                        "the request deadline passed during the call",
                        retry=False,
                        healthy=None,  # the client's deadline, not the upstream's failure
                    ) from None
                raise _Attempt("timeout", "timeout", type(err).__name__, retry=True, healthy=False) from None
            except ResponseTooLarge as err:
                status, healthy = "too_large", True
                raise _Attempt("too_large", "too_large", str(err), retry=False, healthy=True) from None
            except ProtocolError as err:
                status, healthy = "bad_response", False
                raise _Attempt("bad_response", "bad_response", str(err), retry=True, healthy=False) from None
            except OSError as err:  # ConnectError included
                status, healthy = "connect_error", False
                raise _Attempt(
                    "connect_error", "connect_error", type(err).__name__, retry=True, healthy=False
                ) from None
        except _Attempt as failed:
            if status == "cancelled":  # raised by the exchange itself (a status or body problem)
                status = failed.status or failed.kind
            healthy = failed.healthy
            self.metrics.child(self.metrics.upstream_errors, endpoint.label, failed.kind).inc()
            raise
        except UpstreamRejected as rejected:
            status = str(rejected.status)
            healthy = True  # it answered, and correctly: the request was wrong
            self.metrics.child(self.metrics.upstream_errors, endpoint.label, "http_4xx").inc()
            raise
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.upstream_duration.observe(elapsed)
            self.metrics.child(self.metrics.upstream_call_duration, endpoint.label).observe(elapsed)
            self.metrics.child(self.metrics.upstream_requests, status).inc()
            self.balancer.finished(endpoint, healthy, request_key)

    @staticmethod
    def _check_status(response: HttpResponse) -> bool:
        """True for a 200; raises for anything else (healthy = the upstream itself is fine)."""
        code = response.status
        if code == 200:
            return True
        message = error_message(response.content)
        if client_fault(code):
            raise UpstreamRejected(code, message)
        if validation_failure(code, message):
            raise UpstreamRejected(400, message)
        kind = "http_5xx" if code >= 500 else "http_4xx"
        detail = f"HTTP {code}: {message[:200]}"
        if retryable_status(code):
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            reason: DropReason = "rate_limited" if code == 429 else "upstream_error"
            # A 429 is load, not sickness: retry elsewhere, but do not eject for it.
            raise _Attempt(
                reason,
                kind,
                detail,
                retry=True,
                healthy=code == 429,
                retry_after_s=retry_after,
                status=str(code),
            )
        # 401/403...: the gateway's configuration (its key) is wrong: nothing a retry or
        # another request changes, and nothing about the upstream's health either.
        raise _Attempt("upstream_error", kind, detail, retry=False, healthy=True, status=str(code))

    async def aclose(self) -> None:
        await self._http.aclose()
