"""Request bodies and reply shapes of the RLHF reward-server routes (rlhf_routes.py).

The same JSON as the servers RLHF stacks already call: vLLM's pooling API (`/classify`,
`/pooling`, `/score`, `/rerank`; vllm/entrypoints/pooling/*/protocol.py) and OpenRLHF's
remote reward model (`/get_reward`, openrlhf/cli/serve_rm.py). A request becomes engine
`ScoreRequest`s here; the scores become the original reply shapes. Pure: no I/O.

Raw inputs (`input` as text or token ids, `query`) are the model's input itself, already
formatted (verl sends the chat-templated text with its leading BOS stripped): the worker
tokenizes them as they are (see scoring/worker/formatting.py `raw_ids`). `messages` and
the text pairs of /score and /rerank go through the model's own chat template instead,
as /v1/rewards does: [user text_1 / query, assistant text_2 / document].
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bon_gateway.api.openai_schema import ChatMessageIn
from bon_gateway.errors import InvalidRequest
from bon_gateway.types import Message, RawInput, ScoredCandidate, ScoreRequest, ScoreResult

__all__ = [
    "ClassifyRequest",
    "GetRewardRequest",
    "PoolingRequest",
    "RerankRequest",
    "ScoreApiRequest",
    "classify_body",
    "get_reward_body",
    "pooling_body",
    "rerank_body",
    "score_body",
]

PromptInput = str | list[str] | list[int] | list[list[int]]


class _VllmRequest(BaseModel):
    # vLLM ignores fields it does not know (user, priority, request_id, ...): so do we.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str | None = None
    # > 0: keep the last k tokens of each input; -1: the model's whole length (no cut).
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    use_activation: bool | None = None
    # Deprecated aliases of use_activation in vLLM, still accepted there.
    activation: bool | None = None
    softmax: bool | None = None

    def wants_activation(self) -> bool:
        """vLLM's get_use_activation: the deprecated names first, then use_activation; on by default."""
        for value in (self.softmax, self.activation, self.use_activation):
            if value is not None:
                return value
        return True

    def truncate_tokens(self) -> int:
        value = self.truncate_prompt_tokens
        return value if value is not None and value > 0 else 0


class _InputRequest(_VllmRequest):
    """`input` (a completion-style request) or `messages` (a chat one), as vLLM takes them."""

    input: PromptInput | None = None
    messages: list[ChatMessageIn] | None = None

    def to_score_request(self) -> ScoreRequest:
        if (self.input is None) == (self.messages is None):
            raise InvalidRequest("give either input or messages", param="input")
        if self.messages is not None:
            return chat_score_request(self.messages, self.model)
        return ScoreRequest(
            messages=(),
            raw=raw_inputs(self.input),
            reward_model=self.model,
            truncate_prompt_tokens=self.truncate_tokens(),
        )


class ClassifyRequest(_InputRequest):
    """POST /classify."""


class PoolingRequest(_InputRequest):
    """POST /pooling: `task` classify (as /classify) or token_classify (a PRM's step scores)."""

    task: str | None = None


class ScoreApiRequest(_VllmRequest):
    """POST /score (and /v1/score): `text_1` against each `text_2`, or pairwise."""

    text_1: str | list[str]
    text_2: str | list[str]

    def pairs(self) -> list[tuple[str, str]]:
        first = [self.text_1] if isinstance(self.text_1, str) else list(self.text_1)
        second = [self.text_2] if isinstance(self.text_2, str) else list(self.text_2)
        if not first:
            raise InvalidRequest("text_1 must not be empty", param="text_1")
        if not second:
            raise InvalidRequest("text_2 must not be empty", param="text_2")
        if len(first) == 1:
            first = first * len(second)
        if len(first) != len(second):
            raise InvalidRequest(
                f"text_2: {len(second)} texts for {len(first)} text_1: give one text_1, or as many as text_2",
                param="text_2",
            )
        return list(zip(first, second, strict=True))


class RerankRequest(_VllmRequest):
    """POST /rerank (and /v1/rerank, /v2/rerank): `documents` ranked against `query`."""

    query: str
    documents: list[str]
    top_n: int | None = Field(default=None, ge=0)


class GetRewardRequest(BaseModel):
    """POST /get_reward (OpenRLHF's remote reward model): each `query` is prompt + response,
    as the trainer decoded it; `prompts` and `labels` come along and are not needed."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    query: list[str]
    prompts: list[str] | None = None
    labels: list[Any] | None = None
    model: str | None = None  # not in OpenRLHF's request: the first reward model by default

    def to_score_request(self) -> ScoreRequest:
        if not self.query:
            raise InvalidRequest("query must be a non-empty list", param="query")
        return ScoreRequest(
            messages=(), raw=tuple(RawInput(text=q) for q in self.query), reward_model=self.model
        )


# -- conversion ---------------------------------------------------------------------------


def raw_inputs(value: PromptInput | None) -> tuple[RawInput, ...]:
    """vLLM's `input`: one text, several texts, one token-id list or several."""
    if value is None or (isinstance(value, list) and not value):
        raise InvalidRequest("input must not be empty", param="input")
    if isinstance(value, str):
        return (RawInput(text=value),)
    if all(isinstance(v, int) for v in value):
        return (RawInput(token_ids=tuple(int(v) for v in value)),)  # type: ignore[arg-type]
    inputs: list[RawInput] = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            inputs.append(RawInput(text=item))
        elif isinstance(item, list) and item:
            inputs.append(RawInput(token_ids=tuple(item)))
        else:
            raise InvalidRequest(
                f"input[{i}] must be a text or a non-empty list of token ids", param=f"input[{i}]"
            )
    return tuple(inputs)


