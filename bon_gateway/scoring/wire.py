"""RewardWorker requests built from the engine's types, and the worker's typed errors.

Front process: no torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import grpc

from bon_gateway.scoring.worker.status import ERROR_PARAM_KEY
from bon_gateway.types import Message, RawInput
from bon_gateway.v1 import best_of_n_pb2, reward_worker_pb2

__all__ = [
    "AFFINITY_CHARS",
    "AFFINITY_TOKENS",
    "chat_messages",
    "error_param",
    "prompt_affinity",
    "score_request",
]

#: how much of a raw input stands for its prompt when choosing a worker (see prompt_affinity)
AFFINITY_CHARS = 256
AFFINITY_TOKENS = 64


def error_param(err: grpc.aio.AioRpcError) -> str | None:
    """The request field a worker's INVALID_ARGUMENT names in its trailing metadata."""
    for key, value in err.trailing_metadata() or ():
        if key == ERROR_PARAM_KEY and isinstance(value, str):
            return value
    return None


def prompt_affinity(messages: Sequence[Message], raw: Sequence[RawInput] = ()) -> int | None:
    """A stable hash of a scoring request's prompt, so that requests sharing a prompt prefer
    one worker (whose prefix cache holds it): the messages; for raw inputs (no messages),
    the first AFFINITY_CHARS characters of the first one's text or its first AFFINITY_TOKENS
    ids, a stand-in for its prompt since the front has no tokenizer to find where the
    answer starts. None (no preference) for a raw input shorter than that: its answer would
    be part of the hash."""
    digest = hashlib.blake2b(digest_size=8)
    if raw:
        first = raw[0]
        if first.token_ids:
            if len(first.token_ids) <= AFFINITY_TOKENS:
                return None
            digest.update(repr(first.token_ids[:AFFINITY_TOKENS]).encode())
        else:
            if len(first.text) <= AFFINITY_CHARS:
                return None
            digest.update(first.text[:AFFINITY_CHARS].encode("utf-8", "surrogatepass"))
    elif messages:
        for m in messages:
            digest.update(f"{len(m.role)}:{m.role}{len(m.content)}:".encode())
            digest.update(m.content.encode("utf-8", "surrogatepass"))
    else:
        return None
    return int.from_bytes(digest.digest(), "big")


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
    raw: Sequence[RawInput] = (),
    truncate_prompt_tokens: int = 0,
) -> reward_worker_pb2.WorkerScoreRequest:
    """The worker's request; with `raw`, the raw inputs take the place of the candidates."""
    return reward_worker_pb2.WorkerScoreRequest(
        request_id=request_id,
        model=model,
        messages=chat_messages(messages),
        candidates=[] if raw else list(candidates),
        steps=[best_of_n_pb2.StepList(steps=list(s)) for s in steps],
        activation=activation or "",
        raw=[reward_worker_pb2.RawInput(text=r.text, token_ids=list(r.token_ids)) for r in raw],
        truncate_prompt_tokens=max(0, truncate_prompt_tokens),
    )
