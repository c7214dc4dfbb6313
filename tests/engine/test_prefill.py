"""Texts sent ahead (`[strategy] prefill_every`, best-of-N): live candidates' texts go to
the scoring group every k new tokens while they are generated, in calls of bounded size,
one at a time and only while the request's own scoring is idle; a candidate that finishes
while its text is on the way waits for that call; a failed call changes nothing. The
ranking is the same as without it (tests/scoring/test_pool_groups.py: exact rewards and
the reuse of a candidate's earlier text on real workers)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from bon_gateway.config import GatewayConfig
from bon_gateway.engine.engine import Engine
from bon_gateway.errors import Unavailable
from bon_gateway.metrics import Metrics
from bon_gateway.types import BonRequest, BonResult, Deadline, Message, ScoreBatchResult
from tests.fakes.generator import ScriptedGenerator
from tests.fakes.scorer import FakeGroup, FakeScorer, words
from tests.fakes.word_verifier import USER


def texts(lengths: Sequence[int]) -> list[str]:
    return [" ".join(f"c{i}w{j}" for j in range(n)) for i, n in enumerate(lengths)]


def engine(scorer: FakeScorer, candidates: Sequence[str], prefill_every: int) -> Engine:
    config = GatewayConfig.model_validate(
        {
            "generator": {"url": "http://127.0.0.1:9/v1", "model": "scripted"},
            "strategy": {"prefill_every": prefill_every},
        }
    )
    return Engine(config, ScriptedGenerator(candidates), scorer, Metrics())


async def run(gateway: Engine, best_of: int) -> BonResult:
    return await gateway.run(gateway.admit(BonRequest(USER, best_of=best_of)), Deadline.after(30))


def split(calls: Sequence[tuple[str, ...]], finals: Sequence[str]) -> tuple[list[tuple[str, ...]], list[str]]:
    """The calls that carried partial texts (sent ahead), and the whole texts scored."""
    ahead = [call for call in calls if not set(call) & set(finals)]
    scored = [text for call in calls for text in call if text in finals]
    return ahead, scored


async def test_texts_go_ahead_every_k_tokens_and_the_ranking_is_unchanged() -> None:
    candidates = texts([10, 17, 25, 9])
    rewards = {t: float(i % 3) - i / 10 for i, t in enumerate(candidates)}
    results = {}
    groups: dict[int, FakeGroup] = {}
    for every in (0, 4):
        scorer = FakeScorer(rewards, default_reward=-9.0)
        results[every] = await run(engine(scorer, candidates, every), 4)
        groups[every] = scorer.groups[0]
    ranked = [[(c.index, c.reward) for c in results[every].ranked] for every in (0, 4)]
    assert ranked[0] == ranked[1]
    for every, group in groups.items():
        ahead, scored = split(group.scored, candidates)
        assert sorted(scored) == sorted(candidates)  # each whole text once
        if every == 0:
            assert ahead == []
            continue
        sent = [text for call in ahead for text in call]
        assert sent, "nothing was sent ahead"
        for text in sent:  # live prefixes at multiples of k tokens, shorter than the whole
            owner = next(c for c in candidates if c.startswith(text + " "))
            assert words(text) % every == 0 and words(text) < words(owner)
        assert group.closed


async def test_calls_ahead_are_bounded_and_each_text_grows_between_them() -> None:
    candidates = texts([30] * 8)
    scorer = FakeScorer(default_reward=0.0)
    await run(engine(scorer, candidates, 2), 8)
    ahead, _ = split(scorer.groups[0].scored, candidates)
    last_sent: dict[str, int] = {}
    several = 0
    for call in ahead:
        grown = 0
        for text in call:
            owner = text.split(" ")[0][:2]  # "c3w0 ..." -> "c3"
            grown += words(text) - last_sent.get(owner, 0)
            assert words(text) - last_sent.get(owner, 0) >= 2
            last_sent[owner] = words(text)
        assert len(call) == 1 or grown <= 4 * 2, call
        several += len(call) > 1
    assert several, "no call carried more than one text: the bound was not exercised"
    assert max(last_sent.values()) > 2  # texts were sent more than once


class _SlowAheadScorer(FakeScorer):
    """Calls with partial texts take `delay_s`; the log records when each call starts and ends."""

    def __init__(self, finals: Sequence[str], delay_s: float, fail_ahead: bool = False) -> None:
        super().__init__(default_reward=0.0)
        self.finals = set(finals)
        self.delay_s = delay_s
        self.fail_ahead = fail_ahead
        self.log: list[tuple[str, tuple[str, ...]]] = []

    async def score(
        self, model: str, messages: Sequence[Message], candidates: Sequence[str], **kwargs: Any
    ) -> ScoreBatchResult:
        self.log.append(("start", tuple(candidates)))
        if not self.finals & set(candidates):
            await asyncio.sleep(self.delay_s)
            if self.fail_ahead:
                self.log.append(("end", tuple(candidates)))
                raise Unavailable("the worker went away")
        result = await super().score(model, messages, candidates, **kwargs)
        self.log.append(("end", tuple(candidates)))
        return result


async def test_a_candidate_finishing_while_its_text_is_on_the_way_waits_for_that_call() -> None:
    # Candidate 0 is sent ahead at 4 words and finishes at 5, while that call still runs.
    candidates = texts([5, 40])
    scorer = _SlowAheadScorer(candidates, delay_s=0.2)
    gateway = engine(scorer, candidates, 4)
    gateway.generator.step_s = 0.005  # type: ignore[attr-defined]
    result = await run(gateway, 2)
    assert sorted(c.index for c in result.ranked) == [0, 1]
    log = scorer.log
    ahead_end = next(
        i for i, (what, call) in enumerate(log) if what == "end" and any(t.startswith("c0w0") for t in call)
    )
    final_start = next(i for i, (what, call) in enumerate(log) if what == "start" and candidates[0] in call)
    assert final_start > ahead_end, log


async def test_a_failed_call_ahead_changes_nothing() -> None:
    candidates = texts([12, 9, 14])
    scorer = _SlowAheadScorer(candidates, delay_s=0.0, fail_ahead=True)
    gateway = engine(scorer, candidates, 4)
    gateway.generator.step_s = 0.002  # type: ignore[attr-defined]
    result = await run(gateway, 3)
    assert sorted(c.index for c in result.ranked) == [0, 1, 2]
    assert result.dropped == []
    assert any(what == "end" and not set(call) & set(candidates) for what, call in scorer.log)


async def test_no_texts_go_ahead_with_checkpoints() -> None:
    # Checkpoints score partial texts already (and reuse them): nothing else is sent ahead.
    candidates = texts([20, 20])
    scorer = FakeScorer(default_reward=0.0)
    gateway = engine(scorer, candidates, 2)
    request = BonRequest(USER, best_of=2, strategy="speculative_rejection", checkpoints=(8,))
    await gateway.run(gateway.admit(request), Deadline.after(30))
    sizes = {words(t) for call in scorer.groups[0].scored for t in call if t not in candidates}
    assert sizes == {8}
