"""uvicorn's httptools protocol with the bounds a client without a key must not pass.

uvicorn (httptools) arms no timer before a connection's first response and
buffers a request's head without limit: a silent socket is held for ever, a
slow head too, and one header line may be any size. `guarded_protocol` binds
`server.limits` into a subclass that adds, per server:

- `header_timeout_s`: from the accept (or a later request's first byte) to
  complete headers. Past it the connection is closed: 408 first when part of
  a request had come, silently when nothing had.
- `body_timeout_s`: from complete headers to the body's last byte. Past it
  the request is answered 408 and the connection closed; the ASGI app sees
  the disconnect. The request had no in-flight slot yet: the guard
  (api/guard.py) takes it with the body's last message.
- `max_header_bytes`: the request line and headers together; the byte past it
  is answered 431 and the connection closed, before routing and before
  authentication. httptools never holds more of a head than that.
- `max_connections`: open HTTP connections. A connection over it evicts the
  oldest one with no complete request (silent, idle keep-alive, or still
  sending its head or body): liveness stays reachable whoever fills the
  table. When every connection has a complete request in service, the new one
  is answered 503 and closed.

Timers are armed only for what a read leaves incomplete: a request that
arrives whole, the common case, costs no timer (asyncio.timeout around the
app's body read cost ~10 us per request on uvloop here; call_later+cancel ~2.5 us).

A response with a Content-Length leaves in one write, head and body together
(`_OneWriteResponse`): uvicorn writes them apart, two sends for the gateway and
two segments for the client to wake up for. Streamed (chunked) responses are
written as uvicorn writes them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from bon_gateway.config import LimitsConfig
from bon_gateway.metrics import HTTP_CLOSE_REASONS, Metrics

__all__ = ["ConnectionTable", "GuardedHttpProtocol", "guarded_protocol"]


def _plain_response(status: bytes, text: str, extra_headers: bytes = b"") -> bytes:
    body = text.encode("ascii")
    return b"".join(
        [
            b"HTTP/1.1 ",
            status,
            b"\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: ",
            str(len(body)).encode("ascii"),
            b"\r\n",
            extra_headers,
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class ConnectionTable:
    """The open connections of one HTTP server, and those without a complete
    request (`waiting`), oldest first: the ones that give way at `limit`."""

    __slots__ = ("limit", "open", "waiting")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0
        # dict, not set: insertion order is the eviction order.
        self.waiting: dict[GuardedHttpProtocol, None] = {}

    def evict_oldest(self) -> bool:
        """Close the oldest waiting connection; False when there is none."""
        if not self.waiting:
            return False
        oldest = next(iter(self.waiting))
        oldest.evict()
        return True


class _OneWriteResponse:
    """The transport as one request's RequestResponseCycle sees it: the head of a response
    with a Content-Length is held until the body's write, and both go in one.

    Only the head is held, and never past the current turn of the loop (a `call_soon`
    flush covers a body that does not follow at once, and a HEAD reply has none).
    What else the cycle writes (100 Continue, chunked heads and chunks) goes straight
    through; the bytes on the wire are the same as uvicorn's.
    """

    __slots__ = ("_cycle", "_head_passed", "_held", "_loop", "_transport")

    def __init__(
        self, transport: asyncio.Transport, cycle: RequestResponseCycle, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._transport = transport
        self._cycle = cycle
        self._loop = loop
        self._held: bytes | None = None
        self._head_passed = False

    def write(self, data: bytes) -> None:
        held = self._held
        if held is not None:  # the body (uvicorn writes it whole for a Content-Length)
            self._held = None
            self._transport.write(held + data)
            return
        cycle = self._cycle
        if not self._head_passed and cycle.response_started:
            # uvicorn sets response_started and the framing before it writes the head.
            self._head_passed = True
            if cycle.chunked_encoding is False and cycle.scope["method"] != "HEAD":
                self._held = data
                self._loop.call_soon(self.flush)
                return
        self._transport.write(data)

    def flush(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            self._transport.write(held)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with head and body timers, a head byte bound and a connection table.

    Built through `guarded_protocol`, which sets the class attributes.
    """

    table: ConnectionTable
    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int
    # bon_http_connections_closed_total's children by reason (empty: not counted).
    closed_counters: dict[str, Any] = {}

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._counted = False  # holds a place in table.open
        self._awaiting_head = True  # between a message's first byte (or the accept) and its headers
        self._head_room = self.max_header_bytes
        self._began = False  # a message began during the current feed
        self._head_ended = False  # a head completed during the current feed
        self._partial = False  # some request began on this connection
        self._body_pending = False  # headers complete, body not yet
        self._timer: asyncio.TimerHandle | None = None

    # -- connections ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        table = self.table
        if table.open >= table.limit and not table.evict_oldest():
            self._count_close("over_limit")
            transport.write(
                _plain_response(
                    b"503 Service Unavailable",
                    "too many connections (server.limits.max_connections)",
                    b"retry-after: 1\r\n",
                )
            )
            transport.close()
            return
        table.open += 1
        self._counted = True
        table.waiting[self] = None
        self._timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def _forget(self) -> None:
        """Give back this connection's place in the table (once) and its timer."""
        if self._counted:
            self._counted = False
            self.table.open -= 1
            self.table.waiting.pop(self, None)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def evict(self) -> None:
        """Close to make room for a newer connection (its place is free at once)."""
        self._count_close("evicted")
        self._forget()
        if not self.transport.is_closing():
            self.transport.close()

    # -- the request head -------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        # Feed at most what is left of the head's bound; a head still incomplete
        # when that is used up is refused before httptools buffers more of it.
        while self._awaiting_head and len(data) > self._head_room:
            room = self._head_room
            self._head_ended = False
            super().data_received(data[:room])
            if self.transport.is_closing():
                return
            if self._awaiting_head and not self._head_ended:
                self._count_close("header_too_large")
                self._refuse(
                    b"431 Request Header Fields Too Large",
                    f"request headers are larger than {self.max_header_bytes} bytes "
                    "(server.limits.max_header_bytes)",
                )
                return
            # A head completed within its bound; the next may have begun in that part
            # (pipelined), its bytes there uncounted: at most `room` over its bound.
            data = data[room:]
        counted = self._awaiting_head
        self._began = False
        super().data_received(data)
        if self._awaiting_head and counted:
            # A head that began inside `data` is charged all of it: a little more than its
            # own bytes when a previous message ended there, never more than its bound.
            self._head_room -= len(data)
        # Timers only for what is left incomplete by this feed: a request that arrives whole
        # (the common case) arms none. The head's timer runs from the accept (armed there)
        # or from the feed its request began in; the body's from the feed its headers ended in.
        if self._timer is None and (self._awaiting_head or self._body_pending):
            if not self.transport.is_closing():
                if self._awaiting_head:
                    self._timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)
                else:
                    self._timer = self.loop.call_later(self.body_timeout_s, self._body_timed_out)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._awaiting_head = True
        self._head_room = self.max_header_bytes
        self._began = self._partial = True

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        self._head_ended = True
        self._body_pending = True  # until on_message_complete (at once when there is no body)
        self._cancel_timer()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.transport is self.transport:  # a new request's cycle
            cycle.transport = _OneWriteResponse(self.transport, cycle, self.loop)  # type: ignore[assignment]

    def on_message_complete(self) -> None:
        # A whole request is in: it is served, never evicted.
        self._body_pending = False
        self._cancel_timer()
        self.table.waiting.pop(self, None)
        super().on_message_complete()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._counted and not self.transport.is_closing():
            self.table.waiting[self] = None  # idle keep-alive: the newest of the waiting

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        self._count_close("header_timeout")
        if self._partial:  # the timer runs from the accept, or from a request's first byte
            self._refuse(
                b"408 Request Timeout",
                f"request headers not complete within {self.header_timeout_s:g} s "
                "(server.limits.header_timeout_s)",
            )
        else:
            self.transport.close()

    def _body_timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        self._count_close("body_timeout")
        cycle = self.cycle
        if cycle is None or not cycle.response_started:
            self._refuse(
                b"408 Request Timeout",
                f"request body not complete within {self.body_timeout_s:g} s (server.limits.body_timeout_s)",
            )
        else:  # answered already (a refusal before the body): only the rest of the body is late
            self.transport.close()

    def _count_close(self, reason: str) -> None:
        counter = self.closed_counters.get(reason)
        if counter is not None:
            counter.inc()

    def _refuse(self, status: bytes, text: str) -> None:
        self.transport.write(_plain_response(status, text))
        self.transport.close()


def guarded_protocol(
    limits: LimitsConfig, max_connections: int | None = None, metrics: Metrics | None = None
) -> type[GuardedHttpProtocol]:
    """A GuardedHttpProtocol class for one server (uvicorn's `http=`), with its own
    connection table of `max_connections` (default: `limits.max_connections`), counting
    its closes and open connections into `metrics` when given."""
    table = ConnectionTable(max_connections if max_connections is not None else limits.max_connections)

    class BoundGuardedHttpProtocol(GuardedHttpProtocol):
        pass

    BoundGuardedHttpProtocol.table = table
    BoundGuardedHttpProtocol.header_timeout_s = limits.header_timeout_s
    BoundGuardedHttpProtocol.body_timeout_s = limits.body_timeout_s
    BoundGuardedHttpProtocol.max_header_bytes = limits.max_header_bytes
    if metrics is not None:
        BoundGuardedHttpProtocol.closed_counters = {
            reason: metrics.child(metrics.http_connections_closed, reason) for reason in HTTP_CLOSE_REASONS
        }
        metrics.http_connections_open.set_function(lambda: table.open)
    return BoundGuardedHttpProtocol
