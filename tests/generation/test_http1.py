"""The upstream HTTP/1.1 client against raw servers: keep-alive reuse,
chunked and close-delimited bodies, stale connections, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from bon_gateway.generation.http1 import ConnectError, Http1Pool, ProtocolError
from tests.fakes import unused_port


class RawServer:
    def __init__(self, replies: list[bytes], *, close_after: bool = False) -> None:
        self.replies = replies
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
                if not reply:  # hang until the client leaves
                    await reader.read()
                    self.closed.set()
                    return
                writer.write(reply)
                await writer.drain()
                if self.close_after:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.set()
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., asyncio.Future[RawServer]]]:
    servers: list[asyncio.Server] = []

    async def start(replies: list[bytes], **kwargs: bool) -> RawServer:
        raw = RawServer(replies, **kwargs)
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(server)
        raw.port = server.sockets[0].getsockname()[1]
        return raw

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_keep_alive_reuses_one_connection(serve: Callable[..., asyncio.Future[RawServer]]) -> None:
    raw = await serve([ok(b'{"a":1}')])
    pool = Http1Pool()
    for _ in range(3):
        reply = await pool.post(f"http://127.0.0.1:{raw.port}/v1/x", b"{}")
        assert (reply.status, reply.content) == (200, b'{"a":1}')
    await pool.aclose()
    assert raw.connections == 1
    assert raw.requests[0].startswith(b"POST /v1/x HTTP/1.1\r\n")
    assert b"host: 127.0.0.1:%d\r\n" % raw.port in raw.requests[0]


async def test_chunked_body_and_headers(serve: Callable[..., asyncio.Future[RawServer]]) -> None:
    chunked = (
        b"HTTP/1.1 429 Too Many\r\ntransfer-encoding: chunked\r\nRetry-After: 3\r\n\r\n"
        b"4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\n\r\n"
    )
    raw = await serve([chunked])
    pool = Http1Pool()
    reply = await pool.post(f"http://127.0.0.1:{raw.port}/", b"{}")
    await pool.aclose()
    assert (reply.status, reply.content, reply.headers["retry-after"]) == (429, b"abcdefg", "3")


async def test_close_delimited_body(serve: Callable[..., asyncio.Future[RawServer]]) -> None:
    raw = await serve([b"HTTP/1.1 200 OK\r\n\r\nuntil close"], close_after=True)
    pool = Http1Pool()
    reply = await pool.post(f"http://127.0.0.1:{raw.port}/", b"{}")
    assert reply.content == b"until close"
    reply = await pool.post(f"http://127.0.0.1:{raw.port}/", b"{}")  # a new connection
    await pool.aclose()
    assert raw.connections == 2


async def test_connection_close_header_is_respected(serve: Callable[..., asyncio.Future[RawServer]]) -> None:
    raw = await serve([ok(b"1", b"connection: close\r\n")], close_after=True)
    pool = Http1Pool()
    for _ in range(2):
        assert (await pool.post(f"http://127.0.0.1:{raw.port}/", b"{}")).content == b"1"
    await pool.aclose()
    assert raw.connections == 2


async def test_closed_before_the_response_is_a_connect_error(
    serve: Callable[..., asyncio.Future[RawServer]],
) -> None:
    raw = await serve([b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"], close_after=True)
    pool = Http1Pool()
    with pytest.raises(ConnectError):
        await pool.post(f"http://127.0.0.1:{raw.port}/", b"{}")
    with pytest.raises(ConnectError):
        await pool.post(f"http://127.0.0.1:{unused_port()}/", b"{}")
    await pool.aclose()


async def test_garbage_is_a_protocol_error(serve: Callable[..., asyncio.Future[RawServer]]) -> None:
    raw = await serve([b"SSH-2.0-OpenSSH\r\n\r\n"])
    pool = Http1Pool()
    with pytest.raises(ProtocolError):
        await pool.post(f"http://127.0.0.1:{raw.port}/", b"{}")
    await pool.aclose()


async def test_cancel_closes_the_connection(serve: Callable[..., asyncio.Future[RawServer]]) -> None:
    raw = await serve([b""])  # hang
    pool = Http1Pool()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await pool.post(f"http://127.0.0.1:{raw.port}/", b"{}")
    await asyncio.wait_for(raw.closed.wait(), 2)
    await pool.aclose()


async def test_max_connections_bounds_concurrency(serve: Callable[..., asyncio.Future[RawServer]]) -> None:
    raw = await serve([ok(b"x")])
    pool = Http1Pool(max_connections=2)
    replies = await asyncio.gather(*(pool.post(f"http://127.0.0.1:{raw.port}/", b"{}") for _ in range(10)))
    await pool.aclose()
    assert all(r.content == b"x" for r in replies)
    assert raw.connections <= 2


async def test_an_idle_connection_closed_by_the_server_is_replaced(
    serve: Callable[..., asyncio.Future[RawServer]],
) -> None:
    raw = await serve([ok(b"x")])
    pool = Http1Pool()
    url = f"http://127.0.0.1:{raw.port}/"
    assert (await pool.post(url, b"{}")).content == b"x"
    # Make the pooled connection look alive although the server has gone away from it.
    connection = pool._idle[next(iter(pool._idle))][0]
    assert connection.transport is not None
    connection.transport.get_extra_info("socket").shutdown(2)  # both directions, without telling the pool
    assert (await pool.post(url, b"{}")).content == b"x"
    await pool.aclose()
    assert raw.connections == 2


async def test_no_content_has_no_body(serve: Callable[..., asyncio.Future[RawServer]]) -> None:
    raw = await serve([b"HTTP/1.1 204 No Content\r\n\r\n"])
    pool = Http1Pool()
    for _ in range(2):
        reply = await pool.post(f"http://127.0.0.1:{raw.port}/", b"{}")
        assert (reply.status, reply.content) == (204, b"")
    await pool.aclose()
    assert raw.connections == 1
