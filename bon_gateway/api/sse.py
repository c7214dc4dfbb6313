"""OpenAI server-sent events for a streamed Best-of-N request (`stream: true`).

While candidates are generated and scored, nothing is known about the answer,
so the client gets SSE comments (which SSE clients, the openai SDK included,
skip) that keep it and any proxy from timing out. Once a single candidate is
left in the race (speculative rejection, or best_of 1), it is the answer: its
text streams as it is generated. At the end come the closing chunks (finish
reason, reward, usage, candidates) and `[DONE]`. An error after the headers
went out is sent as an OpenAI error event, which the SDK raises as an
APIError. The client hanging up cancels the generator (Starlette listens for
the disconnect), and so the engine.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bon_gateway.api.http_errors import error_body
from bon_gateway.engine.search import OnWinnerText
from bon_gateway.errors import BonError
from bon_gateway.types import BonResult

__all__ = ["SSE_KEEPALIVE_S", "StartedRun", "sse_best_of_n", "start_run"]

log = logging.getLogger("bon_gateway.api")

# A comment this often while nothing else is sent, so idle-connection timeouts do not fire.
SSE_KEEPALIVE_S = 5.0

# (on_winner_text, on_opened) -> the engine's run
Run = Callable[[OnWinnerText | None, Callable[[], None]], Awaitable[BonResult]]
# (text, first) -> the chunks of choice 0's text as it grows
LiveChunks = Callable[[str, bool], list[dict[str, Any]]]
# (result, streamed) -> the closing chunks
FinalChunks = Callable[[BonResult, bool], list[dict[str, Any]]]


def _data(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


@dataclass(slots=True)
class StartedRun:
    """An engine run started before the response: its task and choice 0's live text."""

    task: asyncio.Future[BonResult]
    texts: asyncio.Queue[str]


async def start_run(run: Run, live: bool) -> StartedRun:
    """Start `run` and wait until the reward model has taken the prompt (the engine's
    `on_opened`), before any upstream call: what fails until then (a prompt too long for
    the reward model) is raised here, so the client gets a plain 400 instead of a 200
    whose stream carries the error. `live`: choice 0's text is queued as it grows."""
    texts: asyncio.Queue[str] = asyncio.Queue()
    opened = asyncio.Event()

    async def on_winner_text(index: int, text: str) -> None:
        texts.put_nowait(text)

    task = asyncio.ensure_future(run(on_winner_text if live else None, opened.set))
    waiter = asyncio.ensure_future(opened.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.wait({task})
        raise
    finally:
        waiter.cancel()
    if task.done() and not opened.is_set():
        task.result()  # its error, before the headers (the engine never ends without opening)
    return StartedRun(task, texts)


async def sse_best_of_n(
    started: StartedRun, live_chunks: LiveChunks | None, final_chunks: FinalChunks
) -> AsyncIterator[bytes]:
    """The event stream of one request; `live_chunks` None: nothing streams early (n > 1)."""
    task, texts = started.task, started.texts
    streamed = False
    try:
        yield b": generating\n\n"
        while True:
            getter = asyncio.ensure_future(texts.get())
            waiting: set[asyncio.Future[Any]] = {task, getter}
            done, _ = await asyncio.wait(waiting, timeout=SSE_KEEPALIVE_S, return_when="FIRST_COMPLETED")
            if getter not in done:
                getter.cancel()
            if getter in done and live_chunks is not None:
                pieces = [getter.result()]
                while not texts.empty():
                    pieces.append(texts.get_nowait())
                for chunk in live_chunks("".join(pieces), not streamed):
                    yield _data(chunk)
                streamed = True
                continue
            if task in done:
                break
            if not done:
                yield b": keep-alive\n\n"
        try:
            result = task.result()
        except BonError as err:
            yield _data(error_body(err.message, err.code, err.param, err.code))
            return
        except Exception:
            log.exception("unhandled error in a streamed request")
            yield _data(error_body("internal server error", "internal_error"))
            return
        if streamed and live_chunks is not None:
            # What arrived after the last chunk went out (the engine's last events).
            rest = "".join(texts.get_nowait() for _ in range(texts.qsize()))
            if rest:
                for chunk in live_chunks(rest, False):
                    yield _data(chunk)
        for chunk in final_chunks(result, streamed):
            yield _data(chunk)
        yield b"data: [DONE]\n\n"
    finally:
        if not task.done():
            task.cancel()
            # Let the engine unwind (close upstream calls) before the response ends.
            # asyncio.wait, not gather: Starlette's cancel scope cancels this
            # generator again at every await, and gather would pass each of those
            # on to the engine, interrupting its calls while they close.
            await asyncio.wait({task})
