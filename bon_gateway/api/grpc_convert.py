"""protobuf <-> engine types for the BestOfN gRPC service.

proto3 has no "unset" for scalars, so the zero value means "default" (0 for
best_of, "" for names), exactly as the .proto comments promise. Values the
schema cannot check (enum-like strings) are checked here with the field named.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

from bon_gateway.errors import InvalidRequest
from bon_gateway.types import (
    ACTIVATIONS,
    AGGREGATIONS,
    SELECTIONS,
    STRATEGIES,
    Activation,
    Aggregation,
    BonRequest,
    BonResult,
    CandidateScore,
    CheckpointReport,
    Generation,
    Message,
    ModelInfo,
    SamplingParams,
    ScoredCandidate,
    ScoreRequest,
    ScoreResult,
    Selection,
    Strategy,
)
from bon_gateway.v1 import best_of_n_pb2 as pb

__all__ = [
    "bon_request_from_proto",
    "checkpoint_event",
    "generate_response",
    "generated_event",
    "grpc_param",
    "list_models_response",
    "score_request_from_proto",
    "score_response",
    "scored_event",
]


def _choice(value: str, allowed: tuple[str, ...], default: str, param: str) -> str:
    if not value:
        return default
    if value not in allowed:
        raise InvalidRequest(f"{param} must be one of {', '.join(allowed)}, got {value!r}", param=param)
    return value


def _messages(messages: Iterable[pb.ChatMessage]) -> tuple[Message, ...]:
    return tuple(Message(m.role, m.content) for m in messages)


# Admission names fields as the HTTP API does; where a gRPC message spells one
# differently, errors are renamed to the proto's field path.
_GENERATE_PARAMS = {
    name: f"sampling.{name}" for name in ("temperature", "top_p", "max_tokens", "seed", "stop")
}
_SCORE_PARAMS = {"model": "reward_model"}


def grpc_param(param: str | None, method: str) -> str | None:
    """The proto field path of an admission error's `param` for RPC `method` (e.g. "Generate")."""
    if param is None:
        return None
    names = _SCORE_PARAMS if method == "Score" else _GENERATE_PARAMS
    return names.get(param, param)


def _sampling(request: pb.GenerateRequest) -> SamplingParams:
    s = request.sampling
    return SamplingParams(
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
    )


def bon_request_from_proto(request: pb.GenerateRequest, default_best_of: int) -> BonRequest:
    """A BonRequest from a GenerateRequest; zero values take the defaults."""
    if request.messages and request.prompt:
        raise InvalidRequest("give either messages or prompt, not both", param="prompt")
    n = request.n or 1
    return BonRequest(
        messages=_messages(request.messages),
        prompt=request.prompt or None,
        model=request.model or None,
        # Asking for n answers without best_of still generates at least n.
        best_of=request.best_of or max(default_best_of, n),
        n=n,
        reward_model=request.reward_model or None,
        sampling=_sampling(request),
        selection=cast(Selection, _choice(request.selection, SELECTIONS, "argmax", "selection")),
        aggregation=cast(Aggregation, _choice(request.aggregation, AGGREGATIONS, "last", "aggregation")),
        return_candidates=request.return_candidates,
        min_candidates=request.min_candidates or None,
        strategy=cast(Strategy | None, _choice(request.strategy, STRATEGIES, "", "strategy") or None),
        rejection_rate=request.rejection_rate if request.HasField("rejection_rate") else None,
        checkpoints=tuple(request.checkpoints),
    )


def score_request_from_proto(request: pb.ScoreRequest) -> ScoreRequest:
    activation = _choice(request.activation, ACTIVATIONS, "", "activation") or None
    return ScoreRequest(
        messages=_messages(request.messages),
        candidates=tuple(request.candidates),
        steps=tuple(tuple(s.steps) for s in request.steps),
        reward_model=request.reward_model or None,
        activation=cast(Activation | None, activation),
        aggregation=cast(Aggregation, _choice(request.aggregation, AGGREGATIONS, "last", "aggregation")),
        selection=cast(Selection, _choice(request.selection, SELECTIONS, "argmax", "selection")),
    )


def _candidate(c: ScoredCandidate) -> pb.Candidate:
    return pb.Candidate(
        index=c.index,
        text=c.text,
        reward=c.reward,
        step_rewards=list(c.step_rewards),
        finish_reason=c.finish_reason,
        rank=c.rank,
        answer=c.answer or "",
    )


def generate_response(result: BonResult, request: BonRequest) -> pb.GenerateResponse:
    """Ranked best first: the best n, or every candidate with return_candidates."""
    chosen = result.ranked if request.return_candidates else result.ranked[: request.n]
    u, t = result.usage, result.timings
    return pb.GenerateResponse(
        id=result.id,
        model=result.model,
        reward_model=result.reward_model,
        candidates=[_candidate(c) for c in chosen],
        usage=pb.Usage(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            total_tokens=u.total_tokens,
            candidates_generated=u.candidates_generated,
        ),
        timings=pb.Timings(
            generate_seconds=t.generate_seconds,
            score_seconds=t.score_seconds,
            select_seconds=t.select_seconds,
            total_seconds=t.total_seconds,
        ),
        candidates_dropped=len(result.dropped),
        drop_reasons=[str(d) for d in result.dropped],
        selected_answer=result.selected_answer or "",
        vote_share=result.vote_share or 0.0,
        rejected=[
            pb.RejectedCandidate(
                index=r.index, text=r.text, reward=r.reward, tokens=r.tokens, checkpoint=r.checkpoint
            )
            for r in (result.rejected if request.return_candidates else ())
        ],
    )


def checkpoint_event(report: CheckpointReport) -> pb.GenerateEvent:
    return pb.GenerateEvent(
        checkpoint=pb.CheckpointScored(
            tokens=report.tokens,
            scored=[pb.CandidateScored(index=i, reward=r) for i, r in report.rewards],
            rejected=list(report.rejected),
            seconds=report.seconds,
        )
    )


def generated_event(generation: Generation) -> pb.GenerateEvent:
    return pb.GenerateEvent(
        generated=pb.CandidateGenerated(
            index=generation.index, text=generation.text, finish_reason=generation.finish_reason
        )
    )


def scored_event(index: int, score: CandidateScore) -> pb.GenerateEvent:
    return pb.GenerateEvent(
        scored=pb.CandidateScored(index=index, reward=score.reward, step_rewards=list(score.step_rewards))
    )


def score_response(result: ScoreResult) -> pb.ScoreResponse:
    """Scores in input order."""
    return pb.ScoreResponse(
        reward_model=result.model,
        data=[
            pb.ScoredCandidate(
                index=s.index, reward=s.reward, step_rewards=list(s.step_rewards), answer=s.answer or ""
            )
            for s in result.scores
        ],
        usage=pb.Usage(prompt_tokens=result.prompt_tokens, total_tokens=result.total_tokens),
        selected_index=result.selected_index,
        selected_answer=result.selected_answer or "",
        vote_share=result.vote_share or 0.0,
    )


def list_models_response(models: list[ModelInfo]) -> pb.ListModelsResponse:
    return pb.ListModelsResponse(
        models=[pb.ModelInfo(name=m.name, kind=m.kind, architecture=m.architecture) for m in models]
    )
