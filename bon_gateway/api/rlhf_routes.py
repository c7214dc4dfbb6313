"""The RLHF reward-server routes: vLLM's `/classify`, `/pooling`, `/score`, `/rerank` and
OpenRLHF's `/get_reward`, so trainers that call a remote reward model (verl's reward loop,
OpenRLHF's remote RM client) work against the gateway unchanged.

Each route reads its body (rlhf_schema.py), turns it into engine `ScoreRequest`s and
scores them through the same admission and `engine.score` path as `/v1/rewards`; the
HTTP app registers them as direct routes (http_app.py), so keys, limits, metrics and
errors are the same as on every other route. One sample per request (verl's traffic) still
reuses its prompt: the worker keeps each raw input's prompt in its prefix cache and the
pool sends requests with the same prompt to the same worker (pool.py `_pick`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import replace
from typing import Any, Literal, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.types import Receive

from bon_gateway.api.rlhf_schema import (
    ClassifyRequest,
    GetRewardRequest,
    PoolingRequest,
    RerankRequest,
    ScoreApiRequest,
    apply_score_activation,
    classify_body,
    get_reward_body,
    pair_score_request,
    pooling_body,
    rerank_body,
    score_body,
    single_label,
)
from bon_gateway.engine.engine import Engine
from bon_gateway.errors import InvalidRequest, ModelNotFound
from bon_gateway.types import Deadline, ScoreRequest, ScoreResult

__all__ = ["RLHF_API_LABELS", "RLHF_REQUEST_MODELS", "rlhf_routes"]

M = TypeVar("M", bound=BaseModel)
ReadBody = Callable[[Request, type[M]], Awaitable[M]]
Guarded = Callable[[Receive, Callable[[], Awaitable[Any]]], Awaitable[Any]]
Endpoint = Callable[[Request], Coroutine[Any, Any, Response]]

# bon_requests_total{api}: vLLM's aliases count with their route.
RLHF_API_LABELS = {
    "/classify": "classify",
    "/pooling": "pooling",
    "/score": "score",
    "/v1/score": "score",
    "/rerank": "rerank",
    "/v1/rerank": "rerank",
    "/v2/rerank": "rerank",
    "/get_reward": "get_reward",
}

RLHF_REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    ClassifyRequest,
    PoolingRequest,
    ScoreApiRequest,
    RerankRequest,
    GetRewardRequest,
)


class _Scoring:
    """Score requests through the engine: the model checked as vLLM does (an unknown one is
    a 404), admission, the request's deadline, cancelled when the client leaves."""

    def __init__(self, engine: Engine, guarded: Guarded) -> None:
        self.engine = engine
        self.guarded = guarded

    def model(self, name: str | None) -> str:
        if name and name not in self.engine.reward_model_names():
            raise ModelNotFound(f"The model `{name}` does not exist.", param="model")
        return self.engine.admission.reward_model(name, param="model")

    async def score(self, requests: Sequence[ScoreRequest], receive: Receive) -> list[ScoreResult]:
        deadline = Deadline.after(self.engine.config.server.request_timeout_s)
        admitted = [self.engine.admit_score(r) for r in requests]  # every 400 before any scoring

        async def work() -> list[ScoreResult]:
            return list(await asyncio.gather(*(self.engine.score(a, deadline) for a in admitted)))

        results: list[ScoreResult] = await self.guarded(receive, work)
        return results


def _renamed(err: InvalidRequest, old: str, new: str) -> InvalidRequest:
    """The same error naming the route's own field (admission and the worker say `input`)."""
    param = err.param or ""
    if not param.startswith(old):
        return err
    return InvalidRequest(err.message.replace(old, new, 1), param=new + param[len(old) :])


def _task(body: PoolingRequest, process: bool) -> Literal["classify", "token_classify"]:
    task = body.task or ("token_classify" if process else "classify")
    if task not in ("classify", "token_classify"):
        raise InvalidRequest(
            f"task {task!r} is not served: a reward model serves classify and token_classify", param="task"
        )
    if task == "token_classify" and not process:
        raise InvalidRequest(
            "task token_classify needs a process reward model (scores at its step tokens); "
            "this model is read at one position: use classify",
            param="task",
        )
    return "token_classify" if task == "token_classify" else "classify"


