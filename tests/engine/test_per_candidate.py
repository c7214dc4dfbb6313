"""Per-candidate speculative rejection (the default rule) against an independent
reference, on a deterministic fake generator whose tokens arrive at given ticks.

The fake (`TimedGenerator`) sends, tick by tick, the tokens due at that tick in
candidate order, then lets the event loop settle so that the engine has scored
and judged everything it received before the next tick (the fake scorer answers
at once). The reference below replays the same ticks on plain lists.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bon_gateway.config import GatewayConfig
from bon_gateway.engine.engine import Engine
from bon_gateway.engine.protocols import ReadinessListener
from bon_gateway.metrics import Metrics
from bon_gateway.types import (
    BonRequest,
    BonResult,
    Deadline,
    Finished,
    Generation,
    GenerationEvent,
    Progress,
    Usage,
)
from tests.fakes.generator import ScriptedGenerator
from tests.fakes.scorer import FakeScorer
from tests.fakes.sse import tokens_of
from tests.fakes.word_verifier import TEXTS as SEARCH_TEXTS
from tests.fakes.word_verifier import USER, WEIGHTS, reward

SETTLE_STEPS = 64  # event-loop turns after each tick: far more than a scoring call takes


# -- the fake generator ------------------------------------------------------------------
class TimedRun:
    """Candidate i's token j arrives at tick `ticks[i][j]` (non-decreasing). `log` records
    ("token", i, count) and ("cancel", i, count) in the order they happened."""

    def __init__(self, tokens: Sequence[Sequence[str]], ticks: Sequence[Sequence[int]]) -> None:
        self.tokens = [list(t) for t in tokens]
        self.ticks = [list(t) for t in ticks]
        self.sent = [0] * len(self.tokens)
        self.cancelled: set[int] = set()
        self.log: list[tuple[str, int, int]] = []

    def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[GenerationEvent]:
        last = max((t[-1] for t in self.ticks if t), default=0)
        for tick in range(last + 1):
            for i, tokens in enumerate(self.tokens):
                if i in self.cancelled or self.sent[i] == len(tokens):
                    continue
                while self.sent[i] < len(tokens) and self.ticks[i][self.sent[i]] == tick:
                    self.sent[i] += 1
                    self.log.append(("token", i, self.sent[i]))
                    yield Progress(i, "".join(tokens[: self.sent[i]]), self.sent[i])
                if self.sent[i] == len(tokens):
                    yield Finished(Generation(i, "".join(tokens), "stop", 3, len(tokens)))
            for _ in range(SETTLE_STEPS):
                await asyncio.sleep(0)

    def cancel(self, index: int) -> None:
        self.cancelled.add(index)
        self.log.append(("cancel", index, self.sent[index]))

    def usage(self) -> Usage:
        done = sum(1 for i, t in enumerate(self.tokens) if self.sent[i] == len(t))
        return Usage(prompt_tokens=3, completion_tokens=sum(self.sent), candidates_generated=done)

    async def aclose(self) -> None:
        pass


class TimedGenerator:
    def __init__(self, texts: Sequence[str], ticks: Sequence[Sequence[int]]) -> None:
        self.tokens = [tokens_of(t) for t in texts]
        self.ticks = ticks
        self.runs: list[TimedRun] = []

    @property
    def default_model(self) -> str:
        return "timed"

    def usable(self) -> bool:
        return True

    def on_readiness_change(self, listener: ReadinessListener) -> None:
        pass

    def stream(
        self, request: BonRequest, deadline: Deadline, *, progress: bool = False, progress_every: int = 0
    ) -> TimedRun:
        assert progress  # checkpoints need Progress events
        run = TimedRun(self.tokens, self.ticks)
        self.runs.append(run)
        return run

    async def aclose(self) -> None:
        pass


# -- the reference -------------------------------------------------------------------------
@dataclass
class Expected:
    reports: list[tuple[int, dict[int, float], list[int]]]  # checkpoint, rewards seen, rejected
    rejected_at: dict[int, int]  # candidate -> checkpoint
    sent: list[int]  # tokens each candidate sent
    winner: int
    finished: set[int]


@dataclass
class _Point:
    queue: list[int] = field(default_factory=list)  # arrived, not judged yet
    short: set[int] = field(default_factory=set)  # finished before it: whole-text reward
    seen: dict[int, float] = field(default_factory=dict)
    waiting: list[int] = field(default_factory=list)
    kept: set[int] = field(default_factory=set)
    rejected: list[int] = field(default_factory=list)
    warm: bool = False
    closed: bool = False


def reference(
    texts: Sequence[str],
    ticks: Sequence[Sequence[int]],
    rate: float,
    checkpoints: Sequence[int],
    keep: int,
    min_peers: int,
) -> Expected:
    """The per-candidate rule replayed on lists (README, "Search").

    At checkpoint k the candidates are taken in the order they reached k (a tick
    at a time, lower index first; one that finished shorter than k arrives when
    it finishes, with its whole text). One that was not kept at the checkpoint
    before waits for that. The first `min_peers` are judged together: the
    floor(rate * m) lowest of those m are rejected. After them, each arrival is
    rejected when fewer than floor(rate * m) of the m rewards seen at k (its own
    included) rank below it. Finished candidates are never rejected, and never
    below `keep` left. Ties rank the later candidate lower.
    """
    tokens = [tokens_of(t) for t in texts]
    n = len(tokens)
    points = {k: _Point() for k in checkpoints}
    gone: dict[int, int] = {}
    sent = [0] * n

    def rank_key(point: _Point, i: int) -> tuple[float, int]:
        return (point.seen[i], -i)

    def reward_at(k: int, i: int) -> float:
        return reward(texts[i]) if i in points[k].short else reward("".join(tokens[i][:k]))

    def may_reject(k: int, i: int) -> bool:
        return i not in gone and i not in points[k].short and (n - len(gone)) - 1 >= max(1, keep)

    def reject(k: int, i: int) -> None:
        gone[i] = k
        points[k].rejected.append(i)

    def settle() -> list[tuple[int, dict[int, float], list[int]]]:
        reports = []
        changed = True
        while changed:
            changed = False
            for position, k in enumerate(checkpoints):
                point = points[k]
                if point.closed:
                    continue
                while point.queue:
                    i = point.queue[0]
                    if i in gone:
                        point.queue.pop(0)
                        continue
                    if position and i not in points[checkpoints[position - 1]].kept:
                        break
                    point.queue.pop(0)
                    changed = True
                    point.seen[i] = reward_at(k, i)
                    if not point.warm:
                        point.waiting.append(i)
                        continue
                    m = len(point.seen)
                    below = sum(1 for j in point.seen if rank_key(point, j) < rank_key(point, i))
                    if below < int(rate * m + 1e-9) and may_reject(k, i):
                        reject(k, i)
                    else:
                        point.kept.add(i)
                everyone = all(i in gone or i in point.seen for i in range(n))
                if not point.warm and point.waiting and (len(point.waiting) >= min_peers or everyone):
                    point.warm = True
                    changed = True
                    lowest = sorted(point.waiting, key=lambda i: rank_key(point, i))
                    count = int(rate * len(lowest) + 1e-9)
                    for i in lowest[:count]:
                        if may_reject(k, i):
                            reject(k, i)
                    point.kept.update(i for i in point.waiting if i not in gone)
                    point.waiting = []
                if everyone:
                    point.closed = True
                    changed = True
                    if any(i not in point.short for i in point.seen):
                        reports.append((k, dict(point.seen), sorted(point.rejected)))
        return reports

    reports = []
    last = max((t[-1] for t in ticks if t), default=0)
    for tick in range(last + 1):
        for i in range(n):
            if i in gone or sent[i] == len(tokens[i]):
                continue
            while sent[i] < len(tokens[i]) and ticks[i][sent[i]] == tick:
                sent[i] += 1
                if sent[i] in points:
                    points[sent[i]].queue.append(i)
            if sent[i] == len(tokens[i]):
                for k in checkpoints:
                    if len(tokens[i]) < k:
                        points[k].queue.append(i)
                        points[k].short.add(i)
        reports += settle()
    race = [i for i in range(n) if i not in gone]
    winner = max(race, key=lambda i: (reward(texts[i]), -i))
    return Expected(reports, gone, sent, winner, set(race))


# -- driving the engine --------------------------------------------------------------------
def engine(
    texts: Sequence[str], ticks: Sequence[Sequence[int]], **strategy: object
) -> tuple[Engine, TimedGenerator]:
    config = GatewayConfig.model_validate(
        {"generator": {"url": "http://127.0.0.1:9/v1", "model": "timed"}, "strategy": strategy}
    )
    generator = TimedGenerator(texts, ticks)
    return Engine(config, generator, FakeScorer(reward_fn=reward), Metrics()), generator


async def run(gateway: Engine, best_of: int, **fields: object) -> BonResult:
    request = BonRequest(USER, best_of=best_of, strategy="speculative_rejection", **fields)  # type: ignore[arg-type]
    return await gateway.run(gateway.admit(request), Deadline.after(30))


def check(result: BonResult, expected: Expected, sent: list[int]) -> None:
    assert [(r.tokens, sorted(r.rejected)) for r in result.checkpoints] == [
        (k, rejected) for k, _, rejected in expected.reports
    ]
    for report, (_, seen, _) in zip(result.checkpoints, expected.reports, strict=True):
        assert dict(report.rewards) == pytest.approx(seen)
    assert {r.index: r.checkpoint for r in result.rejected} == expected.rejected_at
    assert {c.index for c in result.ranked} == expected.finished
    assert result.ranked[0].index == expected.winner
    # A rejected stream sent nothing after the tick it was judged at: the reference's counts.
    assert sent == expected.sent
    assert result.usage.completion_tokens == sum(expected.sent)


def random_ticks(tokens: Sequence[Sequence[str]], rng: random.Random) -> list[list[int]]:
    """Each candidate its own speed (1 to 4 ticks a token) with jitter."""
    ticks = []
    for t in tokens:
        speed, now, row = rng.randint(1, 4), 0, []
        for _ in t:
            now += speed + rng.randint(-1, 1) if speed > 1 else speed
            row.append(now)
        ticks.append(row)
    return ticks


TEXTS = (
    *SEARCH_TEXTS,
    "fine meh fine meh fine meh fine meh fine",
    "bad meh bad meh good good good good",
)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("min_peers", [None, 1, 3, 8])
async def test_matches_the_reference_for_random_speeds(seed: int, min_peers: int | None) -> None:
    rng = random.Random(seed)
    texts = list(TEXTS)
    rng.shuffle(texts)  # another arrival order of the same answers
    ticks = random_ticks([tokens_of(t) for t in texts], rng)
    strategy = {} if min_peers is None else {"min_peers": min_peers}
    gateway, generator = engine(texts, ticks, **strategy)
    result = await run(gateway, len(texts), rejection_rate=0.5, checkpoints=(2, 6))
    peers = 4 if min_peers is None else min_peers  # the default: ceil((1 - 0.5) * 8)
    expected = reference(texts, ticks, 0.5, (2, 6), keep=1, min_peers=peers)
    check(result, expected, generator.runs[0].sent)
    assert result.rejected  # the case rejects someone


async def test_a_fast_candidate_is_judged_before_the_slow_ones_reach_the_checkpoint() -> None:
    # Two fast candidates (a token a tick), two slow ones (a token every 10 ticks);
    # candidate 0 starts weakest. With min_peers 2 it is rejected as soon as the two
    # fast ones reached checkpoint 3, long before the slow ones get there.
    texts = ("bad bad bad meh meh meh meh meh", "good good good meh meh meh meh meh") + (
        "fine fine fine fine fine fine fine fine",
    ) * 2
    fast, slow = list(range(1, 9)), list(range(10, 90, 10))
    ticks = [fast, fast, slow, slow]
    gateway, generator = engine(texts, ticks, min_peers=2)
    result = await run(gateway, 4, rejection_rate=0.5, checkpoints=(3,))
    log = generator.runs[0].log
    cancel = log.index(("cancel", 0, 3))  # stopped at its checkpoint, not later
    slow_reach = min(log.index(("token", i, 3)) for i in (2, 3))
    assert cancel < slow_reach
    assert not [e for e in log[cancel:] if e[:2] == ("token", 0)]  # its stream sent nothing more
    assert generator.runs[0].sent[0] == 3
    # Candidate 3 ties with 2 and ranks lower (the later index): the second half rejected.
    assert {r.index: r.checkpoint for r in result.rejected} == {0: 3, 3: 3}
    check(result, reference(texts, ticks, 0.5, (3,), keep=1, min_peers=2), generator.runs[0].sent)
    # One report for the checkpoint, when every candidate has been judged there.
    assert [(r.tokens, r.rejected) for r in result.checkpoints] == [(3, (0, 3))]
    assert set(dict(result.checkpoints[0].rewards)) == {0, 1, 2, 3}

    # The round rule, on the same race, waits for the slow ones: the check above fails there.
    gateway, generator = engine(texts, ticks, rejection="round")
    await run(gateway, 4, rejection_rate=0.5, checkpoints=(3,))
    log = generator.runs[0].log
    cancels = [i for i, e in enumerate(log) if e[0] == "cancel"]
    assert cancels and min(cancels) > min(log.index(("token", i, 3)) for i in (2, 3))
    assert generator.runs[0].sent[0] > 3


async def test_keep_holds_and_finished_candidates_are_never_rejected() -> None:
    texts = ("bad", "bad bad bad bad", "good good good good", "meh meh meh meh", "bad bad bad bad")
    ticks = [[1], [1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]]
    gateway, generator = engine(texts, ticks, min_peers=1)
    result = await run(gateway, 5, n=3, rejection_rate=0.75, checkpoints=(2,))
    expected = reference(texts, ticks, 0.75, (2,), keep=3, min_peers=1)
    check(result, expected, generator.runs[0].sent)
    assert 0 in {c.index for c in result.ranked}  # finished at 1 token: a peer, not rejected
    assert len(result.ranked) >= 3


words = st.sampled_from(sorted(WEIGHTS))
race = st.lists(
    st.tuples(st.lists(words, min_size=1, max_size=10).map(" ".join), st.integers(1, 4), st.randoms()),
    min_size=1,
    max_size=7,
)


@settings(max_examples=60, deadline=None)
@given(
    candidates=race,
    rate=st.sampled_from([0.25, 0.5, 0.75]),
    checkpoints=st.lists(st.integers(1, 10), min_size=1, max_size=3, unique=True).map(sorted),
    keep=st.integers(1, 3),
    min_peers=st.integers(1, 5),
)
async def test_any_race_matches_the_reference(
    candidates: list[tuple[str, int, random.Random]],
    rate: float,
    checkpoints: list[int],
    keep: int,
    min_peers: int,
) -> None:
    texts = [t for t, _, _ in candidates]
    ticks = []
    for text, speed, rng in candidates:
        now, row = 0, []
        for _ in tokens_of(text):
            now += rng.randint(0, speed)  # 0: several tokens in one tick
            row.append(now)
        ticks.append(row)
    keep = min(keep, len(texts))
    gateway, generator = engine(texts, ticks, min_peers=min_peers)
    result = await run(gateway, len(texts), n=keep, rejection_rate=rate, checkpoints=tuple(checkpoints))
    check(result, reference(texts, ticks, rate, checkpoints, keep, min_peers), generator.runs[0].sent)


async def test_a_failed_stream_leaves_every_checkpoint_and_the_request_ends() -> None:
    # Candidates 1 and 4 die before / between the checkpoints: nobody waits for them.
    config = GatewayConfig.model_validate({"generator": {"url": "http://127.0.0.1:9/v1"}})
    generator = ScriptedGenerator(TEXTS[:6], fail={1: 3, 4: 1})
    gateway = Engine(config, generator, FakeScorer(reward_fn=reward), Metrics())
    result = await run(gateway, 6, rejection_rate=0.5, checkpoints=(2, 6), min_candidates=4)
    assert [d.reason for d in result.dropped] == ["connect_error", "connect_error"]
    judged = {i for report in result.checkpoints for i, _ in report.rewards}
    assert 4 not in judged  # failed after 1 token: never reached checkpoint 2
    assert {1, 4}.isdisjoint({c.index for c in result.ranked} | {r.index for r in result.rejected})
    assert [r.tokens for r in result.checkpoints] == [2, 6] and result.rejected
