"""The engine: generate a round of candidates, score them, decide.

Both fronts (HTTP and gRPC) call the same Engine. It knows nothing about
HTTP, protobuf or torch: the generator and the scorer are injected.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import Protocol

from bon_gateway.config import GatewayConfig
from bon_gateway.engine.selection import SelectionResult, select
from bon_gateway.engine.steps import aggregate_steps
from bon_gateway.errors import DeadlineExceeded, InvalidRequest, Unavailable
from bon_gateway.metrics import Metrics
from bon_gateway.types import (
    Aggregation,
    BonRequest,
    BonResult,
    CandidateScore,
    Generation,
    Message,
    ModelInfo,
    ScoreBatchResult,
    ScoredCandidate,
    ScoreRequest,
    ScoreResult,
    Selection,
    Timings,
    Usage,
)

log = logging.getLogger("bon_gateway.engine")

OnGenerated = Callable[[Generation], Awaitable[None]]
OnScored = Callable[[int, CandidateScore], Awaitable[None]]

# The absolute deadline (time.monotonic()) of the request being run, set by
# Engine.run: the generator bounds its retries and backoff waits by it. A
# context variable so that generators written against the plain protocol
# (tests' fakes) need not take it.
request_deadline: ContextVar[float | None] = ContextVar("bon_request_deadline", default=None)


class GenerationOutcome(Protocol):
    generations: list[Generation]
    dropped: list[str]


class CandidateGenerator(Protocol):
    """Gets N candidates from the upstream generator."""

    @property
    def default_model(self) -> str: ...

    def usable(self) -> bool:
        """False when no upstream can take a call now (all ejected after failures)."""
        ...

    async def generate(
        self, request: BonRequest, on_generated: OnGenerated | None = None
    ) -> GenerationOutcome: ...

    async def aclose(self) -> None: ...


class RewardScorer(Protocol):
    """Scores one group of candidates sharing a prompt on the worker pool."""

    def models(self) -> list[ModelInfo]: ...

    def ready(self) -> bool: ...

    async def score(
        self,
        model: str,
        messages: Sequence[Message],
        candidates: Sequence[str],
        *,
        steps: Sequence[Sequence[str]] = (),
        activation: str | None = None,
        request_id: str = "",
    ) -> ScoreBatchResult: ...

    async def aclose(self) -> None: ...


def new_request_id() -> str:
    return os.urandom(16).hex()


class Engine:
    """Best-of-N orchestration shared by every front."""

    def __init__(
        self,
        config: GatewayConfig,
        generator: CandidateGenerator,
        scorer: RewardScorer,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.generator = generator
        self.scorer = scorer
        self.metrics = metrics

    # -- models ---------------------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(self.generator.default_model, "generator"), *self.scorer.models()]

    def reward_model_names(self) -> list[str]:
        return [m.name for m in self.scorer.models()]

    def resolve_reward_model(self, name: str | None, *, param: str = "reward_model") -> str:
        """The reward model a request uses; unknown or ambiguous names are a 400."""
        names = self.reward_model_names()
        if name:
            if name not in names:
                raise InvalidRequest(
                    f"unknown {param} {name!r}; available: {', '.join(names) or 'none'}", param=param
                )
            return name
        if not names:
            raise Unavailable("no reward model is configured")
        return names[0]

    def ready(self) -> bool:
        """Workers loaded and at least one upstream usable (readiness and gRPC health)."""
        return self.scorer.ready() and self.generator.usable()

    # -- best of n ------------------------------------------------------
    async def run(
        self,
        request: BonRequest,
        *,
        on_generated: OnGenerated | None = None,
        on_scored: OnScored | None = None,
        timeout_s: float | None = None,
    ) -> BonResult:
        """Generate best_of candidates, score them as one group, rank them.

        With `timeout_s`, the whole request (upstream calls, retries, scoring) is
        bounded: when it passes, every call in flight is cancelled and
        DeadlineExceeded raised.
        """
        if timeout_s is None:
            return await self._run(request, on_generated, on_scored)
        # Generation stops a little before the hard deadline (10 %, at most 1 s):
        # slow or retried candidates are cut while there is still time to score
        # and rank those that arrived, so min_candidates can save the request.
        token = request_deadline.set(time.monotonic() + timeout_s - min(1.0, 0.1 * timeout_s))
        try:
            async with asyncio.timeout(timeout_s):
                return await self._run(request, on_generated, on_scored)
        except TimeoutError:
            raise DeadlineExceeded(f"request took longer than {timeout_s:g}s") from None
        finally:
            request_deadline.reset(token)

    async def _run(
        self, request: BonRequest, on_generated: OnGenerated | None, on_scored: OnScored | None
    ) -> BonResult:
        self.validate(request)
        reward_model = self.resolve_reward_model(request.reward_model)
        request_id = request.request_id or new_request_id()
        started = time.perf_counter()

        outcome = await self.generator.generate(request, on_generated)
        generated = time.perf_counter()
        self.metrics.child(self.metrics.phase_duration, "generate").observe(generated - started)
        generations = outcome.generations
        self.metrics.child(self.metrics.candidates, "generated").inc(len(generations))
        for reason in outcome.dropped:
            self.metrics.child(self.metrics.candidates, "dropped_" + reason.split(":", 1)[0]).inc()
        needed = request.min_candidates or request.best_of
        if len(generations) < needed:
            reasons = "; ".join(sorted(set(outcome.dropped))) or "no candidates"
            message = (
                f"only {len(generations)} of {request.best_of} candidates were generated "
                f"(min_candidates {needed}): {reasons}"
            )
            if any(reason.startswith("deadline") for reason in outcome.dropped):
                raise DeadlineExceeded(message)
            raise Unavailable(message)
        log.info(
            "phase=generate id=%s candidates=%d seconds=%.3f",
            request_id,
            len(generations),
            generated - started,
        )

        batch = await self.scorer.score(
            reward_model,
            self._scoring_messages(request),
            [g.text for g in generations],
            request_id=request_id,
        )
        scored_at = time.perf_counter()
        self.metrics.child(self.metrics.phase_duration, "score").observe(scored_at - generated)
        self.metrics.child(self.metrics.candidates, "scored").inc(len(batch.scores))
        for gen, score in zip(generations, batch.scores, strict=True):
            self.metrics.child(self.metrics.rewards, reward_model).observe(score.reward)
            if on_scored is not None:
                await on_scored(gen.index, score)
        log.info("phase=score id=%s model=%s seconds=%.3f", request_id, reward_model, scored_at - generated)

        candidates = [
            ScoredCandidate(
                index=gen.index,
                text=gen.text,
                reward=candidate_reward(score, request.aggregation),
                step_rewards=score.step_rewards,
                finish_reason=gen.finish_reason,
            )
            for gen, score in zip(generations, batch.scores, strict=True)
        ]
        selection = await select_candidates(candidates, request.selection)
        ranked = selection.ranked
        done = time.perf_counter()
        self.metrics.child(self.metrics.phase_duration, "select").observe(done - scored_at)
        log.info("phase=select id=%s best=%d seconds=%.4f", request_id, ranked[0].index, done - scored_at)

        usage = Usage(
            prompt_tokens=max((g.prompt_tokens for g in generations), default=0),
            completion_tokens=sum(g.completion_tokens for g in generations),
            candidates_generated=len(generations),
        )
        timings = Timings(generated - started, scored_at - generated, done - scored_at, done - started)
        return BonResult(
            id=request_id,
            model=request.model or self.generator.default_model,
            reward_model=reward_model,
            ranked=ranked,
            usage=usage,
            timings=timings,
            dropped=list(outcome.dropped),
            selected_answer=selection.selected_answer,
            vote_share=selection.vote_share,
        )

    def validate(self, request: BonRequest) -> None:
        """Checks shared by both fronts (the schemas check types and shapes)."""
        max_best_of = self.config.server.max_best_of
        if not 1 <= request.best_of <= max_best_of:
            raise InvalidRequest(f"best_of must be between 1 and {max_best_of}", param="best_of")
        if not 1 <= request.n <= request.best_of:
            raise InvalidRequest("n must be between 1 and best_of", param="n")
        if request.min_candidates is not None and not 1 <= request.min_candidates <= request.best_of:
            raise InvalidRequest("min_candidates must be between 1 and best_of", param="min_candidates")
        if request.prompt is None:
            validate_messages(request.messages)

    @staticmethod
    def _scoring_messages(request: BonRequest) -> tuple[Message, ...]:
        if request.prompt is not None:
            return (Message("user", request.prompt),)
        return request.messages

    # -- scoring only ---------------------------------------------------
    async def score(self, request: ScoreRequest) -> ScoreResult:
        """Score given answers (no generation); results in input order."""
        validate_messages(request.messages)
        if not request.candidates and not request.steps:
            raise InvalidRequest("candidates must be a non-empty list", param="candidates")
        if request.candidates and request.steps:
            raise InvalidRequest("give either candidates or steps, not both", param="steps")
        reward_model = self.resolve_reward_model(request.reward_model, param="model")
        started = time.perf_counter()
        texts = list(request.candidates) or ["".join(s) for s in request.steps]
        batch = await self.scorer.score(
            reward_model,
            request.messages,
            texts,
            steps=request.steps,
            activation=request.activation,
            request_id=request.request_id or new_request_id(),
        )
        self.metrics.child(self.metrics.phase_duration, "score").observe(time.perf_counter() - started)
        scored = [
            ScoredCandidate(
                index=i,
                text=text,
                reward=candidate_reward(s, request.aggregation),
                step_rewards=s.step_rewards,
            )
            for i, (text, s) in enumerate(zip(texts, batch.scores, strict=True))
        ]
        for s in batch.scores:
            self.metrics.child(self.metrics.rewards, reward_model).observe(s.reward)
        # Sets each item's answer and rank; `scored` itself stays in input order.
        selection = await select_candidates(scored, request.selection)
        return ScoreResult(
            model=reward_model,
            scores=scored,
            prompt_tokens=batch.prompt_tokens,
            total_tokens=batch.total_tokens,
            selected_index=selection.selected.index,
            selected_answer=selection.selected_answer,
            vote_share=selection.vote_share,
        )

    async def aclose(self) -> None:
        await self.generator.aclose()
        await self.scorer.aclose()


def candidate_reward(score: CandidateScore, aggregation: Aggregation) -> float:
    """A PRM candidate's reward is its aggregated step rewards; an outcome RM's is its score."""
    if score.step_rewards:
        return aggregate_steps(score.step_rewards, aggregation)
    return score.reward


async def select_candidates(candidates: Sequence[ScoredCandidate], selection: Selection) -> SelectionResult:
    """Rank candidates; votes run off the event loop (math-verify's sympy can take milliseconds)."""
    if selection == "argmax":
        return select(candidates, selection)
    return await asyncio.to_thread(select, candidates, selection)


def validate_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise InvalidRequest("messages must be a non-empty list", param="messages")
    for i, message in enumerate(messages):
        if not message.role:
            raise InvalidRequest(f"messages[{i}].role is required", param=f"messages[{i}].role")
        if message.role not in ("system", "user", "assistant", "developer", "tool"):
            raise InvalidRequest(
                f"messages[{i}].role must be system, user, assistant, developer or tool",
                param=f"messages[{i}].role",
            )

        if message.content is None:
            raise InvalidRequest(f"messages[{i}].content is required", param=f"messages[{i}].content")
