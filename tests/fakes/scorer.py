"""FakeScorer: a deterministic RewardScorer with no model and no torch."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from bon_gateway.engine.protocols import ReadinessListener, RewardScorer, ScoringGroup
from bon_gateway.errors import BonError
from bon_gateway.types import CandidateScore, Deadline, Message, ModelInfo, RawInput, ScoreBatchResult

__all__ = ["FakeGroup", "FakeScorer", "ScoreCall", "words"]


def words(text: str) -> int:
    """The fakes' token count: whitespace-separated words."""
    return len(text.split())


@dataclass(frozen=True, slots=True)
class ScoreCall:
    model: str
    messages: tuple[Message, ...]
    candidates: tuple[str, ...]
    steps: tuple[tuple[str, ...], ...]
    activation: str | None


class FakeScorer:
    """Implements engine.RewardScorer: reward = `rewards[text]` (else `default_reward`).

    Flip `is_ready` to exercise readiness; set `error` to make `score` raise it
    (a worker failure); set `crash` to make it raise an unexpected exception.
    `calls` records every group scored (a group's calls too); `reward_fn` (text -> reward)
    replaces the table for texts it does not list (partial texts, for speculative
    rejection); `open_group` returns a
    FakeGroup, recorded in `groups`; set `open_error` to make its `opened()` raise it
    (a prompt too long for the reward model: InvalidRequest naming `messages`).
    """

    def __init__(
        self,
        rewards: Mapping[str, float] | None = None,
        *,
        models: Sequence[str] = ("fake-rm",),
        default_reward: float = 0.0,
        step_rewards: Mapping[str, Sequence[float]] | None = None,
        ready: bool = True,
        reward_fn: Callable[[str], float] | None = None,
    ) -> None:
        self.reward_fn = reward_fn
        self.groups: list[FakeGroup] = []
        self.rewards = dict(rewards or {})
        self.model_names = tuple(models)
        self.default_reward = default_reward
        self.step_rewards = {k: tuple(v) for k, v in (step_rewards or {}).items()}
        self._ready = ready
        # (loop, listener): readiness listeners run on the loop that registered
        # them, whatever thread the test flips `is_ready` from.
        self._listeners: list[tuple[asyncio.AbstractEventLoop, ReadinessListener]] = []
        self.error: BonError | None = None
        self.crash: Exception | None = None
        self.calls: list[ScoreCall] = []
        self.groups: list[FakeGroup] = []
        self.open_error: BonError | None = None
        self.closed = False

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(name, "reward", "FakeForSequenceClassification") for name in self.model_names]

    def ready(self) -> bool:
        return self._ready

    @property
    def is_ready(self) -> bool:
        return self._ready

    @is_ready.setter
    def is_ready(self, value: bool) -> None:
        self._ready = value
        for loop, listener in self._listeners:
            loop.call_soon_threadsafe(listener)

    def on_readiness_change(self, listener: ReadinessListener) -> None:
        self._listeners.append((asyncio.get_running_loop(), listener))

    def reward(self, text: str, activation: str | None = None) -> float:
        if text in self.rewards or self.reward_fn is None:
            value = self.rewards.get(text, self.default_reward)
        else:
            value = self.reward_fn(text)
        return 1.0 / (1.0 + math.exp(-value)) if activation == "sigmoid" else value

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
        raw: Sequence[RawInput] = (),
        truncate_prompt_tokens: int = 0,
    ) -> ScoreBatchResult:
        if raw:  # scored on their text (token ids as words)
            candidates = [r.text or " ".join(map(str, r.token_ids)) for r in raw]
        self.calls.append(
            ScoreCall(model, tuple(messages), tuple(candidates), tuple(tuple(s) for s in steps), activation)
        )
        if self.crash is not None:
            raise self.crash
        if self.error is not None:
            raise self.error
        prompt_tokens = sum(words(m.content) for m in messages)
        scores = [
            CandidateScore(
                reward=(reward := self.reward(text, activation)),
                step_rewards=self.step_rewards.get(text, ()),
                tokens=prompt_tokens + words(text),
                logits=(reward,),
                labels=1,
            )
            for text in candidates
        ]
        return ScoreBatchResult(
            model=model,
            scores=scores,
            prompt_tokens=prompt_tokens,
            total_tokens=prompt_tokens + sum(words(t) for t in candidates),
        )

    def open_group(
        self, model: str, messages: Sequence[Message], *, deadline: Deadline, request_id: str = ""
    ) -> FakeGroup:
        group = FakeGroup(self, model, tuple(messages), deadline, request_id)
        self.groups.append(group)
        return group

    async def aclose(self) -> None:
        self.closed = True


class FakeGroup:
    """Implements engine.ScoringGroup on a FakeScorer: `score` calls the scorer's own
    `score` with the group's prompt (so `FakeScorer.calls` sees it); `scored` records the
    texts of each call, `closed` whether `close` was called."""

    def __init__(
        self,
        scorer: FakeScorer,
        model: str,
        messages: tuple[Message, ...],
        deadline: Deadline,
        request_id: str,
    ) -> None:
        self.scorer = scorer
        self.model = model
        self.messages = messages
        self.deadline = deadline
        self.request_id = request_id
        self.scored: list[tuple[str, ...]] = []
        self.opened_calls = 0
        self.closed = False

    @property
    def prompt_tokens(self) -> int:
        return sum(words(m.content) for m in self.messages)

    async def opened(self) -> None:
        self.opened_calls += 1
        if self.scorer.open_error is not None:
            raise self.scorer.open_error

    async def score(self, candidates: Sequence[str], *, deadline: Deadline) -> ScoreBatchResult:
        self.scored.append(tuple(candidates))
        return await self.scorer.score(
            self.model, self.messages, candidates, deadline=deadline, request_id=self.request_id
        )

    async def close(self) -> None:
        self.closed = True


def _implements_the_protocols(scorer: FakeScorer, group: FakeGroup) -> tuple[RewardScorer, ScoringGroup]:
    """mypy checks here that the fakes implement the engine's protocols."""
    return scorer, group
