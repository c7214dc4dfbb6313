"""RewardWorker requests built from the engine's types, and the worker's typed errors.

Front process: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from bon_gateway.scoring.worker.status import ERROR_PARAM_KEY
from bon_gateway.types import Message
from bon_gateway.v1 import best_of_n_pb2, reward_worker_pb2

__all__ = ["chat_messages", "error_param", "score_request"]


def error_param(err: grpc.aio.AioRpcError) -> str | None:
    """The request field a worker's INVALID_ARGUMENT names in its trailing metadata."""
    for key, value in err.trailing_metadata() or ():
        if key == ERROR_PARAM_KEY and isinstance(value, str):
            return value
    return None


def chat_messages(messages: Sequence[Message]) -> list[best_of_n_pb2.ChatMessage]:
    return [best_of_n_pb2.ChatMessage(role=m.role, content=m.content) for m in messages]


def score_request(
    model: str,
    messages: Sequence[Message],
    candidates: Sequence[str],
    *,
    steps: Sequence[Sequence[str]] = (),
    activation: str | None = None,
    request_id: str = "",
) -> reward_worker_pb2.WorkerScoreRequest:
    return reward_worker_pb2.WorkerScoreRequest(
        request_id=request_id,
        model=model,
        messages=chat_messages(messages),
        candidates=list(candidates),
        steps=[best_of_n_pb2.StepList(steps=list(s)) for s in steps],
        activation=activation or "",
    )
