"""Engine.run and Engine.score apply the request's aggregation and selection."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from bon_gateway.config import GatewayConfig
from bon_gateway.engine.engine import Engine
from bon_gateway.metrics import Metrics
from bon_gateway.types import (
    Aggregation,
    BonRequest,
    BonResult,
    Deadline,
    Message,
    ScoreRequest,
    ScoreResult,
    Selection,
)
from tests.fakes.generator import ScriptedGenerator
from tests.fakes.scorer import FakeScorer

# Three PRM-scored solutions: A and B answer 4, C answers 5.
A = "Add.\n\nSo the answer is \\boxed{4}."
B = "Count.\n\nThe answer is 4.0."
C = "Guess.\n\nThe answer is \\boxed{5}."
STEPS = {A: (0.3, 0.9), B: (0.8, 0.5), C: (0.2, 0.95)}
MESSAGES = (Message("user", "What is 2 + 2?"),)


def engine(texts: Sequence[str] = (A, B, C)) -> Engine:
    config = GatewayConfig.model_validate({"generator": {"url": "http://127.0.0.1:9/v1", "model": "fixed"}})
    # The worker's own `reward` (here 0) is ignored when step rewards come back.
    return Engine(config, ScriptedGenerator(texts), FakeScorer(step_rewards=STEPS), Metrics())


async def run(engine: Engine, request: BonRequest) -> BonResult:
    return await engine.run(engine.admit(request), Deadline.after(30))


async def score(engine: Engine, request: ScoreRequest) -> ScoreResult:
    return await engine.score(engine.admit_score(request), Deadline.after(30))


@pytest.mark.parametrize(
    ("aggregation", "selection", "rewards", "selected", "answer", "share"),
    [
        ("last", "argmax", (0.9, 0.5, 0.95), 2, "5", None),
        ("last", "weighted_vote", (0.9, 0.5, 0.95), 0, "4", 2 / 3),  # 1.4 beats 0.95
        ("min", "argmax", (0.3, 0.5, 0.2), 1, "4.0", None),
        ("min", "weighted_vote", (0.3, 0.5, 0.2), 1, "4.0", 2 / 3),
        ("mean", "majority_vote", (0.6, 0.65, 0.575), 1, "4.0", 2 / 3),
        ("prod", "argmax", (0.27, 0.4, 0.19), 1, "4.0", None),
    ],
)
async def test_score_aggregates_steps_then_selects(
    aggregation: Aggregation,
    selection: Selection,
    rewards: tuple[float, ...],
    selected: int,
    answer: str,
    share: float | None,
) -> None:
    request = ScoreRequest(MESSAGES, candidates=(A, B, C), aggregation=aggregation, selection=selection)
    result = await score(engine(), request)
    assert [s.reward for s in result.scores] == pytest.approx(rewards)
    assert [s.step_rewards for s in result.scores] == [STEPS[A], STEPS[B], STEPS[C]]
    assert [s.answer for s in result.scores] == ["4", "4.0", "5"]
    assert [s.index for s in result.scores] == [0, 1, 2]  # input order kept
    assert result.selected_index == selected
    assert result.scores[selected].rank == 1
    assert result.selected_answer == answer
    assert result.vote_share == (None if share is None else pytest.approx(share))


async def test_run_votes_and_reports_the_winning_answer() -> None:
    request = BonRequest(MESSAGES, best_of=3, selection="weighted_vote", aggregation="last")
    result = await run(engine(), request)
    assert [c.index for c in result.ranked] == [0, 1, 2]
    assert [c.rank for c in result.ranked] == [1, 2, 3]
    assert result.ranked[0].reward == pytest.approx(0.9)
    assert result.selected_answer == "4"
    assert result.vote_share == pytest.approx(2 / 3)


async def test_run_argmax_with_an_outcome_reward_model() -> None:
    texts = ("A: 1", "A: 2")
    config = GatewayConfig.model_validate({"generator": {"url": "http://127.0.0.1:9/v1", "model": "fixed"}})
    scorer = FakeScorer({"A: 1": -0.5, "A: 2": 1.5})
    result = await run(
        Engine(config, ScriptedGenerator(texts), scorer, Metrics()),
        BonRequest(MESSAGES, best_of=2, aggregation="min"),
    )
    assert [c.reward for c in result.ranked] == [1.5, -0.5]  # no steps: the score as it is
    assert result.selected_answer == "2"
    assert result.vote_share is None
