"""The engine's loop over live candidates: best-of-N and speculative rejection.

One loop serves both strategies. Candidates stream from the generator; each
one that finishes is scored at once against the request's prompt, which the
scoring group sent to its worker when the request started, batched with
whatever else finished meanwhile (one scoring call in flight per request).
With checkpoints (speculative rejection) the partial texts are scored at
each checkpoint's token count (each extends the candidate's own earlier
partial, so the worker reuses that work) and the weak ones are rejected: their
streams are closed. Two rules (`SearchPlan.per_candidate`):

- per candidate (default): a candidate is judged as soon as it reaches the
  checkpoint, against the rewards seen there so far (rejection.py,
  `rejected_on_arrival`); the first `min_peers` to arrive are judged together.
  Fast candidates are stopped without waiting for the slowest.
- round: once every live candidate has reached the checkpoint, the lowest
  `rejection_rate` share of the race, finished candidates included, is rejected.

Ranking happens when the last candidate is scored.

Texts sent ahead (`SearchPlan.prefill_every`, best-of-N): while the candidates
are generated and the request has no scoring call in flight, the live texts
that grew by `prefill_every` tokens since they were last sent go to the
worker, which keeps their keys and values in the group; the results are not
used. A finished candidate then computes only its last tokens, so the
scoring after the slowest candidate costs little more than one short tail.
A candidate that finishes while its text is on the way waits for that call,
whose work its own scoring reuses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from bon_gateway.engine.ahead import texts_to_send_ahead
from bon_gateway.engine.protocols import GenerationRun, OnGenerated, OnScored, ScoringGroup
from bon_gateway.engine.rejection import rejected_at_checkpoint, rejected_on_arrival
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
    per_candidate: bool = True  # judge each candidate as it reaches a checkpoint (else: rounds)
    min_peers: int = 2  # per_candidate: arrivals at a checkpoint before anyone is rejected there
    # Without checkpoints: send a live text ahead each time it grew by this many tokens (0: never).
    prefill_every: int = 0


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
    prefilled: int = 0  # tokens of the text last sent ahead

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
    batch: tuple[int, ...]  # whole texts
    result: ScoreBatchResult
    partials: tuple[tuple[int, int], ...] = ()  # (checkpoint, index), scored after `batch`
    seconds: float = 0.0


@dataclass(slots=True)
class _Checkpoint:
    """Per-candidate rejection at one checkpoint: who arrived, in what order, and what was decided."""

    tokens: int
    # Candidates in the order they reached it (or finished shorter than it).
    arrivals: list[int] = field(default_factory=list)
    finished_short: set[int] = field(default_factory=set)  # competing with their whole text
    partial_rewards: dict[int, float] = field(default_factory=dict)
    cursor: int = 0  # arrivals[:cursor] are judged (or were gone before their turn)
    waiting: list[int] = field(default_factory=list)  # arrived, before min_peers were reached
    judged: dict[int, float] = field(default_factory=dict)  # the rewards seen here, in order
    cleared: set[int] = field(default_factory=set)  # judged here and kept
    rejected: list[int] = field(default_factory=list)
    warmed: bool = False  # min_peers reached: each next arrival is judged at once
    closed: bool = False
    seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class _RoundScored:
    checkpoint: int
    batch: tuple[int, ...]
    result: ScoreBatchResult
    seconds: float


@dataclass(frozen=True, slots=True)
class _Prefilled:
    batch: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _GenerationDone:
    pass


_Message = GenerationEvent | _Scored | _RoundScored | _Prefilled | _GenerationDone | BaseException


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
        self.points = [_Checkpoint(c) for c in plan.checkpoints] if plan.per_candidate else []
        self.partials_to_score: list[tuple[int, int]] = []  # (checkpoint position, index)
        self.winner: int | None = None  # the only candidate left, whose text streams
        self.prefilling: set[int] = set()  # candidates whose texts are on the way ahead

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

    async def _score_final(self, batch: tuple[int, ...], partials: tuple[tuple[int, int], ...] = ()) -> None:
        # The whole assistant message: a candidate that calls tools is scored with its calls.
        started = time.perf_counter()
        texts = [self._generation(i).scoring_text() for i in batch]
        texts += [self.candidates[i].snapshots[self.plan.checkpoints[p]][0] for p, i in partials]
        result = await self.group.score(texts, deadline=self.deadline)
        self.inbox.put_nowait(_Scored(batch, result, partials, time.perf_counter() - started))

    async def _score_round(self, checkpoint: int, batch: tuple[int, ...]) -> None:
        started = time.perf_counter()
        texts = [self.candidates[i].snapshots[checkpoint][0] for i in batch]
        result = await self.group.score(texts, deadline=self.deadline)
        self.inbox.put_nowait(_RoundScored(checkpoint, batch, result, time.perf_counter() - started))

    async def _prefill(self, batch: tuple[int, ...], texts: list[str]) -> None:
        try:
            await self.group.score(texts, deadline=self.deadline)
        except Exception as err:  # only work saved is lost: the final scoring recomputes it
            log.debug("phase=prefill_failed error=%s", type(err).__name__)
        self.inbox.put_nowait(_Prefilled(batch))

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
            while (
                self.generating
                or self.scoring
                or self.round_running
                or self.to_score
                or self.partials_to_score
            ):
                message: _Message | None = await self.inbox.get()
                while message is not None:  # all that is there, then one scoring call for it all
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
                    elif isinstance(message, _Prefilled):
                        self.prefilling.difference_update(message.batch)
                    message = None if self.inbox.empty() else self.inbox.get_nowait()
                if self.points:
                    await self._judge()
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
            f"next_round={self.next_round} to_score={self.to_score} prefilling={sorted(self.prefilling)}",
        ]
        for point in self.points:
            parts.append(
                f"k{point.tokens}:arrived={len(point.arrivals)}:judged={len(point.judged)}"
                f":waiting={len(point.waiting)}:closed={point.closed}"
            )
        describe_run = getattr(self.run, "describe", None)
        if describe_run is not None:
            parts.append(f"run=({describe_run()})")
        for c in self.candidates:
            state = "live" if c.live else "dropped" if c.dropped else "rejected" if c.rejected else "finished"
            parts.append(f"{c.index}:{state}:{c.tokens}:{sorted(c.snapshots)}:{c.score is not None}")
        return " ".join(parts)

    def _kick(self) -> None:
        """Start the scoring work that can start now."""
        # A candidate whose text is on the way ahead waits for it: its scoring reuses that work.
        ready = [i for i in self.to_score if i not in self.prefilling]
        if not self.scoring and (ready or self.partials_to_score):
            batch = tuple(ready)
            self.to_score = [i for i in self.to_score if i in self.prefilling]
            partials, self.partials_to_score = tuple(self.partials_to_score), []
            self.scoring = True
            self._spawn(self._score_final(batch, partials))
        if not self.plan.per_candidate:
            self._maybe_start_round()
        if self.plan.prefill_every and not self.plan.checkpoints:
            self._send_ahead()

    def _send_ahead(self) -> None:
        """Send the live texts that grew by prefill_every tokens, when the worker has nothing
        of this request to do: what they leave to compute at the end is their last tokens."""
        if not self.generating or self.scoring or self.prefilling:
            return
        grown = ((c.index, c.tokens - c.prefilled) for c in self.candidates if c.live)
        batch = [self.candidates[i] for i in texts_to_send_ahead(grown, self.plan.prefill_every)]
        if not batch:
            return
        for candidate in batch:
            candidate.prefilled = candidate.tokens
            self.prefilling.add(candidate.index)
        self._spawn(self._prefill(tuple(c.index for c in batch), [c.text for c in batch]))

    # -- events ----------------------------------------------------------------------
    async def _progress(self, event: Progress) -> None:
        candidate = self.candidates[event.index]
        if not candidate.live:
            return
        previous = candidate.text
        if event.tokens < candidate.tokens:  # its stream started over
            candidate.prefilled = 0
        candidate.text, candidate.tokens = event.text, event.tokens
        self._snapshot(candidate)
        if self.winner == event.index and self.callbacks.on_winner_text is not None:
            await self.callbacks.on_winner_text(event.index, event.text[len(previous) :])

    async def _finished(self, generation: Generation) -> None:
        candidate = self.candidates[generation.index]
        if candidate.rejected is not None:
            return  # rejected while its last chunks were on the way
        previous = candidate.text
        candidate.generation = generation
        candidate.text, candidate.tokens = generation.text, generation.completion_tokens
        # Without a Progress event at a checkpoint's count (several tokens in one chunk),
        # the whole text stands for its first `checkpoint` tokens.
        self._snapshot(candidate)
        for point in self.points:
            if candidate.tokens < point.tokens:  # it competes there with its whole text
                point.arrivals.append(candidate.index)
                point.finished_short.add(candidate.index)
        if self.winner == generation.index and self.callbacks.on_winner_text is not None:
            rest = generation.text[len(previous) :] if generation.text.startswith(previous) else ""
            if rest:
                await self.callbacks.on_winner_text(generation.index, rest)
        if self.callbacks.on_generated is not None:
            await self.callbacks.on_generated(generation)
        self.to_score.append(generation.index)

    def _snapshot(self, candidate: _Candidate) -> None:
        for position, checkpoint in enumerate(self.plan.checkpoints):
            if position < self.next_round or checkpoint in candidate.snapshots:
                continue
            if candidate.tokens >= checkpoint:
                candidate.snapshots[checkpoint] = (candidate.text, candidate.tokens)
                if self.points:
                    self.points[position].arrivals.append(candidate.index)
                    self.partials_to_score.append((position, candidate.index))

    async def _scored(self, message: _Scored) -> None:
        self.scoring = False
        scores = message.result.scores
        whole, partial = scores[: len(message.batch)], scores[len(message.batch) :]
        for index, score in zip(message.batch, whole, strict=True):
            self.candidates[index].score = score
            if self.callbacks.on_scored is not None:
                await self.callbacks.on_scored(index, score)
        for position in {p for p, _ in message.partials}:
            self.points[position].seconds += message.seconds
        for (position, index), score in zip(message.partials, partial, strict=True):
            self.points[position].partial_rewards[index] = self.reward_of(score)

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

    # -- per-candidate checkpoints -----------------------------------------------------
    async def _judge(self) -> None:
        """Judge every arrival whose turn has come, checkpoint by checkpoint, until nothing moves.

        An arrival's turn at checkpoint k comes when its reward there is known, it was
        kept at the checkpoint before k, and every earlier arrival at k was judged, so
        the decisions depend on the order of arrival and the rewards only, not on how
        the scoring calls happened to be batched.
        """
        moved = True
        while moved:
            moved = False
            for position, point in enumerate(self.points):
                if point.closed:
                    continue
                while point.cursor < len(point.arrivals):
                    index = point.arrivals[point.cursor]
                    candidate = self.candidates[index]
                    if not candidate.in_race:
                        point.cursor += 1  # gone before its turn: not a peer
                        continue
                    if position > 0 and index not in self.points[position - 1].cleared:
                        break  # still to be judged at the checkpoint before
                    reward = self._reward_at(point, index)
                    if reward is None:
                        break  # its score is on the way
                    point.cursor += 1
                    moved = True
                    point.judged[index] = reward
                    if point.warmed:
                        await self._arrival_judged(point, index)
                    else:
                        point.waiting.append(index)
                if not point.warmed and point.waiting:
                    everyone = all(not c.in_race or c.index in point.judged for c in self.candidates)
                    if len(point.waiting) >= self.plan.min_peers or everyone:
                        await self._judge_waiting(point)
                        moved = True
                if all(not c.in_race or c.index in point.judged for c in self.candidates):
                    point.closed = True
                    moved = True
                    await self._report(point)

    def _reward_at(self, point: _Checkpoint, index: int) -> float | None:
        if index in point.finished_short:
            score = self.candidates[index].score
            return None if score is None else self.reward_of(score)
        return point.partial_rewards.get(index)

    def _may_reject(self, point: _Checkpoint, index: int) -> bool:
        # Finished candidates are peers (they set the bar) but are never rejected
        # there: stopping them saves nothing, and the final ranking judges their
        # whole text anyway. Never fewer than `keep` left in the race.
        race = sum(1 for c in self.candidates if c.in_race)
        return index not in point.finished_short and race - 1 >= max(1, self.plan.keep)

    async def _judge_waiting(self, point: _Checkpoint) -> None:
        """min_peers have arrived (or everyone has): judge them together, as a round would."""
        point.warmed = True
        waiting, point.waiting = point.waiting, []
        rewards = {i: point.judged[i] for i in waiting}
        lowest_first = sorted(
            rejected_at_checkpoint(rewards, self.plan.rejection_rate, keep=1),
            key=lambda i: (rewards[i], -i),
        )
        rejected: set[int] = set()
        for index in lowest_first:
            if self.candidates[index].in_race and self._may_reject(point, index):
                self._reject(point, index)
                rejected.add(index)
        point.cleared.update(i for i in waiting if i not in rejected)
        if rejected:
            await self._maybe_stream_winner()

    async def _arrival_judged(self, point: _Checkpoint, index: int) -> None:
        if rejected_on_arrival(point.judged, index, self.plan.rejection_rate) and self._may_reject(
            point, index
        ):
            self._reject(point, index)
            await self._maybe_stream_winner()
        else:
            point.cleared.add(index)

    def _reject(self, point: _Checkpoint, index: int) -> None:
        candidate = self.candidates[index]
        text, tokens = candidate.snapshots.get(point.tokens, (candidate.text, candidate.tokens))
        candidate.rejected = RejectedCandidate(index, text, point.judged[index], tokens, point.tokens)
        point.rejected.append(index)
        self.run.cancel(index)
        if index in self.to_score:
            self.to_score.remove(index)
        self.partials_to_score = [(p, i) for p, i in self.partials_to_score if i != index]
        log.debug("phase=rejected index=%d checkpoint=%d reward=%s", index, point.tokens, point.judged[index])

    async def _report(self, point: _Checkpoint) -> None:
        if all(i in point.finished_short for i in point.judged):
            return  # nobody reached it: nothing was judged on a partial
        report = CheckpointReport(
            point.tokens, tuple(sorted(point.judged.items())), tuple(sorted(point.rejected)), point.seconds
        )
        self.reports.append(report)
        if self.callbacks.on_checkpoint is not None:
            await self.callbacks.on_checkpoint(report)

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
