"""The engine's search loop against an independent reference implementation of
speculative rejection by rounds (`[strategy] rejection = "round"`), on a
deterministic fake generator (tests/fakes/generator.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bon_gateway.config import GatewayConfig
from bon_gateway.engine.engine import Engine
from bon_gateway.errors import InvalidRequest
from bon_gateway.metrics import Metrics
from bon_gateway.types import BonRequest, BonResult, Deadline, SamplingParams
from tests.fakes.generator import ScriptedGenerator
from tests.fakes.scorer import FakeScorer
from tests.fakes.sse import tokens_of
from tests.fakes.word_verifier import TEXTS, USER, WEIGHTS, reward


@dataclass(frozen=True)
class Expected:
    rounds: list[tuple[int, dict[int, float], list[int]]]  # checkpoint, judged rewards, rejected
    winner: int
    finished: set[int]


def reference(texts: Sequence[str], rate: float, checkpoints: Sequence[int], keep: int) -> Expected:
    """Speculative rejection written out plainly (Sun et al. 2024), on whole token lists.

    At checkpoint c every candidate still in the race is judged on its first c
    tokens, or on its whole text when it is shorter; the floor(rate * race) lowest
    are rejected (ties: the later candidate first), never leaving fewer than `keep`.
    Rounds stop once no candidate in the race reaches the checkpoint.
    """
    tokens = [tokens_of(t) for t in texts]
    race = list(range(len(texts)))
    rounds = []
    for c in checkpoints:
        if not any(len(tokens[i]) >= c for i in race):
            break
        judged = {i: reward("".join(tokens[i][:c])) for i in race}
        count = min(int(rate * len(race) + 1e-9), len(race) - max(1, keep))
        lowest_first = sorted(race, key=lambda i: (judged[i], -i))
        rejected = sorted(lowest_first[: max(0, count)])
        race = [i for i in race if i not in rejected]
        rounds.append((c, judged, rejected))
    winner = max(race, key=lambda i: (reward(texts[i]), -i))
    return Expected(rounds, winner, set(race))


def engine(texts: Sequence[str], **strategy: object) -> tuple[Engine, ScriptedGenerator, FakeScorer]:
    # These tests pin the round rule (tests/engine/test_per_candidate.py: the default).
    config = GatewayConfig.model_validate(
        {
            "generator": {"url": "http://127.0.0.1:9/v1", "model": "scripted"},
            "strategy": {"rejection": "round", **strategy},
        }
    )
    generator = ScriptedGenerator(texts)
    scorer = FakeScorer(reward_fn=reward)
    return Engine(config, generator, scorer, Metrics()), generator, scorer


async def run(gateway: Engine, request: BonRequest) -> BonResult:
    return await gateway.run(gateway.admit(request), Deadline.after(30))


def request(best_of: int, **fields: object) -> BonRequest:
    return BonRequest(USER, best_of=best_of, strategy="speculative_rejection", **fields)  # type: ignore[arg-type]


def check(result: BonResult, expected: Expected, texts: Sequence[str]) -> None:
    assert [(r.tokens, sorted(r.rejected)) for r in result.checkpoints] == [
        (c, rejected) for c, _, rejected in expected.rounds
    ]
    for report, (_, judged, _) in zip(result.checkpoints, expected.rounds, strict=True):
        assert dict(report.rewards) == pytest.approx(judged)
    assert result.ranked[0].index == expected.winner
    assert {c.index for c in result.ranked} == expected.finished
    assert {r.index for r in result.rejected} == set(range(len(texts))) - expected.finished


async def test_rejection_matches_the_reference_step_by_step() -> None:
    gateway, generator, _ = engine(TEXTS)
    result = await run(gateway, request(6, rejection_rate=0.5, checkpoints=(2, 6)))
    check(result, reference(TEXTS, 0.5, (2, 6), keep=1), TEXTS)
    # The rejected stopped near their checkpoint: their streams were cancelled.
    run_ = generator.runs[0]
    for rejected in result.rejected:
        assert rejected.index in run_.cancelled or rejected.tokens == len(tokens_of(TEXTS[rejected.index]))
        assert run_.sent[rejected.index] <= rejected.checkpoint + 2
    # The rejected are listed with their text so far and the reward that sank them.
    first = result.checkpoints[0]
    for r in result.rejected:
        if r.checkpoint == 2:
            assert r.text == "".join(tokens_of(TEXTS[r.index])[:2])
            assert r.reward == pytest.approx(dict(first.rewards)[r.index])


async def test_best_of_n_rejects_nothing_and_scores_every_candidate_once() -> None:
    gateway, _, scorer = engine(TEXTS)
    result = await run(gateway, BonRequest(USER, best_of=6))
    assert result.rejected == [] and result.checkpoints == []
    assert result.ranked[0].index == max(range(6), key=lambda i: reward(TEXTS[i]))
    group = scorer.groups[0]
    assert sorted(t for call in group.scored for t in call) == sorted(TEXTS)  # each whole text once
    assert group.closed


async def test_keep_n_candidates_for_n_choices() -> None:
    gateway, _, _ = engine(TEXTS)
    result = await run(gateway, request(6, n=4, rejection_rate=0.9, checkpoints=(2, 3, 4)))
    assert len(result.ranked) >= 4
    check(result, reference(TEXTS, 0.9, (2, 3, 4), keep=4), TEXTS)


async def test_config_defaults_and_bad_fields() -> None:
    gateway, _, _ = engine(TEXTS, default="speculative_rejection", rejection_rate=0.5, checkpoints=[3])
    result = await run(gateway, BonRequest(USER, best_of=6))
    check(result, reference(TEXTS, 0.5, (3,), keep=1), TEXTS)
    for fields, param in (
        ({"rejection_rate": 1.0}, "rejection_rate"),
        ({"rejection_rate": 0.0}, "rejection_rate"),
        ({"checkpoints": (8, 4)}, "checkpoints"),
        ({"checkpoints": (0,)}, "checkpoints"),
    ):
        with pytest.raises(InvalidRequest) as caught:
            gateway.admit(request(4, **fields))
        assert caught.value.param == param
    with pytest.raises(InvalidRequest) as caught:
        gateway.admit(BonRequest(USER, best_of=4, strategy="best_of_n", rejection_rate=0.5))
    assert caught.value.param == "rejection_rate"


async def test_checkpoints_past_max_tokens_are_dropped() -> None:
    gateway, _, _ = engine(TEXTS)
    admitted = gateway.admit(request(4, checkpoints=(2, 6, 64), sampling=SamplingParams(max_tokens=8)))
    assert admitted.plan.checkpoints == (2, 6)


async def test_the_only_candidate_left_streams_its_text() -> None:
    gateway, _, _ = engine(TEXTS)
    pieces: list[tuple[int, str]] = []

    async def on_winner_text(index: int, delta: str) -> None:
        pieces.append((index, delta))

    admitted = gateway.admit(request(6, rejection_rate=0.9, checkpoints=(2,)))
    result = await gateway.run(admitted, Deadline.after(30), on_winner_text=on_winner_text)
    assert len(result.ranked) == 1
    winner = result.ranked[0]
    assert {i for i, _ in pieces} == {winner.index}
    assert "".join(d for _, d in pieces) == winner.text  # everything, once, in order
    assert len(pieces) > 1  # as it grew, not in one piece at the end


async def test_a_failed_stream_leaves_the_race_and_min_candidates_holds() -> None:
    config = GatewayConfig.model_validate(
        {"generator": {"url": "http://127.0.0.1:9/v1"}, "strategy": {"rejection": "round"}}
    )
    generator = ScriptedGenerator(TEXTS, fail={1: 3, 4: 1})
    gateway = Engine(config, generator, FakeScorer(reward_fn=reward), Metrics())
    result = await run(gateway, request(6, rejection_rate=0.5, checkpoints=(2, 6), min_candidates=4))
    assert [d.reason for d in result.dropped] == ["connect_error", "connect_error"]
    assert {1, 4}.isdisjoint({c.index for c in result.ranked} | {r.index for r in result.rejected})
    with pytest.raises(Exception, match="min_candidates 6"):
        await run(gateway, request(6, rejection_rate=0.5, checkpoints=(2, 6)))


words = st.sampled_from(sorted(WEIGHTS))
texts_strategy = st.lists(st.lists(words, min_size=1, max_size=12).map(" ".join), min_size=1, max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    texts=texts_strategy,
    rate=st.sampled_from([0.25, 0.5, 0.75]),
    checkpoints=st.lists(st.integers(1, 12), min_size=1, max_size=4, unique=True).map(sorted),
    keep=st.integers(1, 3),
)
async def test_any_race_matches_the_reference(
    texts: list[str], rate: float, checkpoints: list[int], keep: int
) -> None:
    keep = min(keep, len(texts))
    gateway, _, _ = engine(texts)
    result = await run(
        gateway, request(len(texts), n=keep, rejection_rate=rate, checkpoints=tuple(checkpoints))
    )
    expected = reference(texts, rate, checkpoints, keep)
    check(result, expected, texts)
    assert not math.isnan(result.ranked[0].reward)
