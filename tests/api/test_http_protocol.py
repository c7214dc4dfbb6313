"""The gateway's HTTP protocol writes a response with a Content-Length in one write
(head and body together); streamed responses and a HEAD reply are written as
uvicorn writes them. Driven through the real protocol class over a fake transport."""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from bon_gateway.api.http_protocol import guarded_protocol
from bon_gateway.config import LimitsConfig


class RecordingTransport(asyncio.Transport):
    """What the protocol wrote, one entry per write call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _json_app(scope: Any, receive: Any, send: Any) -> None:
    body = b'{"ok":true}'
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _streamed_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    for part in (b"one", b"two"):
        await send({"type": "http.response.body", "body": part, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _serve(app: Any, request: bytes) -> RecordingTransport:
    config = Config(app=app, log_level="warning")
    config.load()
    protocol_class = guarded_protocol(LimitsConfig())
    protocol = protocol_class(config=config, server_state=ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    for _ in range(20):  # the app's task and the flush the protocol may have scheduled
        await asyncio.sleep(0)
    protocol.connection_lost(None)
    return transport


def test_a_response_with_a_content_length_leaves_in_one_write() -> None:
    # uvicorn writes the head and the body apart: two sends, two segments for the client.
    transport = asyncio.run(_serve(_json_app, b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n"))
    assert len(transport.writes) == 1
    head, _, body = transport.writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: 11" in head
    assert body == b'{"ok":true}'


def test_a_streamed_response_is_written_as_it_comes() -> None:
    transport = asyncio.run(_serve(_streamed_app, b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n"))
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK") and transport.writes[0].endswith(b"\r\n\r\n")
    assert transport.writes[1:] == [b"3\r\none\r\n", b"3\r\ntwo\r\n", b"0\r\n\r\n"]


def test_the_head_of_a_head_reply_is_not_held() -> None:
    # A HEAD reply has a Content-Length but no body write: its head goes out on its own.
    transport = asyncio.run(_serve(_json_app, b"HEAD /x HTTP/1.1\r\nhost: a\r\n\r\n"))
    assert len(transport.writes) == 1
    assert transport.writes[0].startswith(b"HTTP/1.1 200 OK") and transport.writes[0].endswith(b"\r\n\r\n")
