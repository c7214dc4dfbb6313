"""FaultUpstream: an OpenAI-compatible generator on 127.0.0.1 that misbehaves on cue.

A raw asyncio HTTP/1.1 server (no framework) in a background thread, so it can
do what real servers and networks do and frameworks hide: reset the
connection, hang without a byte, answer slowly, send garbage, 429 with
Retry-After, honour `n` or ignore it. It also sees when the client closes the
connection, which is how tests prove that cancellation reaches the upstream.

Each call takes the next scripted action (`script(...)`), else what
`rule(body)` returns, else a normal answer.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from tests.fakes.sse import done_event, event, stream_chunks
from tests.fakes.upstream import wait_until

__all__ = ["Call", "FaultUpstream", "Garbage", "Hang", "Reply", "Reset"]


@dataclass(frozen=True, slots=True)
class Reply:
    """An HTTP answer: 200 with generated choices unless `status`/`body` say otherwise."""

    status: int = 200
    body: dict[str, Any] | None = None
    headers: tuple[tuple[str, str], ...] = ()
    delay_s: float = 0.0
    # Streamed calls (stream: true, what the gateway sends): seconds between tokens,
    # and a connection reset after this many tokens (a stream that dies mid-way).
    token_delay_s: float = 0.0
    break_after: int | None = None


@dataclass(frozen=True, slots=True)
class Reset:
    """Close the connection with a TCP RST after reading the request."""

    delay_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Hang:
    """Never answer; wait for the client to close the connection."""


@dataclass(frozen=True, slots=True)
class Garbage:
    """A 200 whose body is not JSON."""


Action = Reply | Reset | Hang | Garbage


@dataclass(slots=True)
class Call:
    """One request the upstream received."""

    path: str
    body: dict[str, Any]
    action: Action
    arrived: float = field(default_factory=time.monotonic)
    answered: float | None = None
    closed_by_client: float | None = None  # the client closed before we answered (or mid-stream)
    tokens_sent: int = 0  # streamed calls: content chunks written


def _words(text: str) -> int:
    return len(text.split())


class FaultUpstream:
    """See the module docstring. `texts[(seed + i) % len(texts)]` is choice i of a call."""

    def __init__(
        self, texts: Sequence[str] = ("alpha", "beta", "gamma", "delta"), *, honours_n: bool = False
    ) -> None:
        self.texts = list(texts)
        self.honours_n = honours_n
        self.rule: Callable[[dict[str, Any]], Action | None] | None = None
        self.calls: list[Call] = []
        self._script: deque[Action] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-upstream", daemon=True)
        self.port = 0

    # -- control ------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *actions: Action) -> None:
        """Queue actions for the next calls, in arrival order."""
        with self._lock:
            self._script.extend(actions)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self.calls.clear()
            self.rule = None

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
        return wait_until(predicate, timeout_s)

    def start(self) -> FaultUpstream:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault upstream did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(10)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        # Connection handlers (hung calls) end before the loop closes under them.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        asyncio.get_running_loop().call_soon(asyncio.get_running_loop().stop)

    def __enter__(self) -> FaultUpstream:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- server -------------------------------------------------------------
    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _next_action(self, body: dict[str, Any]) -> Action:
        with self._lock:
            if self._script:
                return self._script.popleft()
        if self.rule is not None and (action := self.rule(body)) is not None:
            return action
        return Reply()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value.strip())
                raw = await reader.readexactly(length) if length else b""
                body: dict[str, Any] = json.loads(raw) if raw else {}
                action = self._next_action(body)
                call = Call(path, body, action)
                self.calls.append(call)
                if not await self._act(call, reader, writer):
                    return
        finally:
            writer.close()

    async def _client_closed_within(self, reader: asyncio.StreamReader, seconds: float | None) -> bool:
        """True if the client closes the connection within `seconds` (None: wait forever)."""
        try:
            data = await asyncio.wait_for(reader.read(1), seconds)
        except TimeoutError:
            return False
        except ConnectionError:
            return True
        return data == b""

    async def _act(self, call: Call, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Carry out one call's action; False when the connection is finished."""
        action = call.action
        delay = getattr(action, "delay_s", 0.0)
        if isinstance(action, Hang) or delay:
            if await self._client_closed_within(reader, None if isinstance(action, Hang) else delay):
                call.closed_by_client = time.monotonic()
                return False
        if isinstance(action, Reset):
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if isinstance(action, Garbage):
            self._write(writer, 200, b"<html>502 Bad Gateway</html>", (("content-type", "text/html"),))
        else:
            assert isinstance(action, Reply)
            if action.status == 200 and action.body is None and call.body.get("stream"):
                return await self._stream(call, action, reader, writer)
            body = action.body if action.body is not None else self._completion(call)
            self._write(writer, action.status, json.dumps(body).encode(), action.headers)
        call.answered = time.monotonic()
        await writer.drain()
        return True

    async def _stream(
        self, call: Call, action: Reply, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """An SSE reply in chunked encoding, token by token; False when the connection ended."""
        head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in action.headers) + "\r\n"
        writer.write(head.encode("latin-1"))
        body = call.body
        seed = int(body.get("seed") or 0)
        count = max(1, int(body.get("n") or 1)) if self.honours_n else 1
        texts = [self.texts[(seed + i) % len(self.texts)] for i in range(count)]
        chat = call.path.endswith("/chat/completions")
        prompt = (
            sum(_words(str(m.get("content", ""))) for m in body.get("messages", []))
            if chat
            else _words(str(body.get("prompt", "")))
        )
        chunks = stream_chunks(
            chat=chat,
            texts=texts,
            model=str(body.get("model", "fault")),
            prompt_tokens=prompt,
            include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
        )
        try:
            for chunk in chunks:
                text_chunk = bool(chunk["choices"]) and any(
                    (c.get("delta") or {}).get("content") or c.get("text") for c in chunk["choices"]
                )
                if text_chunk:
                    if action.break_after is not None and call.tokens_sent >= action.break_after:
                        writer.transport.abort()
                        return False
                    if action.token_delay_s and await self._client_closed_within(
                        reader, action.token_delay_s
                    ):
                        call.closed_by_client = time.monotonic()
                        return False
                self._write_chunk(writer, event(chunk))
                await writer.drain()
                if text_chunk:
                    call.tokens_sent += 1
            self._write_chunk(writer, done_event())
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            call.closed_by_client = time.monotonic()
            return False
        call.answered = time.monotonic()
        return True

    @staticmethod
    def _write_chunk(writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    @staticmethod
    def _write(
        writer: asyncio.StreamWriter, status: int, payload: bytes, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
        if not any(k.lower() == "content-type" for k, _ in headers):
            extra += "content-type: application/json\r\n"
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-length: {len(payload)}\r\n{extra}\r\n".encode("latin-1")
            + payload
        )

    def _completion(self, call: Call) -> dict[str, Any]:
        body = call.body
        seed = int(body.get("seed") or 0)
        count = max(1, int(body.get("n") or 1)) if self.honours_n else 1
        texts = [self.texts[(seed + i) % len(self.texts)] for i in range(count)]
        chat = call.path.endswith("/chat/completions")
        if chat:
            prompt_tokens = sum(_words(str(m.get("content", ""))) for m in body.get("messages", []))
            choices: list[dict[str, Any]] = [
                {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                for i, t in enumerate(texts)
            ]
        else:
            prompt_tokens = _words(str(body.get("prompt", "")))
            choices = [
                {"index": i, "text": t, "finish_reason": "stop", "logprobs": None}
                for i, t in enumerate(texts)
            ]
        completion_tokens = sum(_words(t) for t in texts)
        return {
            "id": "fault-1",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model", "fault"),
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
