"""FakeUpstream: a real OpenAI-compatible HTTP server on 127.0.0.1 (uvicorn in a
thread) answering fixed candidate texts, with fault injection."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.scorer import words
from tests.fakes.sse import done_event, event, stream_chunks, tool_call_chunks

__all__ = ["FakeUpstream", "StreamRecord", "ThreadedServer", "unused_port", "wait_until"]


@dataclass(slots=True)
class StreamRecord:
    """One streamed call: what it sent before it ended or the client left."""

    seed: int
    tokens_sent: int = 0
    completed: bool = False
    closed_by_client: float | None = None


def _has_text(choice: dict[str, Any]) -> bool:
    return bool((choice.get("delta") or {}).get("content") or choice.get("text"))


async def _client_left_within(request: Request, seconds: float) -> bool:
    """True if the client closes the connection within `seconds` (its body already read)."""
    try:
        async with asyncio.timeout(seconds):
            while (await request.receive())["type"] != "http.disconnect":
                pass
    except TimeoutError:
        return False
    return True


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    """Poll `predicate` (a fake server's records, from the test's thread) until true or
    `timeout_s` passed; its last value."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def unused_port(host: str = "127.0.0.1") -> int:
    """A loopback port nobody listens on (for "upstream down" cases)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
    return port


class ThreadedServer:
    """Runs an ASGI app with uvicorn on a free loopback port in a daemon thread."""

    def __init__(self, app: Any, host: str = "127.0.0.1") -> None:
        config = uvicorn.Config(app, host=host, port=0, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._sock = config.bind_socket()
        # As in bon_gateway.api.server: uvicorn's socket has proto 0, so asyncio leaves
        # Nagle on and keep-alive clients wait ~40 ms per response without this.
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.host = host
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [self._sock]},
            name=f"uvicorn-{self.port}",
            daemon=True,
        )

    def start(self, timeout_s: float = 10.0) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.005)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()


class FakeUpstream:
    """OpenAI-compatible generator on 127.0.0.1 with fixed answers.

    A call with seed s answers `texts[s % len(texts)]`. The gateway sends
    seed = base_seed + candidate index, so with `seed=0` in the request,
    candidate i is `texts[i]`; without a seed, best_of == len(texts) still
    yields every text once.

    Faults: `fail_status` (every call answers that status), `fail_seeds`
    (those seeds answer 500), `delay_s` (wait before answering; a client that
    closes the connection meanwhile ends the wait, and its body goes to `hung_up`).
    `requests` records every JSON body received, `answered` those answered (after
    the delay: tests order events against it).

    `logprobs` in a streamed request: each token chunk carries its logprob
    (tests.fakes.sse.fake_logprob).

    Tool calling: `tool_calls[i]` (a list of (name, arguments JSON text)) makes the
    chat answer of text i a reply that calls those tools instead (content null,
    finish_reason "tool_calls"; streamed as vLLM streams tool-call deltas).

    `stream: true` calls (what the gateway sends) get SSE, one word per chunk,
    `token_delay_s` apart; `streams` records, per streamed call, the tokens it
    sent and whether the client closed it before the end.
    """

    def __init__(self, texts: Sequence[str], *, model: str = "fake-generator", delay_s: float = 0.0) -> None:
        if not texts:
            raise ValueError("texts must not be empty")
        self.texts = list(texts)
        self.model = model
        self.delay_s = delay_s
        self.fail_status: int | None = None
        self.fail_seeds: set[int] = set()
        self.tool_calls: dict[int, list[tuple[str, str]]] = {}
        self.requests: list[dict[str, Any]] = []
        self.hung_up: list[dict[str, Any]] = []
        self.answered: list[dict[str, Any]] = []
        self.token_delay_s = 0.0
        self.streams: list[StreamRecord] = []
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/completions", self._completions, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )
        self._server = ThreadedServer(app)

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def url(self) -> str:
        """Base URL for GeneratorConfig.url."""
        return f"http://127.0.0.1:{self._server.port}/v1"

    def text_for(self, seed: int) -> str:
        return self.texts[seed % len(self.texts)]

    def mark(self) -> tuple[int, int]:
        """How many calls arrived and hung up so far (for `all_hung_up_since`)."""
        return len(self.requests), len(self.hung_up)

    def all_hung_up_since(self, mark: tuple[int, int]) -> bool:
        """Calls arrived since `mark`, and the client closed every one of them during delay_s."""
        sent, hung_up = len(self.requests) - mark[0], len(self.hung_up) - mark[1]
        return sent > 0 and hung_up == sent

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 5.0) -> bool:
        return wait_until(predicate, timeout_s)

    def start(self) -> FakeUpstream:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def _answer(self, request: Request) -> tuple[dict[str, Any], str, Response | None]:
        body: dict[str, Any] = await request.json()
        self.requests.append(body)
        if self.delay_s and await _client_left_within(request, self.delay_s):
            # Tests see the gateway give up its call (a cancelled request, a deadline).
            self.hung_up.append(body)
            return body, "", Response(status_code=499)
        self.answered.append(body)
        seed = int(body.get("seed") or 0)
        if self.fail_status is not None:
            error = {"error": {"message": "injected failure", "type": "server_error"}}
            return body, "", JSONResponse(error, status_code=self.fail_status)
        if seed in self.fail_seeds:
            return body, "", JSONResponse({"error": {"message": "injected failure"}}, status_code=500)
        return body, self.text_for(seed), None

    def _usage(self, prompt_tokens: int, text: str) -> dict[str, int]:
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": words(text),
            "total_tokens": prompt_tokens + words(text),
        }

    def calls_for(self, seed: int) -> list[tuple[str, str]] | None:
        """The tool calls the chat answer for `seed` makes, if it makes any."""
        return self.tool_calls.get(seed % len(self.texts))

    def _stream(self, body: dict[str, Any], text: str, chat: bool, prompt_tokens: int) -> Response:
        record = StreamRecord(seed=int(body.get("seed") or 0))
        self.streams.append(record)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        calls = self.calls_for(record.seed) if chat else None
        model = str(body.get("model", self.model))
        if calls is not None:
            chunks = tool_call_chunks(
                calls=calls, model=model, prompt_tokens=prompt_tokens, include_usage=include_usage
            )
        else:
            chunks = stream_chunks(
                chat=chat,
                texts=[text],
                model=model,
                prompt_tokens=prompt_tokens,
                include_usage=include_usage,
                logprobs=bool(body.get("logprobs")),
            )

        async def events() -> AsyncIterator[bytes]:
            try:
                for chunk in chunks:
                    if self.token_delay_s and chunk["choices"] and _has_text(chunk["choices"][0]):
                        await asyncio.sleep(self.token_delay_s)
                    yield event(chunk)
                    if chunk["choices"] and _has_text(chunk["choices"][0]):
                        record.tokens_sent += 1
                yield done_event()
                record.completed = True
            except asyncio.CancelledError:
                record.closed_by_client = time.monotonic()
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    async def _chat(self, request: Request) -> Response:
        body, text, failure = await self._answer(request)
        if failure is not None:
            return failure
        prompt_tokens = sum(words(str(m.get("content", ""))) for m in body.get("messages", []))
        if body.get("stream"):
            return self._stream(body, text, True, prompt_tokens)
        calls = self.calls_for(int(body.get("seed") or 0))
        if calls is not None:
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}
                    for i, (name, args) in enumerate(calls)
                ],
            }
            return JSONResponse(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": body.get("model", self.model),
                    "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}],
                    "usage": self._usage(prompt_tokens, ""),
                }
            )
        return JSONResponse(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", self.model),
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": self._usage(prompt_tokens, text),
            }
        )

    async def _completions(self, request: Request) -> Response:
        body, text, failure = await self._answer(request)
        if failure is not None:
            return failure
        if body.get("stream"):
            return self._stream(body, text, False, words(str(body.get("prompt", ""))))
        return JSONResponse(
            {
                "id": "cmpl-fake",
                "object": "text_completion",
                "created": int(time.time()),
                "model": body.get("model", self.model),
                "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": None}],
                "usage": self._usage(words(str(body.get("prompt", ""))), text),
            }
        )

    async def _models(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "fake"}]}
        )
