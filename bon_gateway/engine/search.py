"""The engine's loop over live candidates: best-of-N and speculative rejection.

One loop serves both strategies. Candidates stream from the generator; each
one that finishes is scored at once against the request's prompt, which the
scoring group sent to its worker when the request started, batched with
whatever else finished meanwhile (one scoring call in flight per request).
With checkpoints (speculative rejection), once every live candidate has
reached a checkpoint's token count, their partial texts are scored (each
extends the candidate's own earlier partial, so the worker reuses that work)
and the lowest `rejection_rate` share of the race, finished candidates
included, is rejected: their streams are closed. Ranking happens when the
last candidate is scored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bon_gateway.engine.protocols import GenerationRun, OnGenerated, OnScored, ScoringGroup
from bon_gateway.engine.rejection import rejected_at_checkpoint
from bon_gateway.types import (
    Aggregation,
    CandidateScore,
    CheckpointReport,
    Deadline,
    Dropped,
    Failed,
    Finished,
    Generation,
    GenerationEvent,
    Progress,
    RejectedCandidate,
    ScoreBatchResult,
    Usage,
)

__all__ = ["OnCheckpoint", "OnWinnerText", "SearchOutcome", "SearchPlan", "search"]

log = logging.getLogger("bon_gateway.engine")

OnCheckpoint = Callable[[CheckpointReport], Awaitable[None]]
# (candidate index, text delta): the text of the only candidate left, as it grows.
OnWinnerText = Callable[[int, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class SearchPlan:
    checkpoints: tuple[int, ...] = ()  # empty: best-of-N, nothing rejected
    rejection_rate: float = 0.5
    keep: int = 1  # never fewer candidates in the race than the choices asked for
    aggregation: Aggregation = "last"


@dataclass(slots=True)
class Callbacks:
    on_generated: OnGenerated | None = None
    on_scored: OnScored | None = None
    on_checkpoint: OnCheckpoint | None = None
    on_winner_text: OnWinnerText | None = None


@dataclass(slots=True)
class _Candidate:
    index: int
    text: str = ""
    tokens: int = 0
    generation: Generation | None = None
    score: CandidateScore | None = None  # on the whole text
    dropped: Dropped | None = None
    rejected: RejectedCandidate | None = None
    # checkpoint -> (text, tokens) when the candidate reached it
    snapshots: dict[int, tuple[str, int]] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.generation is None and self.dropped is None and self.rejected is None

    @property
    def in_race(self) -> bool:
        return self.dropped is None and self.rejected is None


@dataclass(slots=True)
class SearchOutcome:
    """What the loop produced: the finished candidates still in the race, with their scores."""

    finished: list[tuple[Generation, CandidateScore]]
    dropped: list[Dropped]
    rejected: list[RejectedCandidate]
    checkpoints: list[CheckpointReport]
    usage: Usage
    generate_seconds: float  # until the last stream ended
    score_seconds: float  # scoring after that


# What the loop's inbox carries besides generation events.
@dataclass(frozen=True, slots=True)
class _Scored:
    batch: tuple[int, ...]
    result: ScoreBatchResult


@dataclass(frozen=True, slots=True)
class _RoundScored:
    checkpoint: int
    batch: tuple[int, ...]
    result: ScoreBatchResult
    seconds: float


@dataclass(frozen=True, slots=True)
class _GenerationDone:
    pass


_Message = GenerationEvent | _Scored | _RoundScored | _GenerationDone | BaseException


class _Search:
    def __init__(
        self,
        best_of: int,
        plan: SearchPlan,
        run: GenerationRun,
        group: ScoringGroup,
        deadline: Deadline,
        callbacks: Callbacks,
        reward_of: Callable[[CandidateScore], float],
    ) -> None:
        self.plan = plan
        self.run = run
        self.group = group
        self.deadline = deadline
        self.callbacks = callbacks
        self.reward_of = reward_of
        self.candidates = [_Candidate(i) for i in range(best_of)]
        self.inbox: asyncio.Queue[_Message] = asyncio.Queue()
        self.tasks: set[asyncio.Task[None]] = set()
        self.to_score: list[int] = []
        self.scoring = False
        self.round_running = False
        self.next_round = 0
        self.generating = True
        self.reports: list[CheckpointReport] = []
        self.winner: int | None = None  # the only candidate left, whose text streams

    # -- tasks -----------------------------------------------------------------------
    def _spawn(self, work: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await work
            except asyncio.CancelledError:
                raise
            except BaseException as err:  # to the loop, which raises it
                self.inbox.put_nowait(err)

        task = asyncio.create_task(guarded())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _pump(self) -> None:
        async for event in self.run:
            self.inbox.put_nowait(event)
        self.inbox.put_nowait(_GenerationDone())

    async def _score_final(self, batch: tuple[int, ...]) -> None:
        # The whole assistant message: a candidate that calls tools is scored with its calls.
        texts = [self._generation(i).scoring_text() for i in batch]
        result = await self.group.score(texts, deadline=self.deadline)
        self.inbox.put_nowait(_Scored(batch, result))

    async def _score_round(self, checkpoint: int, batch: tuple[int, ...]) -> None:
        started = time.perf_counter()
        texts = [self.candidates[i].snapshots[checkpoint][0] for i in batch]
        result = await self.group.score(texts, deadline=self.deadline)
        self.inbox.put_nowait(_RoundScored(checkpoint, batch, result, time.perf_counter() - started))

    def _generation(self, index: int) -> Generation:
        generation = self.candidates[index].generation
        assert generation is not None
        return generation

    # -- the loop --------------------------------------------------------------------
    async def loop(self) -> SearchOutcome:
        started = time.perf_counter()
        generated_at = started
        self._spawn(self._pump())
        try:
            while self.generating or self.scoring or self.round_running or self.to_score:
                message = await self.inbox.get()
                if isinstance(message, BaseException):
                    raise message
                if isinstance(message, _GenerationDone):
                    self.generating = False
                    generated_at = time.perf_counter()
                elif isinstance(message, Progress):
                    await self._progress(message)
                elif isinstance(message, Finished):
                    await self._finished(message.generation)
                elif isinstance(message, Failed):
                    self.candidates[message.index].dropped = message.dropped
                elif isinstance(message, _Scored):
                    await self._scored(message)
                elif isinstance(message, _RoundScored):
                    await self._decide(message)
                self._kick()
        except asyncio.CancelledError:
            log.warning("phase=search_cancelled state=%s", self.describe())
            raise
        finally:
            for task in list(self.tasks):
                task.cancel()
            if self.tasks:
                await asyncio.wait(self.tasks)
        done = time.perf_counter()
        return SearchOutcome(
            finished=[
                (c.generation, c.score)
                for c in self.candidates
                if c.in_race and c.generation is not None and c.score is not None
            ],
            dropped=[c.dropped for c in self.candidates if c.dropped is not None],
            rejected=[c.rejected for c in self.candidates if c.rejected is not None],
            checkpoints=self.reports,
            usage=self.run.usage(),
            generate_seconds=generated_at - started,
            score_seconds=done - generated_at,
        )

    def describe(self) -> str:
        """The loop's state in one line (diagnostics when a request is cut)."""
        parts = [
            f"generating={self.generating} scoring={self.scoring} round={self.round_running}",
            f"next_round={self.next_round} to_score={self.to_score}",
        ]
        describe_run = getattr(self.run, "describe", None)
        if describe_run is not None:
            parts.append(f"run=({describe_run()})")
        for c in self.candidates:
            state = "live" if c.live else "dropped" if c.dropped else "rejected" if c.rejected else "finished"
            parts.append(f"{c.index}:{state}:{c.tokens}:{sorted(c.snapshots)}:{c.score is not None}")
        return " ".join(parts)

    def _kick(self) -> None:
        """Start the scoring work that can start now."""
        if not self.scoring and self.to_score:
            batch, self.to_score = tuple(self.to_score), []
            self.scoring = True
            self._spawn(self._score_final(batch))
        self._maybe_start_round()

    # -- events ----------------------------------------------------------------------
    async def _progress(self, event: Progress) -> None:
        candidate = self.candidates[event.index]
        if not candidate.live:
            return
        previous = candidate.text
        candidate.text, candidate.tokens = event.text, event.tokens
        for checkpoint in self.plan.checkpoints[self.next_round :]:
            if candidate.tokens >= checkpoint and checkpoint not in candidate.snapshots:
                candidate.snapshots[checkpoint] = (candidate.text, candidate.tokens)
        if self.winner == event.index and self.callbacks.on_winner_text is not None:
            await self.callbacks.on_winner_text(event.index, event.text[len(previous) :])

    async def _finished(self, generation: Generation) -> None:
        candidate = self.candidates[generation.index]
        if candidate.rejected is not None:
            return  # rejected while its last chunks were on the way
        previous = candidate.text
        candidate.generation = generation
        candidate.text, candidate.tokens = generation.text, generation.completion_tokens
        for checkpoint in self.plan.checkpoints[self.next_round :]:
            # Without a Progress event at that count (several tokens in one chunk), the
            # whole text stands for its first `checkpoint` tokens.
            if candidate.tokens >= checkpoint and checkpoint not in candidate.snapshots:
                candidate.snapshots[checkpoint] = (candidate.text, candidate.tokens)
        if self.winner == generation.index and self.callbacks.on_winner_text is not None:
            rest = generation.text[len(previous) :] if generation.text.startswith(previous) else ""
            if rest:
                await self.callbacks.on_winner_text(generation.index, rest)
        if self.callbacks.on_generated is not None:
            await self.callbacks.on_generated(generation)
        self.to_score.append(generation.index)

    async def _scored(self, message: _Scored) -> None:
        self.scoring = False
        for index, score in zip(message.batch, message.result.scores, strict=True):
            self.candidates[index].score = score
            if self.callbacks.on_scored is not None:
                await self.callbacks.on_scored(index, score)

    # -- checkpoints -----------------------------------------------------------------
    def _maybe_start_round(self) -> None:
        """Start a checkpoint's round once every candidate in the race has reached it or finished.

        At checkpoint c each candidate is judged on its first c tokens, or on its
        whole text when it finished shorter: a decision that depends on the texts
        only, never on which stream happened to be faster.
        """
        checkpoints = self.plan.checkpoints
        if self.round_running or self.next_round >= len(checkpoints):
            return
        checkpoint = checkpoints[self.next_round]
        race = [c for c in self.candidates if c.in_race]
        if any(c.live and checkpoint not in c.snapshots for c in race):
            return  # stragglers: the round waits for them
        reached = [c for c in race if checkpoint in c.snapshots]
        if not reached:
            # Every candidate finished before this checkpoint: nothing left to stop.
            self.next_round = len(checkpoints)
            return
        if any(checkpoint not in c.snapshots and c.score is None for c in race):
            return  # the short ones compete on their whole text: wait for its score
        self.round_running = True
        self._spawn(self._score_round(checkpoint, tuple(c.index for c in reached)))

    async def _decide(self, message: _RoundScored) -> None:
        self.round_running = False
        self.next_round += 1
        rewards: dict[int, float] = {}
        for index, score in zip(message.batch, message.result.scores, strict=True):
            rewards[index] = self.reward_of(score)
        for c in self.candidates:
            if c.in_race and c.index not in rewards:
                assert c.score is not None  # finished shorter than the checkpoint, scored
                rewards[c.index] = self.reward_of(c.score)
        rejected = rejected_at_checkpoint(rewards, self.plan.rejection_rate, self.plan.keep)
        for index in rejected:
            candidate = self.candidates[index]
            text, tokens = candidate.snapshots.get(message.checkpoint, (candidate.text, candidate.tokens))
            candidate.rejected = RejectedCandidate(index, text, rewards[index], tokens, message.checkpoint)
            self.run.cancel(index)
            if index in self.to_score:
                self.to_score.remove(index)
        report = CheckpointReport(
            message.checkpoint, tuple(sorted(rewards.items())), tuple(rejected), message.seconds
        )
        self.reports.append(report)
        if self.callbacks.on_checkpoint is not None:
            await self.callbacks.on_checkpoint(report)
        await self._maybe_stream_winner()

    async def _maybe_stream_winner(self) -> None:
        """One live candidate left alone in the race is the answer: its text may stream now."""
        if self.winner is not None or self.callbacks.on_winner_text is None:
            return
        in_race = [c for c in self.candidates if c.in_race]
        if len(in_race) == 1 and in_race[0].live:
            self.winner = in_race[0].index
            if in_race[0].text:
                await self.callbacks.on_winner_text(self.winner, in_race[0].text)


async def search(
    best_of: int,
    plan: SearchPlan,
    run: GenerationRun,
    group: ScoringGroup,
    deadline: Deadline,
    callbacks: Callbacks,
    reward_of: Callable[[CandidateScore], float],
) -> SearchOutcome:
    """Run the loop until every candidate is finished and scored, rejected or dropped."""
    searcher = _Search(best_of, plan, run, group, deadline, callbacks, reward_of)
    if callbacks.on_winner_text is not None and best_of == 1:
        searcher.winner = 0  # nothing to choose from: the only candidate streams from its start
    return await searcher.loop()
