"""The upstream transport (aiohttp) against raw servers: keep-alive reuse only
after complete responses, chunked and close-delimited bodies, error kinds,
cancellation closing the connection, and HTTPS with a private CA."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from bon_gateway.generation.transport import ConnectError, ProtocolError, UpstreamHttp
from tests.fakes import unused_port
from tests.security.conftest import self_signed_cert


class RawServer:
    """Answers each request with the next scripted bytes; b"" hangs until the client leaves.

    With `hold`, it writes the reply and then waits for the client to close
    (a response cut mid-body).
    """

    def __init__(self, replies: list[bytes], *, close_after: bool = False, hold: bool = False) -> None:
        self.replies = replies
        self.close_after = close_after
        self.hold = hold
        self.connections = 0
        self.requests: list[bytes] = []
        self.received = asyncio.Event()
        self.closed = asyncio.Event()
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                self.received.set()
                reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
                writer.write(reply)
                await writer.drain()
                if not reply or self.hold:  # wait for the client to leave
                    await reader.read()
                    self.closed.set()
                    return
                if self.close_after:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.set()
        finally:
            writer.close()


Serve = Callable[..., "asyncio.Future[RawServer]"]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[asyncio.Server] = []

    async def start(
        replies: list[bytes], *, ssl_context: ssl.SSLContext | None = None, **kwargs: bool
    ) -> RawServer:
        raw = RawServer(replies, **kwargs)
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0, ssl=ssl_context)
        servers.append(server)
        raw.port = server.sockets[0].getsockname()[1]
        return raw

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s" % (len(body), extra, body)


@pytest.mark.integration
async def test_keep_alive_reuses_one_connection(serve: Serve) -> None:
    raw = await serve([ok(b'{"a":1}')])
    http = UpstreamHttp()
    for _ in range(3):
        reply = await http.post(f"http://127.0.0.1:{raw.port}/v1/x", b'{"q":1}')
        assert (reply.status, reply.content) == (200, b'{"a":1}')
    await http.aclose()
    assert raw.connections == 1
    request = raw.requests[0].lower()
    assert request.startswith(b"post /v1/x http/1.1\r\n")
    assert b"host: 127.0.0.1:%d\r\n" % raw.port in request
    assert b"content-type: application/json\r\n" in request
    assert b"accept-encoding" not in request  # identity bodies
    assert request.endswith(b'\r\n\r\n{"q":1}')


@pytest.mark.integration
async def test_chunked_body_headers_and_reuse_after_it(serve: Serve) -> None:
    chunked = (
        b"HTTP/1.1 429 Too Many\r\ntransfer-encoding: chunked\r\nRetry-After: 3\r\n\r\n"
        b"4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\n\r\n"
    )
    raw = await serve([chunked])
    http = UpstreamHttp()
    for _ in range(2):
        reply = await http.post(f"http://127.0.0.1:{raw.port}/", b"{}")
        assert (reply.status, reply.content, reply.headers["retry-after"]) == (429, b"abcdefg", "3")
    await http.aclose()
    assert raw.connections == 1


@pytest.mark.integration
async def test_close_delimited_body(serve: Serve) -> None:
    raw = await serve([b"HTTP/1.1 200 OK\r\n\r\nuntil close"], close_after=True)
    http = UpstreamHttp()
    for _ in range(2):  # the second on a new connection
        assert (await http.post(f"http://127.0.0.1:{raw.port}/", b"{}")).content == b"until close"
    await http.aclose()
    assert raw.connections == 2


@pytest.mark.integration
async def test_connection_close_header_is_respected(serve: Serve) -> None:
    raw = await serve([ok(b"1", b"connection: close\r\n")], close_after=True)
    http = UpstreamHttp()
    for _ in range(2):
        assert (await http.post(f"http://127.0.0.1:{raw.port}/", b"{}")).content == b"1"
    await http.aclose()
    assert raw.connections == 2


@pytest.mark.integration
async def test_no_content_has_no_body(serve: Serve) -> None:
    raw = await serve([b"HTTP/1.1 204 No Content\r\n\r\n"])
    http = UpstreamHttp()
    for _ in range(2):
        reply = await http.post(f"http://127.0.0.1:{raw.port}/", b"{}")
        assert (reply.status, reply.content) == (204, b"")
    await http.aclose()
    assert raw.connections == 1


@pytest.mark.integration
async def test_closed_early_and_refused_are_connect_errors(serve: Serve) -> None:
    raw = await serve([b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"], close_after=True)
    http = UpstreamHttp()
    with pytest.raises(ConnectError):
        await http.post(f"http://127.0.0.1:{raw.port}/", b"{}")
    with pytest.raises(ConnectError):
        await http.post(f"http://127.0.0.1:{unused_port()}/", b"{}")
    await http.aclose()


@pytest.mark.integration
async def test_garbage_is_a_protocol_error(serve: Serve) -> None:
    raw = await serve([b"SSH-2.0-OpenSSH\r\n\r\n"])
    http = UpstreamHttp()
    with pytest.raises(ProtocolError):
        await http.post(f"http://127.0.0.1:{raw.port}/", b"{}")
    await http.aclose()


@pytest.mark.integration
async def test_timeout_before_the_head_closes_the_connection(serve: Serve) -> None:
    raw = await serve([b""])  # hang
    http = UpstreamHttp()
    with pytest.raises(TimeoutError):
        await http.post(f"http://127.0.0.1:{raw.port}/", b"{}", timeout_s=0.2)
    await asyncio.wait_for(raw.closed.wait(), 2)
    await http.aclose()


@pytest.mark.integration
async def test_cancel_mid_body_closes_the_connection_and_never_pools_it(serve: Serve) -> None:
    raw = await serve([b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial"], hold=True)
    http = UpstreamHttp()
    url = f"http://127.0.0.1:{raw.port}/"
    task = asyncio.create_task(http.post(url, b"{}"))
    await asyncio.wait_for(raw.received.wait(), 2)
    await asyncio.sleep(0.1)  # the head and part of the body are in
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(raw.closed.wait(), 2)
    with pytest.raises(TimeoutError):  # the next call opens a new connection (it hangs too)
        await http.post(url, b"{}", timeout_s=0.2)
    await http.aclose()
    assert raw.connections == 2


@pytest.mark.integration
async def test_max_connections_bounds_concurrency(serve: Serve) -> None:
    raw = await serve([ok(b"x")])
    http = UpstreamHttp(max_connections=2)
    replies = await asyncio.gather(*(http.post(f"http://127.0.0.1:{raw.port}/", b"{}") for _ in range(10)))
    await http.aclose()
    assert all(r.content == b"x" for r in replies)
    assert raw.connections <= 2


@pytest.mark.integration
async def test_an_idle_connection_closed_by_the_server_is_replaced(serve: Serve) -> None:
    raw = await serve([ok(b"x")], close_after=True)  # the server closes after each answer, unannounced
    http = UpstreamHttp()
    url = f"http://127.0.0.1:{raw.port}/"
    assert (await http.post(url, b"{}")).content == b"x"
    await asyncio.sleep(0.1)
    assert (await http.post(url, b"{}")).content == b"x"
    await http.aclose()
    assert raw.connections == 2


@pytest.mark.integration
async def test_https_with_a_private_ca(serve: Serve, tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    raw = await serve([ok(b'{"tls":true}')], ssl_context=server_context)
    url = f"https://127.0.0.1:{raw.port}/v1/x"
    trusting = UpstreamHttp(ssl_context=ssl.create_default_context(cafile=str(cert)))
    for _ in range(2):
        assert (await trusting.post(url, b"{}")).content == b'{"tls":true}'
    await trusting.aclose()
    assert raw.connections == 1
    untrusting = UpstreamHttp()  # the system CAs: the handshake is refused
    with pytest.raises(ConnectError):
        await untrusting.post(url, b"{}")
    await untrusting.aclose()


async def test_a_closed_client_refuses_calls() -> None:
    http = UpstreamHttp()
    await http.aclose()
    with pytest.raises(ConnectError):
        await http.post("http://127.0.0.1:1/", b"{}")
