"""ScriptedGenerator: an in-process CandidateGenerator whose candidates stream
fixed token lists, one token per candidate per step in index order — a
deterministic fake for the engine's loop (no HTTP, no clock)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from bon_gateway.engine.protocols import ReadinessListener
from bon_gateway.types import (
    BonRequest,
    Deadline,
    Dropped,
    Failed,
    Finished,
    Generation,
    GenerationEvent,
    Progress,
    Usage,
)
from tests.fakes.sse import tokens_of

__all__ = ["ScriptedGenerator", "ScriptedRun"]


class ScriptedRun:
    """One request: candidate i streams `tokens[i]`; `fail` maps an index to the token
    count after which it fails (a stream that dies); `step_s`: the pause between steps.
    Records what each candidate sent.
    Progress: for every token with `progress`, else every `progress_every` tokens."""

    def __init__(
        self,
        tokens: Sequence[Sequence[str]],
        progress: bool,
        fail: dict[int, int],
        hang: bool = False,
        progress_every: int = 0,
        step_s: float = 0.0,
    ) -> None:
        self.tokens = [list(t) for t in tokens]
        self.step_s = step_s
        self.progress = progress
        self.progress_every = progress_every
        self.fail = fail
        self.hang = hang
        self.sent = [0] * len(self.tokens)
        self.cancelled: set[int] = set()
        self.closed = False

    def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[GenerationEvent]:
        done: set[int] = set()
        while len(done | self.cancelled) < len(self.tokens):
            for i, tokens in enumerate(self.tokens):
                if i in done or i in self.cancelled:
                    continue
                if self.fail.get(i) == self.sent[i]:
                    done.add(i)
                    yield Failed(i, Dropped("connect_error", "the stream broke"))
                    continue
                if self.sent[i] < len(tokens):
                    self.sent[i] += 1
                    every = self.progress_every
                    if self.progress or (every and self.sent[i] % every == 0):
                        yield Progress(i, "".join(tokens[: self.sent[i]]), self.sent[i])
                if self.sent[i] == len(tokens):
                    done.add(i)
                    yield Finished(Generation(i, "".join(tokens), "stop", 3, len(tokens)))
            # Let the consumer's scoring run between steps, as real streams interleave.
            await asyncio.sleep(self.step_s)
            if self.hang:
                await asyncio.Event().wait()

    def cancel(self, index: int) -> None:
        self.cancelled.add(index)

    def usage(self) -> Usage:
        finished = sum(1 for i, t in enumerate(self.tokens) if self.sent[i] == len(t))
        return Usage(prompt_tokens=3, completion_tokens=sum(self.sent), candidates_generated=finished)

    async def aclose(self) -> None:
        self.closed = True


class ScriptedGenerator:
    """Candidate i of every request streams the words of `texts[i]` (see ScriptedRun)."""

    def __init__(
        self,
        texts: Sequence[str],
        *,
        fail: dict[int, int] | None = None,
        hang: bool = False,
        step_s: float = 0.0,
    ) -> None:
        self.texts = list(texts)
        self.step_s = step_s
        self.fail = dict(fail or {})
        self.hang = hang
        self.runs: list[ScriptedRun] = []
        self.deadlines: list[Deadline] = []

    @property
    def default_model(self) -> str:
        return "scripted"

    def usable(self) -> bool:
        return True

    def on_readiness_change(self, listener: ReadinessListener) -> None:
        pass

    def stream(
        self, request: BonRequest, deadline: Deadline, *, progress: bool = False, progress_every: int = 0
    ) -> ScriptedRun:
        self.deadlines.append(deadline)
        tokens = [tokens_of(self.texts[i % len(self.texts)]) for i in range(request.best_of)]
        run = ScriptedRun(tokens, progress, self.fail, self.hang, progress_every, self.step_s)
        self.runs.append(run)
        return run

    async def aclose(self) -> None:
        pass
