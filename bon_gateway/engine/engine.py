"""The engine: generate a round of candidates, score them, decide.

Both fronts (HTTP and gRPC) call the same Engine. It knows nothing about
HTTP, protobuf or torch: the generator and the scorer are injected.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from bon_gateway.config import GatewayConfig
from bon_gateway.engine.admission import Admission, AdmittedBon, AdmittedScore
from bon_gateway.engine.protocols import (
    CandidateGenerator,
    OnGenerated,
    OnScored,
    ReadinessListener,
    RewardScorer,
)
from bon_gateway.engine.search import Callbacks, OnCheckpoint, OnWinnerText, SearchOutcome, search
from bon_gateway.engine.selection import SelectionResult, select
from bon_gateway.engine.steps import aggregate_steps
from bon_gateway.errors import DeadlineExceeded, InvalidRequest, Overloaded, Unavailable
from bon_gateway.logs import log_phase
from bon_gateway.metrics import Metrics
from bon_gateway.types import (
    Aggregation,
    BonRequest,
    BonResult,
    CandidateScore,
    Deadline,
    ModelInfo,
    ScoredCandidate,
    ScoreRequest,
    ScoreResult,
    Selection,
    Timings,
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
        self.admission = Admission(config.server, self.reward_model_names, config.strategy)

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
        on_checkpoint: OnCheckpoint | None = None,
        on_winner_text: OnWinnerText | None = None,
        on_opened: Callable[[], None] | None = None,
    ) -> BonResult:
        """Generate the candidates, score each as it finishes, rank them.

        Everything (upstream streams, retries, scoring) is bounded by `deadline`:
        when it passes, every call in flight is cancelled and DeadlineExceeded
        raised. `on_winner_text` receives the text of the only candidate left in
        the race, as it streams (speculative rejection, or best_of 1). `on_opened`
        is called once the reward model has taken the prompt, just before the
        first upstream call: what fails before it is the request's own fault
        (a streaming front can still answer it with a plain 400).
        """
        callbacks = Callbacks(on_generated, on_scored, on_checkpoint, on_winner_text)
        return await _bounded(deadline, self._run(admitted, deadline, callbacks, on_opened))

    async def _run(
        self,
        admitted: AdmittedBon,
        deadline: Deadline,
        callbacks: Callbacks,
        on_opened: Callable[[], None] | None = None,
    ) -> BonResult:
        request = admitted.request
        reward_model = admitted.reward_model
        plan = admitted.plan
        request_id = request.request_id or new_request_id()
        started = time.perf_counter()
        # The prompt goes to its worker now: it is computed while the candidates are generated.
        group = self.scorer.open_group(
            reward_model, admitted.scoring_messages, deadline=deadline, request_id=request_id
        )
        try:
            # A prompt the reward model cannot take fails here, before anything is generated.
            try:
                await group.opened()
            except InvalidRequest as err:
                if request.prompt is None or err.param != "messages":
                    raise
                # The reward model read the plain prompt as one user turn: name the client's field.
                message = err.message.removeprefix("messages")
                raise InvalidRequest(
                    "prompt" + message if message != err.message else err.message, param="prompt"
                ) from None
            if on_opened is not None:
                on_opened()
            margin = min(GENERATION_MARGIN_MAX_S, GENERATION_MARGIN_SHARE * deadline.remaining())
            progress = bool(plan.checkpoints) or callbacks.on_winner_text is not None
            run = self.generator.stream(
                request, deadline.earlier(margin), progress=progress, progress_every=plan.prefill_every
            )
            try:
                outcome = await search(
                    request.best_of,
                    plan,
                    run,
                    group,
                    deadline,
                    callbacks,
                    lambda score: candidate_reward(score, request.aggregation),
                )
            finally:
                await run.aclose()
        finally:
            await group.close()
        self._record(reward_model, outcome)
        self._check_survivors(request, outcome)
        log_phase(
            log,
            "generate",
            id=request_id,
            candidates=len(outcome.finished),
            rejected=len(outcome.rejected),
            tokens=outcome.usage.completion_tokens,
            seconds=outcome.generate_seconds,
        )
        log_phase(log, "score", id=request_id, model=reward_model, seconds=outcome.score_seconds)
        scored_at = time.perf_counter()
        candidates = [
            ScoredCandidate(
                index=gen.index,
                text=gen.text,
                reward=candidate_reward(score, request.aggregation),
                step_rewards=score.step_rewards,
                finish_reason=gen.finish_reason,
                tokens=gen.completion_tokens,
                tool_calls=gen.tool_calls,
                logprobs=gen.logprobs,
            )
            for gen, score in sorted(outcome.finished, key=lambda pair: pair[0].index)
        ]
        selection = await select_candidates(candidates, request.selection)
        ranked = selection.ranked
        done = time.perf_counter()
        self.metrics.child(self.metrics.phase_duration, "select").observe(done - scored_at)
        log_phase(log, "select", id=request_id, best=ranked[0].index, seconds=done - scored_at)
        timings = Timings(outcome.generate_seconds, outcome.score_seconds, done - scored_at, done - started)
        return BonResult(
            id=request_id,
            model=request.model or self.generator.default_model,
            reward_model=reward_model,
            ranked=ranked,
            usage=outcome.usage,
            timings=timings,
            dropped=outcome.dropped,
            selected_answer=selection.selected_answer,
            vote_share=selection.vote_share,
            rejected=outcome.rejected,
            checkpoints=outcome.checkpoints,
        )

    def _record(self, reward_model: str, outcome: SearchOutcome) -> None:
        metrics = self.metrics
        metrics.child(metrics.phase_duration, "generate").observe(outcome.generate_seconds)
        metrics.child(metrics.phase_duration, "score").observe(outcome.score_seconds)
        metrics.child(metrics.candidates, "generated").inc(len(outcome.finished))
        metrics.child(metrics.candidates, "scored").inc(len(outcome.finished))
        for dropped in outcome.dropped:
            metrics.child(metrics.candidates, "dropped_" + dropped.reason).inc()
        for _, score in outcome.finished:
            metrics.child(metrics.rewards, reward_model).observe(score.reward)
        if outcome.rejected:
            metrics.child(metrics.candidates, "rejected").inc(len(outcome.rejected))
            lengths = [gen.completion_tokens for gen, _ in outcome.finished]
            typical = sum(lengths) / len(lengths) if lengths else 0.0
            # What the rejected would have cost had they run as long as the finished ones did.
            avoided = sum(max(0.0, typical - r.tokens) for r in outcome.rejected)
            metrics.rejection_tokens_avoided.inc(avoided)
        for report in outcome.checkpoints:
            metrics.child(metrics.phase_duration, "checkpoint").observe(report.seconds)
        metrics.generated_tokens.observe(outcome.usage.completion_tokens)

    def _check_survivors(self, request: BonRequest, outcome: SearchOutcome) -> None:
        """Too few candidates made it (min_candidates) is a 503 (504 when the deadline cut
        them, 429 when the generator shed them); rejected ones count as made."""
        made = len(outcome.finished) + len(outcome.rejected)
        needed = request.min_candidates or request.best_of
        if made >= needed and outcome.finished:
            return
        dropped = outcome.dropped
        reasons = "; ".join(sorted({str(d) for d in dropped})) or "no candidates"
        message = (
            f"only {made} of {request.best_of} candidates were generated (min_candidates {needed}): {reasons}"
        )
        if any(d.reason == "deadline" for d in dropped):
            raise DeadlineExceeded(message)
        if dropped and all(d.reason == "rate_limited" for d in dropped):
            # The generator is shedding load: the client gets a 429 too, told when to come back.
            waits = [d.retry_after_s for d in dropped if d.retry_after_s is not None]
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
        # Raw inputs (the RLHF routes) only when there are some: scorers written before them
        # (test doubles, other backends) keep working for everything else.
        raw_kwargs: dict[str, Any] = (
            {"raw": request.raw, "truncate_prompt_tokens": request.truncate_prompt_tokens}
            if request.raw
            else {}
        )
        batch = await self.scorer.score(
            reward_model,
            request.messages,
            texts,
            deadline=deadline,
            steps=request.steps,
            activation=request.activation,
            request_id=request.request_id or new_request_id(),
            **raw_kwargs,
        )
        self.metrics.child(self.metrics.phase_duration, "score").observe(time.perf_counter() - started)
        scored = [
            ScoredCandidate(
                index=i,
                text=text,
                reward=candidate_reward(s, request.aggregation),
                step_rewards=s.step_rewards,
                tokens=s.tokens,
                logits=s.logits,
                labels=s.labels,
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
