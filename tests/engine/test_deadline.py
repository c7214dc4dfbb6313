"""One deadline per request: made by the front, passed down explicitly, each hop gets the time left."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from bon_gateway.config import GatewayConfig
from bon_gateway.engine.engine import Engine
from bon_gateway.errors import DeadlineExceeded
from bon_gateway.metrics import Metrics
from bon_gateway.retry import GaveUp, RetryPolicy, retry_call
from bon_gateway.types import (
    BonRequest,
    Deadline,
    Message,
    ModelInfo,
    ScoreBatchResult,
    ScoreRequest,
)
from tests.fakes.generator import ScriptedGenerator
from tests.fakes.scorer import FakeScorer

USER = (Message("user", "q"),)
TEXTS = ("text 0", "text 1")


class RecordingScorer(FakeScorer):
    def __init__(self, hang: bool = False) -> None:
        super().__init__(models=("rm",))
        self.hang = hang
        self.deadlines: list[Deadline] = []

    async def score(
        self,
        model: str,
        messages: Sequence[Message],
        candidates: Sequence[str],
        *,
        deadline: Deadline,
        steps: Sequence[Sequence[str]] = (),
        activation: str | None = None,
        request_id: str = "",
    ) -> ScoreBatchResult:
        self.deadlines.append(deadline)
        if self.hang:
            await asyncio.Event().wait()
        return await super().score(model, messages, candidates, deadline=deadline)

    def models(self) -> list[ModelInfo]:
        return [ModelInfo("rm", "reward")]


def engine(generator: ScriptedGenerator, scorer: RecordingScorer) -> Engine:
    config = GatewayConfig.model_validate({"generator": {"url": "http://127.0.0.1:9/v1"}})
    return Engine(config, generator, scorer, Metrics())


async def test_scoring_gets_the_request_deadline_and_generation_a_margin_before_it() -> None:
    generator, scorer = ScriptedGenerator(TEXTS), RecordingScorer()
    gateway = engine(generator, scorer)
    deadline = Deadline.after(20.0)
    await gateway.run(gateway.admit(BonRequest(USER, best_of=2)), deadline)
    assert set(scorer.deadlines) == {deadline}  # the same absolute deadline, not a fresh timeout
    # Generation stops 10 % of the time left (at most 1 s) earlier, leaving time to score.
    assert deadline.at - generator.deadlines[0].at == pytest.approx(1.0, abs=0.01)


async def test_the_engine_alone_enforces_the_deadline_in_generation_and_in_scoring() -> None:
    for generator, scorer in (
        (ScriptedGenerator(TEXTS, hang=True), RecordingScorer()),
        (ScriptedGenerator(TEXTS), RecordingScorer(hang=True)),
    ):
        gateway = engine(generator, scorer)
        with pytest.raises(DeadlineExceeded):
            await gateway.run(gateway.admit(BonRequest(USER, best_of=2)), Deadline.after(0.2))
    gateway = engine(ScriptedGenerator(TEXTS), RecordingScorer(hang=True))
    with pytest.raises(DeadlineExceeded):
        await gateway.score(gateway.admit_score(ScoreRequest(USER, candidates=("a",))), Deadline.after(0.2))


async def test_an_inner_timeout_is_not_reported_as_the_request_deadline() -> None:
    class TimingOutScorer(RecordingScorer):
        async def score(self, *args: object, **kwargs: object) -> ScoreBatchResult:
            raise TimeoutError("something inside timed out")

    gateway = engine(ScriptedGenerator(TEXTS), TimingOutScorer())
    with pytest.raises(TimeoutError):
        await gateway.run(gateway.admit(BonRequest(USER, best_of=1)), Deadline.after(30))


# -- the shared retry loop ------------------------------------------------------------
class Flaky(Exception):
    pass


async def test_retry_call_retries_until_success() -> None:
    tries: list[int] = []

    async def attempt(number: int) -> str:
        tries.append(number)
        if number < 3:
            raise Flaky
        return "ok"

    policy = RetryPolicy(retries=2, base_s=0.0, max_s=0.0)
    assert await retry_call(attempt, policy, retry_after=lambda e: 0.0) == "ok"
    assert tries == [1, 2, 3]


@pytest.mark.parametrize(
    ("retry_after", "deadline_s", "why", "attempts"),
    [
        (lambda e: None, None, "not_retryable", 1),  # the caller says: not worth it
        (lambda e: 0.0, None, "attempts", 3),  # retries spent (2 retries = 3 attempts)
        (lambda e: 5.0, 1.0, "deadline", 1),  # the peer's Retry-After runs past the deadline
    ],
)
async def test_retry_call_gives_up_with_the_last_failure(retry_after, deadline_s, why, attempts) -> None:  # type: ignore[no-untyped-def]
    async def attempt(number: int) -> None:
        raise Flaky(number)

    deadline = None if deadline_s is None else Deadline.after(deadline_s)
    policy = RetryPolicy(retries=2, base_s=0.0, max_s=0.0)
    with pytest.raises(GaveUp) as caught:
        await retry_call(attempt, policy, retry_after=retry_after, deadline=deadline)
    assert caught.value.why == why and caught.value.attempts == attempts
    assert isinstance(caught.value.last, Flaky) and caught.value.last.args == (attempts,)
