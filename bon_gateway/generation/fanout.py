"""One request's candidates as live upstream streams (the engine's GenerationRun).

Every call streams (SSE). A candidate's text grows chunk by chunk; it is
`Finished` when the upstream gives its finish_reason, `Failed` when its call
fails for good, and gone (no event) when the consumer cancels it. Cancelling
a candidate closes its stream, so the upstream stops generating it (vLLM,
SGLang and llama.cpp abort a request whose client disconnects); in `n` mode
several candidates share one stream, which is closed once none of them is
wanted any more.

Retries follow the caller's policy until a call's first chunk; a stream that
breaks later is retried only while nothing of it was shown to the consumer
(no `Progress` asked for), else its candidates fail.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bon_gateway.balancer import Endpoint
from bon_gateway.errors import BonError, InvalidRequest, UpstreamError
from bon_gateway.generation.caller import CandidateFailed, UpstreamRejected
from bon_gateway.generation.payload import (
    BadResponse,
    ToolCallDelta,
    build_payload,
    merge_logprobs,
    parse_chunk,
)
from bon_gateway.types import (
    BonRequest,
    Deadline,
    Dropped,
    Failed,
    Finished,
    Generation,
    GenerationEvent,
    Progress,
    ToolCall,
    Usage,
)

if TYPE_CHECKING:
    from bon_gateway.generation.upstream import UpstreamClient

__all__ = ["FanOut"]


@dataclass(slots=True)
class _ToolCallParts:
    """One tool call of a candidate as its deltas arrive (the arguments come in pieces)."""

    id: str = ""
    type: str = ""
    name: list[str] = field(default_factory=list)
    arguments: list[str] = field(default_factory=list)

    def add(self, delta: ToolCallDelta) -> None:
        self.id = self.id or delta.id
        self.type = self.type or delta.type
        self.name.append(delta.name)
        self.arguments.append(delta.arguments)

    def call(self) -> ToolCall:
        return ToolCall(self.id, "".join(self.name), "".join(self.arguments), self.type or "function")


@dataclass(slots=True)
class _Live:
    """A candidate being generated."""

    index: int
    parts: list[str] = field(default_factory=list)
    calls: dict[int, _ToolCallParts] = field(default_factory=dict)  # by the call's index
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # each chunk's, in order
    tokens: int = 0  # content chunks counted (one token each on vLLM, SGLang, llama.cpp)
    finish_reason: str | None = None
    done: bool = False  # finished, failed or cancelled: no more events

    def text(self) -> str:
        return "".join(self.parts)

    def tool_calls(self) -> tuple[ToolCall, ...]:
        return tuple(self.calls[i].call() for i in sorted(self.calls))

    def clear(self) -> None:
        self.parts.clear()
        self.calls.clear()
        self.logprobs.clear()
        self.tokens = 0


class _Wake:
    """Queued by `cancel` when it leaves no candidate live: the iterator, waiting for an
    event, must see that nothing more will come."""


_WAKE = _Wake()


@dataclass(slots=True)
class _Call:
    """One upstream call and the candidates it carries (one, or `n` of them)."""

    first: int
    count: int
    task: asyncio.Task[None] | None = None
    prompt_tokens: int = 0
    reported_tokens: int | None = None  # the upstream's usage, when it sent one
    counted_tokens: int = 0


class FanOut:
    """One request's calls; `aclose` (or cancelling the consumer) closes every stream."""

    def __init__(
        self,
        client: UpstreamClient,
        request: BonRequest,
        model: str,
        base_seed: int,
        deadline: Deadline,
        *,
        progress: bool,
        progress_every: int = 0,
    ) -> None:
        self.client = client
        self.request = request
        self.model = model
        self.base_seed = base_seed
        self.deadline = deadline
        self.progress = progress  # every chunk: a stream that showed text is not started over
        self.progress_every = progress_every
        self._events: asyncio.Queue[GenerationEvent | BaseException | _Wake] = asyncio.Queue()
        self._live = {i: _Live(i) for i in range(request.best_of)}
        self._calls: list[_Call] = []
        self._closed = False
        # An endpoint whose n>1 probe was refused with a 4xx: it is marked as not
        # honouring n only once a plain call to it succeeds (else the prompt was bad).
        self._refused_n: Endpoint | None = None
        self._start()

    # -- the consumer's side -------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[GenerationEvent]:
        while any(not c.done for c in self._live.values()) or not self._events.empty():
            event = await self._events.get()
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, _Wake):
                continue
            yield event
        # Every candidate is finished, failed or cancelled; calls still open are only
        # reading their stream's end (the usage chunk, [DONE]): let them, so their
        # connections go back to the pool and the usage is the upstream's own.
        finishing = [c.task for c in self._calls if c.task is not None and not c.task.done()]
        if finishing:
            await asyncio.wait(finishing)
        while not self._events.empty():
            event = self._events.get_nowait()
            if isinstance(event, BaseException):
                raise event

    def cancel(self, index: int) -> None:
        """Stop generating candidate `index` (no further events for it)."""
        live = self._live[index]
        if live.done:
            return
        live.done = True
        if all(c.done for c in self._live.values()):
            self._events.put_nowait(_WAKE)
        for call in self._calls:
            if call.first <= index < call.first + call.count and call.task is not None:
                carried = [self._live[i] for i in range(call.first, call.first + call.count)]
                if all(c.done for c in carried):
                    call.task.cancel()  # closes the connection: the upstream stops generating

    def describe(self) -> str:
        """The run's state in one line (diagnostics)."""
        calls = " ".join(
            f"[{c.first}+{c.count}:{'none' if c.task is None else 'done' if c.task.done() else 'open'}]"
            for c in self._calls
        )
        live = " ".join(
            f"{c.index}:{'done' if c.done else 'open'}:{c.tokens}:{c.finish_reason}"
            for c in self._live.values()
        )
        return f"calls={calls} live={live} queued={self._events.qsize()} closed={self._closed}"

    def usage(self) -> Usage:
        """Tokens the upstream generated for this request: its own counts where it reported them."""
        completion = sum(
            c.counted_tokens if c.reported_tokens is None else c.reported_tokens for c in self._calls
        )
        prompt = max((c.prompt_tokens for c in self._calls), default=0)
        generated = sum(1 for c in self._live.values() if c.finish_reason is not None)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, candidates_generated=generated)

    async def aclose(self) -> None:
        """Close every stream still open and wait until their connections are closed."""
        self._closed = True
        for live in self._live.values():
            live.done = True
        tasks = [c.task for c in self._calls if c.task is not None and not c.task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            # wait, not gather: a second cancellation of the closing task must not
            # reach the calls again while they close their connections.
            await asyncio.wait(tasks)

    # -- the calls ----------------------------------------------------------------
    def _start(self) -> None:
        best_of = self.request.best_of
        mode = self.client.config.mode
        if best_of == 1 or mode == "parallel":
            self._spawn_singles(range(best_of))
            return
        endpoint = self.client.caller.balancer.pick()
        if mode == "auto" and endpoint.honours_n is False:
            self._spawn_singles(range(best_of))
        else:
            call = _Call(0, best_of)
            self._spawn(call, self._batch(call, endpoint))

    def _spawn(self, call: _Call, work: Coroutine[Any, Any, None]) -> None:
        call.task = asyncio.create_task(self._guard(work))
        self._calls.append(call)

    async def _guard(self, work: Coroutine[Any, Any, None]) -> None:
        """A call's task: a client-fault rejection ends the whole request (raised to the consumer)."""
        try:
            await work
        except UpstreamRejected as err:
            self._events.put_nowait(self._rejected(err))
        except Exception as err:  # a bug: the consumer must not wait for candidates that never come
            self._events.put_nowait(err)

    def _spawn_singles(self, indexes: range | list[int]) -> None:
        for index in indexes:
            call = _Call(index, 1)
            self._spawn(call, self._single(call))

    def _rejected(self, err: UpstreamRejected) -> BonError:
        """The client's error for a request the upstream refused."""
        if err.status == 404:
            if self.request.model is None:
                # The operator's configured model: not the client's fault, nor the upstream's health.
                return UpstreamError(
                    f"the generator does not serve the configured model {self.model!r} "
                    f"(generator.model): {err.message}"
                )
            return InvalidRequest(
                f"the generator does not serve model {self.model!r}: {err.message}", param="model"
            )
        return InvalidRequest(f"the generator rejected the request: {err.message}")

    def _fail(self, indexes: range | list[int], err: CandidateFailed) -> None:
        for index in indexes:
            live = self._live[index]
            if not live.done:
                live.done = True
                self._events.put_nowait(Failed(index, err.dropped()))

    def _receiver(self, call: _Call) -> Any:
        """The on_chunk of a call: demultiplexes its choices into candidates."""

        async def on_chunk(data: Any) -> None:
            deltas, usage = parse_chunk(data)
            if usage is not None:
                call.prompt_tokens = usage.prompt_tokens
                call.reported_tokens = usage.completion_tokens
            for delta in deltas:
                if not 0 <= delta.index < call.count:
                    continue  # more choices than asked for: ignored
                live = self._live[call.first + delta.index]
                if live.done:
                    continue  # cancelled (n mode: its stream still runs for the others)
                for piece in delta.tool_calls:
                    live.calls.setdefault(piece.index, _ToolCallParts()).add(piece)
                if delta.logprobs is not None:
                    live.logprobs.append(delta.logprobs)
                if delta.text or delta.tool_calls:
                    live.parts.append(delta.text)
                    live.tokens += 1
                    call.counted_tokens += 1
                    every = self.progress_every
                    if delta.text and (self.progress or (every and live.tokens % every == 0)):
                        self._events.put_nowait(Progress(live.index, live.text(), live.tokens))
                if delta.finish_reason is not None:
                    live.finish_reason = delta.finish_reason
                    live.done = True
                    self._events.put_nowait(Finished(self._generation(live, call)))

        return on_chunk

    def _generation(self, live: _Live, call: _Call) -> Generation:
        return Generation(
            index=live.index,
            text=live.text(),
            finish_reason=live.finish_reason or "stop",
            prompt_tokens=call.prompt_tokens,
            completion_tokens=live.tokens,
            tool_calls=live.tool_calls(),
            logprobs=merge_logprobs(live.logprobs),
        )

    def _start_over(self, call: _Call) -> bool:
        """A broken stream may be retried from scratch only while nothing of it was shown."""
        if self.progress:
            return False
        for index in range(call.first, call.first + call.count):
            live = self._live[index]
            if live.finish_reason is None:
                live.clear()
        call.counted_tokens = sum(self._live[i].tokens for i in range(call.first, call.first + call.count))
        return True

    def _finish_unterminated(self, call: _Call) -> list[int]:
        """At a stream's clean end: candidates that got text but no finish_reason were cut
        short (llama-cpp-python ends a stream that way when another request interrupts it)
        and fail; those that got nothing are returned (the upstream did not make them)."""
        missing: list[int] = []
        for index in range(call.first, call.first + call.count):
            live = self._live[index]
            if live.done:
                continue
            if live.parts or live.calls:
                self._fail(
                    [index],
                    CandidateFailed(
                        "bad_response", "the upstream ended the stream before the candidate finished"
                    ),
                )
            else:
                missing.append(index)
        return missing

    async def _single(self, call: _Call) -> None:
        index = call.first
        path, body = build_payload(self.request, self.model, self.base_seed + index, 1)
        try:
            answered = await self.client.caller.stream(
                path,
                body,
                self.deadline,
                self._receiver(call),
                request_key=self,
                start_over=lambda: self._start_over(call),
            )
        except CandidateFailed as err:
            self._fail([index], err)
            return
        except BadResponse as err:
            self._fail([index], CandidateFailed("bad_response", str(err)))
            return
        if answered is self._refused_n and answered.honours_n is None:
            answered.honours_n = False
        missing = self._finish_unterminated(call)
        if missing:
            self._fail(missing, CandidateFailed("bad_response", "the upstream stream ended without text"))

    async def _batch(self, call: _Call, endpoint: Endpoint) -> None:
        """One call with n=best_of; what it does not return is topped up with parallel calls."""
        count = call.count
        path, body = build_payload(self.request, self.model, self.base_seed, count)
        try:
            answered = await self.client.caller.stream(
                path,
                body,
                self.deadline,
                self._receiver(call),
                endpoint,
                request_key=self,
                start_over=lambda: self._start_over(call),
            )
        except UpstreamRejected:
            if endpoint.honours_n:
                raise  # it takes n: the request itself is wrong
            # Some servers refuse n>1 outright (a 400/422 about `n`). Parallel
            # calls tell that apart from a bad prompt: those are rejected too.
            self._refused_n = endpoint
            self._spawn_singles(range(count))
            return
        except (CandidateFailed, BadResponse) as err:
            failed = err if isinstance(err, CandidateFailed) else CandidateFailed("bad_response", str(err))
            self._fail(range(count), failed)
            return
        missing = self._finish_unterminated(call)
        if answered.honours_n is None and count > 1:
            # Probed once per upstream; a server that returns one choice for n>1
            # (llama.cpp, transformers serve) gets parallel calls from now on.
            answered.honours_n = not missing
        if not self._closed:
            self._spawn_singles(missing)


async def collect(run: FanOut) -> tuple[list[Generation], list[Dropped]]:
    """Every generation and drop of a run, in index order (closes the run)."""
    generations: list[Generation] = []
    dropped: list[Dropped] = []
    try:
        async for event in run:
            if isinstance(event, Finished):
                generations.append(event.generation)
            elif isinstance(event, Failed):
                dropped.append(event.dropped)
    finally:
        with contextlib.suppress(Exception):
            await run.aclose()
    generations.sort(key=lambda g: g.index)
    return generations, dropped
