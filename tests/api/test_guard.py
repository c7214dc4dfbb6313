"""GuardMiddleware as pure ASGI, against small ASGI apps (no server): the body is
bounded as the app pulls it, never buffered and replayed; a
declared size over the bound is refused before the app runs; the in-flight slot
is taken once the body is in (before the app for a request without one); slots
are always given back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from starlette.types import Message, Receive, Scope, Send

from bon_gateway.api.guard import Guard, GuardMiddleware
from bon_gateway.api.http_errors import error_response
from bon_gateway.config import ServerConfig
from bon_gateway.errors import BonError

LIMIT = 1024  # the smallest max_body_bytes the config allows


def _guard(**limits: object) -> Guard:
    server = ServerConfig.model_validate({"limits": {"max_body_bytes": LIMIT, **limits}})
    return Guard.from_config(server, environ={})


def _scope(
    headers: list[tuple[bytes, bytes]], path: str = "/v1/chat/completions", method: str = "POST"
) -> Scope:
    return {"type": "http", "method": method, "path": path, "headers": headers}


class Client:
    """The server side of one request: hands out `chunks` one at a time as the test
    releases them, and records what the app sends."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.pulled = 0
        self.released = asyncio.Semaphore(0)
        self.sent: list[Message] = []

    def release(self, count: int = 1) -> None:
        for _ in range(count):
            self.released.release()

    async def receive(self) -> Message:
        if self.pulled == len(self.chunks):
            await asyncio.Event().wait()  # no more messages until the response is over
        await self.released.acquire()
        self.pulled += 1
        return {
            "type": "http.request",
            "body": self.chunks[self.pulled - 1],
            "more_body": self.pulled < len(self.chunks),
        }

    async def send(self, message: Message) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(next(m["status"] for m in self.sent if m["type"] == "http.response.start"))

    @property
    def error(self) -> dict[str, str]:
        body = b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        error: dict[str, str] = json.loads(body)["error"]
        return error


App = Callable[[Scope, Receive, Send], Awaitable[None]]


def _reading_app(seen: list[bytes], catch: bool = False, arrived: asyncio.Event | None = None) -> App:
    """Reads the whole body, recording each chunk as it arrives (and setting `arrived`),
    then answers 200."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            while True:
                message = await receive()
                seen.append(message.get("body", b""))
                if arrived is not None:
                    arrived.set()
                if not message.get("more_body", False):
                    break
        except BonError as err:
            if not catch:
                raise
            await error_response(err)(scope, receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


async def test_the_app_reads_the_body_as_it_arrives_not_after_the_guard_buffered_it() -> None:
    # The guard used to read (and hold) the whole body before calling the app.
    seen: list[bytes] = []
    arrived = asyncio.Event()
    client = Client([b"a" * 10, b"b" * 10])
    guard = _guard()
    app = _reading_app(seen, arrived=arrived)
    task = asyncio.create_task(GuardMiddleware(app, guard)(_scope([]), client.receive, client.send))
    client.release()
    await asyncio.wait_for(arrived.wait(), 5)
    assert seen == [b"a" * 10] and not task.done()  # the second chunk is not here yet
    client.release()
    await asyncio.wait_for(task, 5)
    assert seen == [b"a" * 10, b"b" * 10] and client.status == 200
    assert guard.in_flight.in_flight == 0


async def test_a_chunked_body_is_refused_at_the_chunk_that_passes_the_bound() -> None:
    seen: list[bytes] = []
    client = Client([b"x" * 600, b"x" * 600, b"x" * 600])
    client.release(3)
    guard = _guard()
    await asyncio.wait_for(
        GuardMiddleware(_reading_app(seen), guard)(_scope([]), client.receive, client.send), 5
    )
    assert client.status == 413
    assert client.error["code"] == "request_too_large"
    assert "server.limits.max_body_bytes" in client.error["message"]
    assert seen == [b"x" * 600]  # the app never got the chunk over the bound
    assert client.pulled == 2  # and nobody read the third
    assert guard.in_flight.in_flight == 0


async def test_an_app_that_maps_the_refusal_itself_answers_the_same_413() -> None:
    client = Client([b"x" * 600, b"x" * 600])
    client.release(2)
    await asyncio.wait_for(
        GuardMiddleware(_reading_app([], catch=True), _guard())(_scope([]), client.receive, client.send), 5
    )
    assert client.status == 413 and client.error["code"] == "request_too_large"


async def test_a_declared_length_over_the_bound_is_refused_before_the_app_runs() -> None:
    seen: list[bytes] = []
    client = Client([b"x" * 2000])
    client.release()
    headers = [(b"content-length", b"2000")]
    await asyncio.wait_for(
        GuardMiddleware(_reading_app(seen), _guard())(_scope(headers), client.receive, client.send), 5
    )
    assert client.status == 413 and client.pulled == 0 and seen == []


async def test_an_invalid_content_length_is_a_400() -> None:
    client = Client([b"{}"])
    headers = [(b"content-length", b"twelve")]
    await asyncio.wait_for(
        GuardMiddleware(_reading_app([]), _guard())(_scope(headers), client.receive, client.send), 5
    )
    assert client.status == 400 and "Content-Length" in client.error["message"]


async def test_the_slot_is_given_back_when_the_app_fails() -> None:
    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("bug")

    guard = _guard(max_in_flight=1)
    for _ in range(2):  # a second request gets the slot back
        client = Client([b""])
        client.release()
        try:
            await GuardMiddleware(failing, guard)(_scope([]), client.receive, client.send)
        except RuntimeError:
            pass
        assert guard.in_flight.in_flight == 0


async def test_the_slot_is_taken_with_the_body_s_last_message_not_before() -> None:
    # A sender stalled mid-body used to hold its slot (shared with gRPC) for ever.
    guard = _guard(max_in_flight=1)
    slots: list[int] = []
    first = asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            slots.append(guard.in_flight.in_flight)
            first.set()
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    client = Client([b"a" * 10, b"b" * 10])
    task = asyncio.create_task(GuardMiddleware(app, guard)(_scope([]), client.receive, client.send))
    client.release()
    await asyncio.wait_for(first.wait(), 5)
    assert slots == [0] and guard.in_flight.in_flight == 0  # mid-body: no slot
    client.release()
    await asyncio.wait_for(task, 5)
    assert slots == [0, 1] and client.status == 200
    assert guard.in_flight.in_flight == 0


async def test_over_max_in_flight_a_request_is_shed_once_its_body_is_in() -> None:
    guard = _guard(max_in_flight=1)
    guard.in_flight.enter()  # someone else holds the only slot
    client = Client([b"{}"])
    client.release()
    await asyncio.wait_for(
        GuardMiddleware(_reading_app([]), guard)(_scope([]), client.receive, client.send), 5
    )
    assert client.status == 429 and client.pulled == 1
    assert guard.in_flight.in_flight == 1  # the holder's, not given back by the shed one


async def test_a_request_without_a_body_takes_its_slot_before_the_app() -> None:
    guard = _guard(max_in_flight=1)
    slots: list[int] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        slots.append(guard.in_flight.in_flight)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    client = Client([])
    await asyncio.wait_for(
        GuardMiddleware(app, guard)(_scope([], "/v1/models", "GET"), client.receive, client.send), 5
    )
    assert slots == [1] and client.status == 200 and guard.in_flight.in_flight == 0
