"""OpenAI request bodies for the upstream and Generations out of its replies.

Pure functions, no I/O: what one upstream call sends and how its JSON reply
becomes candidates.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from bon_gateway.types import BonRequest, Generation, Message

__all__ = [
    "BadResponse",
    "ChoiceDelta",
    "StreamUsage",
    "ToolCallDelta",
    "build_payload",
    "completion_as_chunk",
    "error_message",
    "merge_logprobs",
    "parse_choices",
    "parse_chunk",
]

# Upstream error text returned to clients is cut here: a 400 body can echo the
# whole prompt back, and the client already has that.
MAX_ERROR_MESSAGE = 300


class BadResponse(Exception):
    """The upstream answered 200 with a body that is not an OpenAI completion."""


def build_payload(
    request: BonRequest, model: str, seed: int, n: int = 1, *, stream: bool = True
) -> tuple[str, dict[str, Any]]:
    """The upstream path (relative to the base URL) and JSON body of one call asking for `n` choices.

    Streamed (SSE) by default, with the usage chunk asked for (servers that do
    not send one get their tokens counted chunk by chunk).
    """
    s = request.sampling
    body: dict[str, Any] = dict(s.extra)
    body["model"] = model
    body["seed"] = seed
    body["n"] = n
    body["stream"] = stream
    if stream:
        body["stream_options"] = {"include_usage": True}
    if s.temperature is not None:
        body["temperature"] = s.temperature
    if s.top_p is not None:
        body["top_p"] = s.top_p
    if s.max_tokens is not None:
        body["max_tokens"] = s.max_tokens
    if s.stop:
        body["stop"] = list(s.stop)
    if request.prompt is not None:
        body["prompt"] = request.prompt
        return "/completions", body
    body["messages"] = [_chat_message(m) for m in request.messages]
    return "/chat/completions", body


def _chat_message(message: Message) -> dict[str, Any]:
    """One history turn as OpenAI sends it: tool calls (content null when they are all
    the turn says), a tool turn's call id, a participant's name."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["content"] = message.content or None
        out["tool_calls"] = [
            {"id": c.id, "type": c.type, "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        out["name"] = message.name
    return out


def parse_choices(data: Any, first_index: int, limit: int) -> list[Generation]:
    """Up to `limit` Generations from an OpenAI chat or completions body, indexed from `first_index`.

    The call's usage covers all its choices; it is booked on the first one so
    that the engine's sums stay exact (per-choice counts are not reported).
    """
    try:
        choices = data["choices"]
        if not isinstance(choices, list) or not choices:
            raise BadResponse("no choices in the upstream body")
        usage = data.get("usage") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        completion_tokens = int(usage.get("completion_tokens") or 0)
        # Choices may come back in any order; their own index says which is which.
        ordered = sorted(choices, key=lambda c: int(c.get("index") or 0))[:limit]
        generations = []
        for offset, choice in enumerate(ordered):
            if "message" in choice:
                text = choice["message"].get("content") or ""
            else:
                text = choice["text"]
            generations.append(
                Generation(
                    index=first_index + offset,
                    text=str(text),
                    finish_reason=str(choice.get("finish_reason") or "stop"),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens if offset == 0 else 0,
                )
            )
        return generations
    except BadResponse:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise BadResponse(f"unexpected upstream body ({type(err).__name__})") from None


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of one tool call of a streamed choice: `index` is the call's position; the
    id and type come once, the name and the arguments in pieces to be joined."""

    index: int
    id: str
    type: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    """One choice's piece of a streamed chunk."""

    index: int
    text: str
    finish_reason: str | None
    tool_calls: tuple[ToolCallDelta, ...] = ()
    # The chunk's logprobs object as the upstream sent it (asked for with `logprobs`).
    logprobs: dict[str, Any] | None = None


def _tool_call_deltas(raw: Any) -> tuple[ToolCallDelta, ...]:
    if not raw:
        return ()
    deltas = []
    for position, call in enumerate(raw):
        function = call.get("function") or {}
        index = call.get("index")
        deltas.append(
            ToolCallDelta(
                index=position if index is None else int(index),
                id=str(call.get("id") or ""),
                type=str(call.get("type") or ""),
                name=str(function.get("name") or ""),
                arguments=str(function.get("arguments") or ""),
            )
        )
    return tuple(deltas)


@dataclass(frozen=True, slots=True)
class StreamUsage:
    prompt_tokens: int
    completion_tokens: int


def parse_chunk(data: Any) -> tuple[list[ChoiceDelta], StreamUsage | None]:
    """The choice deltas and the usage (when this is the usage chunk) of one streamed
    chat.completion.chunk or text_completion event."""
    # Once per token of every candidate: the conversions are skipped where the JSON value
    # already has the type (what int() / str() would return anyway).
    try:
        deltas: list[ChoiceDelta] = []
        for choice in data.get("choices") or ():
            calls: tuple[ToolCallDelta, ...] = ()
            if "delta" in choice:
                delta = choice.get("delta") or {}
                text = delta.get("content") or ""
                if tool_calls := delta.get("tool_calls"):
                    calls = _tool_call_deltas(tool_calls)
            else:
                text = choice.get("text") or ""
            reason = choice.get("finish_reason")
            index = choice.get("index") or 0
            deltas.append(
                ChoiceDelta(
                    index if type(index) is int else int(index),
                    text if type(text) is str else str(text),
                    reason if reason is None or type(reason) is str else str(reason),
                    calls,
                    logprobs if isinstance(logprobs := choice.get("logprobs"), dict) else None,
                )
            )
        usage = data.get("usage")
        if usage:
            return deltas, StreamUsage(
                int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
            )
        return deltas, None
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise BadResponse(f"unexpected upstream chunk ({type(err).__name__})") from None


def merge_logprobs(parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """One candidate's logprobs out of its chunks' pieces: every list joined in order
    (chat's `content`, completions' `tokens`, `token_logprobs`, `top_logprobs`,
    `text_offset`), other values from the first piece that has them."""
    if not parts:
        return None
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            elif merged.get(key) is None:
                merged[key] = value
    return merged


def completion_as_chunk(data: Any) -> Any:
    """A whole (non-streamed) completion as the one streamed chunk it amounts to."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        return data  # parse_chunk reports what is wrong with it
    choices = []
    for choice in data["choices"]:
        if not isinstance(choice, dict):
            return data
        if "message" in choice:
            message = choice.get("message") or {}
            delta: dict[str, Any] = {"content": message.get("content") or ""}
            if message.get("tool_calls"):
                delta["tool_calls"] = [
                    {**call, "index": i} if isinstance(call, dict) else call
                    for i, call in enumerate(message["tool_calls"])
                ]
            choices.append({**choice, "delta": delta})
        else:
            choices.append(choice)
    return {**data, "choices": choices}


def error_message(body: bytes) -> str:
    """The human message of an upstream error body (OpenAI, vLLM, llama.cpp and TGI shapes),
    cleaned for clients: its first paragraph, no traceback, no server file paths."""
    return _clean(_raw_error_message(body))


# A path of two or more components (/srv/app/x.py, C:\\app\\x.py): server internals.
_PATH = re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.@+-]+){2,}")
_TRACEBACK = re.compile(r"\n\s*(?:File \"|Traceback \(most recent call last\))")


def _clean(message: str) -> str:
    cut = _TRACEBACK.search(message)
    if cut is not None:
        message = message[: cut.start()]
    message = _PATH.sub("<path>", message)
    message = " ".join(message.split())  # one line
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[: MAX_ERROR_MESSAGE - 3] + "..."
    return message or "no message"


def _raw_error_message(body: bytes) -> str:
    text = body[:65536].decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return text
    message: Any = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        elif isinstance(error, str):  # TGI: {"error": "...", "error_type": ...}
            message = error
        message = message or data.get("message") or data.get("detail")
    return message if isinstance(message, str) else text
