"""Pydantic schemas of the OpenAI-compatible HTTP API, and their conversion to
the engine's plain types.

Schemas check types and shapes only; range checks that depend on the
configuration (best_of <= max, n <= best_of, known reward model) live in the
engine so that both fronts share them. No engine logic here.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from bon_gateway.errors import InvalidRequest
from bon_gateway.types import (
    Activation,
    Aggregation,
    BonRequest,
    BonResult,
    Message,
    ModelInfo,
    SamplingParams,
    ScoredCandidate,
    ScoreRequest,
    ScoreResult,
    Selection,
    Strategy,
    ToolCall,
)

__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "RewardsRequest",
    "chat_completion_body",
    "chat_completion_chunks",
    "completion_body",
    "completion_chunks",
    "live_chunks",
    "models_body",
    "rewards_body",
]

# OpenAI fields the gateway does not interpret itself but that OpenAI-compatible
# servers (vLLM, SGLang, llama.cpp) understand: forwarded, unchanged, to every
# candidate call. Sampling knobs, output constraints and tool calling (a candidate
# that calls tools comes back with its calls and is scored as its whole message).
PASSTHROUGH_FIELDS = (
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "top_k",
    "min_p",
    "logit_bias",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
    "suffix",
    "logprobs",
    "top_logprobs",
)

# OpenAI fields that cannot mean what the client asks for behind Best-of-N: a 400
# naming the field, never a silent drop. Why, per field:
REFUSED_FIELDS = {
    "echo": "an echoed prompt would be scored as part of every candidate",
    "functions": "the deprecated functions API is not passed through: use tools",
    "function_call": "the deprecated functions API is not passed through: use tool_choice",
    "audio": "audio output cannot be scored by a reward model",
    "modalities": "only text output can be scored by a reward model",
    "prediction": "predicted outputs are not passed through",
}


class _Request(BaseModel):
    # Unknown fields are ignored (clients send bookkeeping such as metadata or store that
    # means nothing to a generator); the OpenAI fields that matter are either passed
    # through (PASSTHROUGH_FIELDS) or refused by name (REFUSED_FIELDS).
    # NaN / Infinity (which pydantic-core accepts in JSON) are not JSON numbers: a 400
    # naming the field, never forwarded upstream.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCallIn(BaseModel):
    name: str
    arguments: str


class ToolCallIn(BaseModel):
    """One call of an assistant turn in the history (OpenAI `tool_calls[i]`)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(BaseModel):
    """One chat turn; `content` may be a string, OpenAI text parts, or null (an assistant
    turn that only calls tools)."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def to_message(self, index: int) -> Message:
        content = self.content
        if content is None:
            if not self.tool_calls:
                raise InvalidRequest(
                    f"messages[{index}].content may be null only in an assistant turn with tool_calls",
                    param=f"messages[{index}].content",
                )
            content = ""
        elif isinstance(content, list):
            content = "".join(part.text for part in content)
        calls = tuple(
            ToolCall(c.id, c.function.name, c.function.arguments, c.type) for c in self.tool_calls or ()
        )
        return Message(self.role, content, calls, self.tool_call_id, self.name)


def _messages(messages: list[ChatMessageIn]) -> tuple[Message, ...]:
    return tuple(m.to_message(i) for i, m in enumerate(messages))


class StreamOptions(BaseModel):
    include_usage: bool = False


class _GenerateFields(_Request):
    """Fields shared by chat and plain completions."""

    model: str | None = None
    # Best-of-N extras. Ranges are the engine's business (they depend on config).
    best_of: StrictInt | None = None
    n: StrictInt = 1
    reward_model: str | None = None
    selection: Selection = "argmax"
    aggregation: Aggregation = "last"
    return_candidates: StrictBool = False
    min_candidates: StrictInt | None = None
    # Search: best_of_n | speculative_rejection (ranges checked by admission).
    strategy: Strategy | None = None
    rejection_rate: float | None = None
    checkpoints: list[StrictInt] | None = None

    # Ranges (temperature >= 0, top_p in (0, 1], max_tokens >= 1) are checked
    # by the engine's admission step, for both fronts.
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: StrictInt | None = None
    seed: StrictInt | None = None
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    top_k: StrictInt | None = None
    min_p: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    user: str | None = None
    suffix: str | None = None
    # Chat: logprobs true / top_logprobs N; completions: logprobs N. Each candidate's come back.
    logprobs: StrictBool | StrictInt | None = None
    top_logprobs: StrictInt | None = None

    # Refused by name when set (REFUSED_FIELDS says why): typed loosely, so that the
    # client hears the reason rather than a type error.
    echo: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None

    def refuse_unsupported(self) -> None:
        """A 400 naming the first field set that Best-of-N cannot honour."""
        for name, why in REFUSED_FIELDS.items():
            value = getattr(self, name)
            if value is None or value is False or (type(value) is int and value == 0):
                continue  # the default spelled out (echo: false)
            raise InvalidRequest(f"{name} is not supported by bon-gateway: {why}", param=name)

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        extra = {name: getattr(self, name) for name in PASSTHROUGH_FIELDS if getattr(self, name) is not None}
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=max_tokens,
            seed=self.seed,
            stop=stop,
            extra=extra,
        )

    def _bon_request(
        self, default_best_of: int, messages: tuple[Message, ...], prompt: str | None, max_tokens: int | None
    ) -> BonRequest:
        self.refuse_unsupported()
        return BonRequest(
            messages=messages,
            prompt=prompt,
            model=self.model,
            # Without best_of, asking for n choices still generates at least n.
            best_of=self.best_of if self.best_of is not None else max(default_best_of, self.n),
            n=self.n,
            reward_model=self.reward_model,
            sampling=self.sampling(max_tokens),
            selection=self.selection,
            aggregation=self.aggregation,
            return_candidates=self.return_candidates,
            min_candidates=self.min_candidates,
            strategy=self.strategy,
            rejection_rate=self.rejection_rate,
            checkpoints=tuple(self.checkpoints or ()),
        )


class ChatCompletionRequest(_GenerateFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageIn]
    # HTTP only (gRPC has no such field): its bound is checked here, naming it.
    max_completion_tokens: StrictInt | None = Field(None, ge=1)

    def to_bon_request(self, default_best_of: int) -> BonRequest:
        messages = _messages(self.messages)
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._bon_request(default_best_of, messages, None, max_tokens)


class CompletionRequest(_GenerateFields):
    """POST /v1/completions (a plain prompt)."""

    prompt: str | list[str]

    def to_bon_request(self, default_best_of: int) -> BonRequest:
        prompt = self.prompt
        if isinstance(prompt, list):
            # One Best-of-N run per request: batching prompts would multiply the
            # fan-out behind a single client call.
            if len(prompt) != 1:
                raise InvalidRequest(
                    "prompt must be a string or a list of exactly one string", param="prompt"
                )
            prompt = prompt[0]
        return self._bon_request(default_best_of, (), prompt, self.max_tokens)


class RewardsRequest(_Request):
    """POST /v1/rewards: score given answers for a prompt (no generation)."""

    model: str | None = None
    messages: list[ChatMessageIn]
    candidates: list[str] | None = None
    steps: list[list[str]] | None = None
    activation: Activation | None = None
    aggregation: Aggregation = "last"
    selection: Selection = "argmax"

    def to_score_request(self) -> ScoreRequest:
        return ScoreRequest(
            messages=_messages(self.messages),
            candidates=tuple(self.candidates or ()),
            steps=tuple(tuple(s) for s in self.steps or ()),
            reward_model=self.model,
            activation=self.activation,
            aggregation=self.aggregation,
            selection=self.selection,
        )


# -- responses -----------------------------------------------------------------
# Built as plain dicts: OpenAI objects are open-ended (extra fields per choice),
# and clients only see JSON.


def _usage(result: BonResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.usage.prompt_tokens,
        "completion_tokens": result.usage.completion_tokens,
        "total_tokens": result.usage.total_tokens,
        "candidates_generated": result.usage.candidates_generated,
    }


def _reward_fields(candidate: ScoredCandidate) -> dict[str, Any]:
    fields: dict[str, Any] = {"reward": candidate.reward}
    if candidate.step_rewards:
        fields["step_rewards"] = list(candidate.step_rewards)
    return fields


def _add_vote(body: dict[str, Any], answer: str | None, share: float | None) -> None:
    """Voting selections report the winning final answer and its share of the vote."""
    if answer is not None:
        body["selected_answer"] = answer
    if share is not None:
        body["vote_share"] = share


def _candidates(result: BonResult) -> list[dict[str, Any]]:
    """Every finished candidate ranked best first, then those rejected at a checkpoint
    (speculative rejection: their text so far, the reward that sank them, no rank)."""
    ranked = [
        {
            "index": c.index,
            "text": c.text,
            "reward": c.reward,
            "rank": c.rank,
            "finish_reason": c.finish_reason,
            "tokens": c.tokens,
            **({"step_rewards": list(c.step_rewards)} if c.step_rewards else {}),
            **({"answer": c.answer} if c.answer is not None else {}),
            **({"tool_calls": _tool_calls(c.tool_calls)} if c.tool_calls else {}),
        }
        for c in result.ranked
    ]
    rejected = [
        {
            "index": r.index,
            "text": r.text,
            "reward": r.reward,
            "rank": None,
            "finish_reason": "rejected",
            "rejected_at": r.checkpoint,
            "tokens": r.tokens,
        }
        for r in result.rejected
    ]
    return ranked + rejected


def _envelope(result: BonResult, request: BonRequest, obj: str, prefix: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"{prefix}-{result.id}",
        "object": obj,
        "created": int(time.time()),
        "model": result.model,
        "choices": [],
        "usage": _usage(result),
        "reward_model": result.reward_model,
        "candidates_dropped": len(result.dropped),
        # One "reason: detail" per dropped candidate (what the gRPC reply calls drop_reasons).
        "drop_reasons": [str(d) for d in result.dropped],
    }
    _add_vote(body, result.selected_answer, result.vote_share)
    if request.return_candidates:
        body["candidates"] = _candidates(result)
    return body


def _tool_calls(calls: tuple[ToolCall, ...], *, indexed: bool = False) -> list[dict[str, Any]]:
    """OpenAI `tool_calls` (`indexed`: as stream deltas, which carry each call's position)."""
    return [
        {
            **({"index": i} if indexed else {}),
            "id": call.id,
            "type": call.type,
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for i, call in enumerate(calls)
    ]


def _assistant_message(candidate: ScoredCandidate) -> dict[str, Any]:
    """The candidate's assistant message; one that only calls tools has `content: null`, as OpenAI's."""
    if not candidate.tool_calls:
        return {"role": "assistant", "content": candidate.text}
    return {
        "role": "assistant",
        "content": candidate.text or None,
        "tool_calls": _tool_calls(candidate.tool_calls),
    }


def chat_completion_body(result: BonResult, request: BonRequest) -> dict[str, Any]:
    """An OpenAI chat.completion: the best n candidates, best first."""
    body = _envelope(result, request, "chat.completion", "chatcmpl")
    body["choices"] = [
        {
            "index": i,
            "message": _assistant_message(c),
            "finish_reason": c.finish_reason,
            "logprobs": c.logprobs,
            **_reward_fields(c),
        }
        for i, c in enumerate(result.ranked[: request.n])
    ]
    return body


def completion_body(result: BonResult, request: BonRequest) -> dict[str, Any]:
    """An OpenAI text_completion: the best n candidates, best first."""
    body = _envelope(result, request, "text_completion", "cmpl")
    body["choices"] = [
        {
            "index": i,
            "text": c.text,
            "finish_reason": c.finish_reason,
            "logprobs": c.logprobs,
            **_reward_fields(c),
        }
        for i, c in enumerate(result.ranked[: request.n])
    ]
    return body


def rewards_body(result: ScoreResult) -> dict[str, Any]:
    """The /v1/rewards reply: one entry per candidate, in input order."""
    body: dict[str, Any] = {
        "object": "list",
        "model": result.model,
        "data": [
            {"index": s.index, **_reward_fields(s), **({"answer": s.answer} if s.answer is not None else {})}
            for s in result.scores
        ],
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.total_tokens},
        "selected_index": result.selected_index,
    }
    _add_vote(body, result.selected_answer, result.vote_share)
    return body


def models_body(models: list[ModelInfo]) -> dict[str, Any]:
    """OpenAI model list; `kind` tells generator from reward models."""
    created = int(time.time())
    return {
        "object": "list",
        "data": [
            {
                "id": m.name,
                "object": "model",
                "created": created,
                "owned_by": "bon-gateway",
                "kind": m.kind,
                **({"architecture": m.architecture} if m.architecture else {}),
            }
            for m in models
        ],
    }


def _chunk(
    result: BonResult, obj: str, prefix: str, created: int, choices: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "id": f"{prefix}-{result.id}",
        "object": obj,
        "created": created,
        "model": result.model,
        "choices": choices,
    }


def _summary_chunk(
    result: BonResult, request: BonRequest, include_usage: bool, base: dict[str, Any]
) -> dict[str, Any] | None:
    """The last chunk (no choices): usage when asked, every candidate when asked."""
    if not include_usage and not request.return_candidates:
        return None
    base["choices"] = []
    base["reward_model"] = result.reward_model
    base["candidates_dropped"] = len(result.dropped)
    base["drop_reasons"] = [str(d) for d in result.dropped]
    if include_usage:
        base["usage"] = _usage(result)
    if request.return_candidates:
        base["candidates"] = _candidates(result)
    return base


def live_chunks(chat: bool, request_id: str, model: str, text: str, *, first: bool) -> list[dict[str, Any]]:
    """The chunks of choice 0's text as it is generated (the only candidate left in the race)."""
    created = int(time.time())
    base = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}", "created": created, "model": model}
    if not chat:
        choice = {"index": 0, "text": text, "finish_reason": None, "logprobs": None}
        return [{**base, "object": "text_completion", "choices": [choice]}]
    deltas = ([{"role": "assistant", "content": ""}] if first else []) + [{"content": text}]
    return [
        {
            **base,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}],
        }
        for delta in deltas
    ]