def chat_score_request(messages: Sequence[ChatMessageIn], model: str | None) -> ScoreRequest:
    """A chat whose last turn is the assistant's answer: scored as /v1/rewards scores it."""
    turns = [m.to_message(i) for i, m in enumerate(messages)]
    if len(turns) < 2 or turns[-1].role != "assistant":
        raise InvalidRequest(
            "messages must end with the assistant turn to score, after at least one other turn",
            param="messages",
        )
    return ScoreRequest(messages=tuple(turns[:-1]), candidates=(turns[-1].content,), reward_model=model)


def pair_score_request(query: str, documents: Sequence[str], model: str | None) -> ScoreRequest:
    """Documents (answers) scored against one query (the user turn): one group, one prompt."""
    return ScoreRequest(messages=(Message("user", query),), candidates=tuple(documents), reward_model=model)


# -- replies ------------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _softmax(row: Sequence[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def activate(row: Sequence[float], use_activation: bool) -> list[float]:
    """vLLM's classification activation: sigmoid for one label, softmax over several."""
    if not use_activation:
        return list(row)
    if len(row) == 1:
        return [_sigmoid(row[0])]
    return _softmax(row)


def logit_rows(candidate: ScoredCandidate) -> list[list[float]]:
    """The head's logits at each position read (PRM: one row per step), as rows; a worker
    that reports none (an older remote one) gives its reward as the one logit."""
    if not candidate.logits:
        return [[candidate.reward]]
    n = max(1, candidate.labels)
    values = list(candidate.logits)
    return [values[i : i + n] for i in range(0, len(values), n)]


def single_label(candidate: ScoredCandidate, model: str) -> float:
    """The raw score of a one-label model (score / rerank refuse others, as vLLM)."""
    if not candidate.logits:
        return candidate.reward
    if candidate.labels != 1:
        raise InvalidRequest(
            f"model {model!r} has {candidate.labels} labels: score and rerank need a model with one "
            "(use /classify for a classifier)",
            param="model",
        )
    return candidate.logits[-1]


def _usage(tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": tokens,
        "total_tokens": tokens,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }


def _envelope(prefix: str, model: str, data: list[dict[str, Any]], tokens: int) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": model,
        "data": data,
        "usage": _usage(tokens),
    }


def classify_item(index: int, candidate: ScoredCandidate, use_activation: bool) -> dict[str, Any]:
    probs = activate(logit_rows(candidate)[-1], use_activation)
    best = max(range(len(probs)), key=probs.__getitem__)
    # vLLM prints config.id2label[argmax]; LABEL_<i> is transformers' default name.
    return {"index": index, "label": f"LABEL_{best}", "probs": probs, "num_classes": len(probs)}


def classify_body(result: ScoreResult, model: str, use_activation: bool) -> dict[str, Any]:
    data = [classify_item(i, c, use_activation) for i, c in enumerate(result.scores)]
    return _envelope("classify", model, data, result.total_tokens)


def pooling_body(
    result: ScoreResult, model: str, task: Literal["classify", "token_classify"], use_activation: bool
) -> dict[str, Any]:
    data: list[dict[str, Any]] = []
    for i, candidate in enumerate(result.scores):
        rows = [activate(row, use_activation) for row in logit_rows(candidate)]
        value: Any = rows if task == "token_classify" else rows[-1]
        data.append({"index": i, "object": "pooling", "data": value})
    return _envelope("pool", model, data, result.total_tokens)


def score_body(scores: Sequence[float], model: str, tokens: int) -> dict[str, Any]:
    data = [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)]
    return _envelope("score", model, data, tokens)


def rerank_body(
    documents: Sequence[str], scores: Sequence[float], model: str, tokens: int, top_n: int | None
) -> dict[str, Any]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    if top_n:
        order = order[:top_n]
    results = [{"index": i, "document": {"text": documents[i]}, "relevance_score": scores[i]} for i in order]
    return {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": model,
        "usage": {"total_tokens": tokens},
        "results": results,
    }


def get_reward_body(result: ScoreResult) -> dict[str, Any]:
    rewards = [c.reward for c in result.scores]
    return {"rewards": rewards, "scores": rewards, "extra_logs": {}}


def apply_score_activation(raw: float, use_activation: bool) -> float:
    return _sigmoid(raw) if use_activation else raw