def rlhf_routes(
    engine: Engine, read_body: ReadBody[Any], guarded: Guarded
) -> list[tuple[str, Endpoint, type[BaseModel]]]:
    """(path, endpoint, body model) of every RLHF route, for the app's direct routes."""
    scoring = _Scoring(engine, guarded)

    async def classify(request: Request) -> Response:
        body: ClassifyRequest = await read_body(request, ClassifyRequest)
        model = scoring.model(body.model)
        (result,) = await scoring.score([_with_model(body.to_score_request(), model)], request.receive)
        return JSONResponse(classify_body(result, model, body.wants_activation()))

    async def pooling(request: Request) -> Response:
        body: PoolingRequest = await read_body(request, PoolingRequest)
        model = scoring.model(body.model)
        score_request = _with_model(body.to_score_request(), model)
        (result,) = await scoring.score([score_request], request.receive)
        # A process reward model is read at its step tokens: its scores carry step rewards.
        task = _task(body, any(c.step_rewards for c in result.scores))
        return JSONResponse(pooling_body(result, model, task, body.wants_activation()))

    async def score(request: Request) -> Response:
        body: ScoreApiRequest = await read_body(request, ScoreApiRequest)
        model = scoring.model(body.model)
        pairs = body.pairs()
        limit = engine.config.server.limits.max_candidates
        if len(pairs) > limit:
            raise InvalidRequest(
                f"text_2: {len(pairs)} pairs, at most {limit} allowed (server.limits.max_candidates)",
                param="text_2",
            )
        # One group per distinct text_1: its documents share that prompt on one worker.
        by_query: dict[str, list[int]] = {}
        for i, (query, _) in enumerate(pairs):
            by_query.setdefault(query, []).append(i)
        requests = [pair_score_request(q, [pairs[i][1] for i in idx], model) for q, idx in by_query.items()]
        results = await scoring.score(requests, request.receive)
        scores = [0.0] * len(pairs)
        for indices, result in zip(by_query.values(), results, strict=True):
            for i, candidate in zip(indices, result.scores, strict=True):
                scores[i] = apply_score_activation(single_label(candidate, model), body.wants_activation())
        tokens = sum(r.total_tokens for r in results)
        return JSONResponse(score_body(scores, model, tokens))

    async def rerank(request: Request) -> Response:
        body: RerankRequest = await read_body(request, RerankRequest)
        model = scoring.model(body.model)
        if not body.documents:
            raise InvalidRequest("documents must be a non-empty list", param="documents")
        (result,) = await scoring.score(
            [pair_score_request(body.query, body.documents, model)], request.receive
        )
        scores = [
            apply_score_activation(single_label(c, model), body.wants_activation()) for c in result.scores
        ]
        return JSONResponse(rerank_body(body.documents, scores, model, result.total_tokens, body.top_n))

    async def get_reward(request: Request) -> Response:
        body: GetRewardRequest = await read_body(request, GetRewardRequest)
        model = scoring.model(body.model)
        try:
            (result,) = await scoring.score([_with_model(body.to_score_request(), model)], request.receive)
        except InvalidRequest as err:
            raise _renamed(err, "input", "query") from None
        return JSONResponse(get_reward_body(result))

    routes: list[tuple[str, Endpoint, type[BaseModel]]] = [
        ("/classify", classify, ClassifyRequest),
        ("/pooling", pooling, PoolingRequest),
        ("/get_reward", get_reward, GetRewardRequest),
    ]
    routes += [(path, score, ScoreApiRequest) for path in ("/score", "/v1/score")]
    routes += [(path, rerank, RerankRequest) for path in ("/rerank", "/v1/rerank", "/v2/rerank")]
    return routes


def _with_model(request: ScoreRequest, model: str) -> ScoreRequest:
    return replace(request, reward_model=model)
