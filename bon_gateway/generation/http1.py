"""A small keep-alive HTTP/1.1 client for JSON POSTs to the upstream generators.

Why not httpx: a profile of the gateway at N=4 showed ~70 % of its CPU in
httpx/httpcore (about 1.5-2 ms per call on this machine), capping the
gateway near 400 upstream calls/s per core. The gateway only ever sends one
kind of request (POST a JSON body, read a whole JSON reply), so this client
does exactly that on asyncio protocols: one write per request, a
content-length or chunked body, a per-origin pool of idle connections.

Cancelling a call (deadline, client hang-up) closes its connection, so the
upstream sees the close and can stop generating; a connection is reused only
after a complete response.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections import deque
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

__all__ = ["ConnectError", "Http1Pool", "HttpResponse", "ProtocolError"]

MAX_HEADER_BYTES = 64 * 1024


class ConnectError(OSError):
    """No connection (refused, reset, closed before a complete response)."""


class ProtocolError(Exception):
    """The peer does not speak HTTP/1.1 as expected."""


@dataclass(slots=True)
class HttpResponse:
    status: int
    headers: dict[str, str]  # lower-case names; the last value wins
    content: bytes


@dataclass(frozen=True, slots=True)
class _Origin:
    host: str
    port: int
    tls: bool
    host_header: str


class _Connection(asyncio.Protocol):
    """One TCP connection; parses one response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._waiter: asyncio.Future[HttpResponse] | None = None
        self._head: tuple[int, dict[str, str]] | None = None
        self._keep_alive = True
        self.received_bytes = 0  # of the current request's response

    # -- asyncio.Protocol --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # One write per request already; this keeps small bodies from waiting on ACKs.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.received_bytes += len(data)
        self._buffer += data
        if self._waiter is None or self._waiter.done():
            return
        try:
            response = self._parse()
        except ProtocolError as err:
            self._fail(err)
            return
        if response is not None:
            self._waiter.set_result(response)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            head = self._head
            if (
                head is not None
                and "content-length" not in head[1]
                and "chunked" not in head[1].get("transfer-encoding", "")
            ):
                # A body delimited by the close itself (HTTP/1.0 style).
                self._waiter.set_result(HttpResponse(head[0], head[1], bytes(self._buffer)))
                return
            self._waiter.set_exception(ConnectError(f"connection closed before a complete response ({exc})"))

    def _fail(self, err: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(err)
        self.close()

    # -- requests ------------------------------------------------------------
    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    @property
    def reusable(self) -> bool:
        return not self.closed and self._keep_alive

    async def request(self, payload: bytes) -> HttpResponse:
        assert self.transport is not None
        self._buffer.clear()
        self.received_bytes = 0
        self._head = None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(payload)
        return await self._waiter

    def _parse(self) -> HttpResponse | None:
        buffer = self._buffer
        if self._head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEADER_BYTES:
                    raise ProtocolError("response headers too large")
                return None
            lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
                raise ProtocolError("not an HTTP/1.x response")
            try:
                status = int(parts[1])
            except ValueError:
                raise ProtocolError("bad status line") from None
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if headers.get("connection", "").lower() == "close" or parts[0] == "HTTP/1.0":
                self._keep_alive = False
            del buffer[: end + 4]
            if 100 <= status < 200:  # 100 Continue and friends: the real answer follows
                return self._parse()
            self._head = (status, headers)
        status, headers = self._head
        if status in (204, 304):
            return HttpResponse(status, headers, b"")  # never a body
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = _dechunk(buffer)
            if body is None:
                return None
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise ProtocolError("bad content-length") from None
            if len(buffer) < length:
                return None
            body = bytes(buffer[:length])
        else:
            self._keep_alive = False
            return None  # read until the server closes (connection_lost completes it)
        return HttpResponse(status, headers, body)


def _dechunk(buffer: bytearray) -> bytes | None:
    """The body of a complete chunked message in `buffer`, or None while incomplete."""
    out = bytearray()
    pos = 0
    while True:
        line_end = buffer.find(b"\r\n", pos)
        if line_end < 0:
            return None
        try:
            size = int(bytes(buffer[pos:line_end]).split(b";", 1)[0], 16)
        except ValueError:
            raise ProtocolError("bad chunk size") from None
        start = line_end + 2
        if size == 0:
            # Trailers (rare) end with an empty line.
            return bytes(out) if buffer.find(b"\r\n", start) >= 0 else None
        if len(buffer) < start + size + 2:
            return None
        out += buffer[start : start + size]
        pos = start + size + 2


class Http1Pool:
    """Keep-alive connections per origin, at most `max_connections` in use at once."""

    def __init__(
        self, *, max_connections: int = 256, max_idle_per_origin: int = 64, connect_timeout_s: float = 5.0
    ) -> None:
        self._limit = asyncio.Semaphore(max_connections) if max_connections > 0 else None
        self._idle: dict[_Origin, deque[_Connection]] = {}
        self._origins: dict[str, tuple[_Origin, str]] = {}
        self._max_idle = max_idle_per_origin
        self._connect_timeout_s = connect_timeout_s
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    def _origin(self, url: str) -> tuple[_Origin, str]:
        cached = self._origins.get(url)
        if cached is not None:
            return cached
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"unsupported upstream URL {url!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        default_port = port == (443 if tls else 80)
        host_header = parts.hostname if default_port else f"{parts.hostname}:{port}"
        if ":" in parts.hostname and not default_port:  # IPv6 literal
            host_header = f"[{parts.hostname}]:{port}"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        cached = (_Origin(parts.hostname, port, tls, host_header), target)
        if len(self._origins) < 1024:  # a handful of configured URLs; bounded anyway
            self._origins[url] = cached
        return cached

    async def post(self, url: str, body: bytes, *, extra_headers: str = "") -> HttpResponse:
        """POST `body` (JSON) to `url`; the caller bounds the time (asyncio.timeout)."""
        if self._closed:
            raise ConnectError("the client is closed")
        origin, target = self._origin(url)
        payload = (
            f"POST {target} HTTP/1.1\r\nhost: {origin.host_header}\r\ncontent-type: application/json\r\n"
            f"accept: application/json\r\ncontent-length: {len(body)}\r\n{extra_headers}\r\n"
        ).encode("latin-1") + body
        if self._limit is not None:
            await self._limit.acquire()
        try:
            return await self._exchange(origin, payload)
        finally:
            if self._limit is not None:
                self._limit.release()

    async def _exchange(self, origin: _Origin, payload: bytes) -> HttpResponse:
        idle = self._idle.setdefault(origin, deque())
        reused = False
        while idle:
            connection = idle.pop()
            if connection.reusable:
                reused = True
                break
        else:
            connection = await self._connect(origin)
        try:
            response = await connection.request(payload)
        except ConnectError:
            connection.close()
            if not reused or connection.received_bytes:
                raise
            # The server closed an idle keep-alive connection as we reused it
            # (its keep-alive timeout): it never saw this request. Once more, fresh.
            connection = await self._connect(origin)
            try:
                response = await connection.request(payload)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            # Cancelled or failed mid-request: the connection's state is unknown,
            # and closing it is what tells the upstream to stop.
            connection.close()
            raise
        if connection.reusable and len(idle) < self._max_idle and not self._closed:
            idle.append(connection)
        else:
            connection.close()
        return response

    async def _connect(self, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        context: ssl.SSLContext | None = None
        if origin.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, connection = await loop.create_connection(
                    _Connection,
                    origin.host,
                    origin.port,
                    ssl=context,
                    server_hostname=origin.host if context is not None else None,
                )
        except TimeoutError:
            raise TimeoutError("connect timeout") from None
        except OSError as err:
            raise ConnectError(f"{type(err).__name__}: {err}") from None
        return connection

    async def aclose(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            while idle:
                idle.pop().close()
