"""The engine: generate a round of candidates, score them, decide.

Both fronts (HTTP and gRPC) call the same Engine. It knows nothing about
HTTP, protobuf or torch: the generator and the scorer are injected.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from bon_gateway.config import GatewayConfig
from bon_gateway.engine.admission import Admission, AdmittedBon, AdmittedScore
from bon_gateway.engine.protocols import (
    CandidateGenerator,
    GenerationOutcome,
    OnGenerated,
    OnScored,
    ReadinessListener,
    RewardScorer,
)
from bon_gateway.engine.selection import SelectionResult, select
from bon_gateway.engine.steps import aggregate_steps
from bon_gateway.errors import DeadlineExceeded, Overloaded, Unavailable
from bon_gateway.logs import log_phase
from bon_gateway.metrics import Metrics
from bon_gateway.types import (
    Aggregation,
    BonRequest,
    BonResult,
    CandidateScore,
    Deadline,
    Generation,
    ModelInfo,
    ScoredCandidate,
    ScoreRequest,
    ScoreResult,
    Selection,
    Timings,
    Usage,
)

log = logging.getLogger("bon_gateway.engine")

T = TypeVar("T")

__all__ = ["Engine", "candidate_reward", "new_request_id", "select_candidates"]

# Generation stops a little before the request's deadline (this share of the
# time the request has, at most GENERATION_MARGIN_MAX_S): slow or retried
# candidates are cut while there is still time to score and rank those that
# arrived, so min_candidates can save the request.
GENERATION_MARGIN_SHARE = 0.1
GENERATION_MARGIN_MAX_S = 1.0


def new_request_id() -> str:
    return os.urandom(16).hex()


class Engine:
    """Best-of-N orchestration shared by every front.

    A front converts its wire format into a request, calls `admit` (every check,
    once, before any work) and runs the admitted request under the one
    `Deadline` it made: the engine passes it down to the generator and the
    scorer, and raises DeadlineExceeded when it passes.
    """

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
        self.admission = Admission(config.server, self.reward_model_names)

    # -- models and readiness -------------------------------------------
    def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(self.generator.default_model, "generator"), *self.scorer.models()]

    def reward_model_names(self) -> list[str]:
        return [m.name for m in self.scorer.models()]

    def ready(self) -> bool:
        """Workers loaded and at least one upstream usable (readiness and gRPC health)."""
        return self.scorer.ready() and self.generator.usable()

    def on_readiness_change(self, listener: ReadinessListener) -> None:
        """Call `listener` whenever `ready()` may have changed (workers, upstream ejection)."""
        self.scorer.on_readiness_change(listener)
        self.generator.on_readiness_change(listener)

    # -- admission --------------------------------------------------------
    def admit(self, request: BonRequest) -> AdmittedBon:
        """Check a Best-of-N request (sizes, ranges, roles, reward model); InvalidRequest names the field."""
        return self.admission.admit_bon(request)

    def admit_score(self, request: ScoreRequest) -> AdmittedScore:
        """Check a scoring request; InvalidRequest names the field."""
        return self.admission.admit_score(request)

    # -- best of n ------------------------------------------------------
    async def run(
        self,
        admitted: AdmittedBon,
        deadline: Deadline,
        *,
        on_generated: OnGenerated | None = None,
        on_scored: OnScored | None = None,
    ) -> BonResult:
        """Generate best_of candidates, score them as one group, rank them.

        Everything (upstream calls, retries, scoring) is bounded by `deadline`:
        when it passes, every call in flight is cancelled and DeadlineExceeded raised.
        """
        return await _bounded(deadline, self._run(admitted, deadline, on_generated, on_scored))

    async def _run(
        self,
        admitted: AdmittedBon,
        deadline: Deadline,
        on_generated: OnGenerated | None,
        on_scored: OnScored | None,
    ) -> BonResult:
        request = admitted.request
        reward_model = admitted.reward_model
        request_id = request.request_id or new_request_id()
        started = time.perf_counter()
        margin = min(GENERATION_MARGIN_MAX_S, GENERATION_MARGIN_SHARE * deadline.remaining())
        outcome = await self.generator.generate(request, deadline.earlier(margin), on_generated)
        generated = time.perf_counter()
        generations = self._check_generated(request, outcome)
        self.metrics.child(self.metrics.phase_duration, "generate").observe(generated - started)
        log_phase(log, "generate", id=request_id, candidates=len(generations), seconds=generated - started)

        batch = await self.scorer.score(
            reward_model,
            admitted.scoring_messages,
            [g.text for g in generations],
            deadline=deadline,
            request_id=request_id,
        )
        scored_at = time.perf_counter()
        self.metrics.child(self.metrics.phase_duration, "score").observe(scored_at - generated)
        self.metrics.child(self.metrics.candidates, "scored").inc(len(batch.scores))
        for gen, score in zip(generations, batch.scores, strict=True):
            self.metrics.child(self.metrics.rewards, reward_model).observe(score.reward)
            if on_scored is not None:
                await on_scored(gen.index, score)
        log_phase(log, "score", id=request_id, model=reward_model, seconds=scored_at - generated)

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
        log_phase(log, "select", id=request_id, best=ranked[0].index, seconds=done - scored_at)

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

    def _check_generated(self, request: BonRequest, outcome: GenerationOutcome) -> list[Generation]:
        """The generations, counted; too few for min_candidates is a 503 (504 when the deadline cut them)."""
        generations = outcome.generations
        self.metrics.child(self.metrics.candidates, "generated").inc(len(generations))
        for dropped in outcome.dropped:
            self.metrics.child(self.metrics.candidates, "dropped_" + dropped.reason).inc()
        needed = request.min_candidates or request.best_of
        if len(generations) >= needed:
            return generations
        reasons = "; ".join(sorted({str(d) for d in outcome.dropped})) or "no candidates"
        message = (
            f"only {len(generations)} of {request.best_of} candidates were generated "
            f"(min_candidates {needed}): {reasons}"
        )
        if any(d.reason == "deadline" for d in outcome.dropped):
            raise DeadlineExceeded(message)
        if outcome.dropped and all(d.reason == "rate_limited" for d in outcome.dropped):
            # The generator is shedding load: the client gets a 429 too, told when to come back.
            waits = [d.retry_after_s for d in outcome.dropped if d.retry_after_s is not None]
            raise Overloaded(
                message, retry_after_s=max(waits, default=self.config.server.limits.retry_after_s)
            )
        raise Unavailable(message)

    # -- scoring only ---------------------------------------------------
    async def score(self, admitted: AdmittedScore, deadline: Deadline) -> ScoreResult:
        """Score given answers (no generation); results in input order."""
        return await _bounded(deadline, self._score(admitted, deadline))

    async def _score(self, admitted: AdmittedScore, deadline: Deadline) -> ScoreResult:
        request = admitted.request
        reward_model = admitted.reward_model
        started = time.perf_counter()
        texts = admitted.texts
        batch = await self.scorer.score(
            reward_model,
            request.messages,
            texts,
            deadline=deadline,
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


async def _bounded(deadline: Deadline, work: Coroutine[Any, Any, T]) -> T:
    """`work` under `deadline`: past it, `work` is cancelled and DeadlineExceeded raised."""
    budget = deadline.remaining()
    timeout = asyncio.timeout(budget)
    try:
        async with timeout:
            return await work
    except TimeoutError:
        if not timeout.expired():
            raise  # a timeout of something inside, not this request's deadline
        raise DeadlineExceeded(f"request took longer than {budget:.3g}s (its deadline)") from None


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