def chat_completion_chunks(
    result: BonResult, request: BonRequest, *, include_usage: bool = False, streamed: bool = False
) -> list[dict[str, Any]]:
    """The chosen answers as OpenAI chat.completion.chunk objects.

    Usually the candidates are ranked before anything is sent (the best one is
    only known once all are scored), so each choice is one role chunk, one
    content chunk and one closing chunk that carries finish_reason and the
    reward. `streamed`: choice 0's text went out as it was generated
    (`live_chunks`), so only its closing chunk follows.
    """
    created = int(time.time())
    chunks: list[dict[str, Any]] = []
    for i, c in enumerate(result.ranked[: request.n]):
        deltas: list[dict[str, Any]] = (
            [] if streamed and i == 0 else [{"role": "assistant", "content": ""}, {"content": c.text}]
        )
        if c.tool_calls:
            # Each call whole in one delta (OpenAI splits the arguments; clients join them anyway).
            deltas.append({"tool_calls": _tool_calls(c.tool_calls, indexed=True)})
        for delta in deltas:
            chunks.append(
                _chunk(
                    result,
                    "chat.completion.chunk",
                    "chatcmpl",
                    created,
                    [{"index": i, "delta": delta, "finish_reason": None, "logprobs": None}],
                )
            )
        closing = {
            "index": i,
            "delta": {},
            "finish_reason": c.finish_reason,
            "logprobs": c.logprobs,  # all of the choice's at once (clients join them across chunks)
            **_reward_fields(c),
        }
        chunks.append(_chunk(result, "chat.completion.chunk", "chatcmpl", created, [closing]))
    base = _chunk(result, "chat.completion.chunk", "chatcmpl", created, [])
    summary = _summary_chunk(result, request, include_usage, base)
    return chunks if summary is None else [*chunks, summary]


def completion_chunks(
    result: BonResult, request: BonRequest, *, include_usage: bool = False, streamed: bool = False
) -> list[dict[str, Any]]:
    """The chosen answers as streamed text_completion objects (one text chunk each;
    `streamed`: choice 0's text went out already, its chunk only closes it)."""
    created = int(time.time())
    chunks = [
        _chunk(
            result,
            "text_completion",
            "cmpl",
            created,
            [
                {
                    "index": i,
                    "text": "" if streamed and i == 0 else c.text,
                    "finish_reason": c.finish_reason,
                    "logprobs": c.logprobs,
                    **_reward_fields(c),
                }
            ],
        )
        for i, c in enumerate(result.ranked[: request.n])
    ]
    summary = _summary_chunk(
        result, request, include_usage, _chunk(result, "text_completion", "cmpl", created, [])
    )
    return chunks if summary is None else [*chunks, summary]
