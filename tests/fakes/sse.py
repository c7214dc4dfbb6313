"""OpenAI streaming bodies for the fake upstreams: the chunks vLLM sends, one token each."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["done_event", "event", "fake_logprob", "stream_chunks", "tokens_of", "tool_call_chunks"]


def tokens_of(text: str) -> list[str]:
    """The fakes' tokens: words with the space before them ("a b" -> ["a", " b"])."""
    return re.findall(r"\s*\S+", text) or ([text] if text else [])


def fake_logprob(token: str) -> float:
    """The fakes' logprob of a token: minus its length in characters."""
    return -float(len(token))


def event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def done_event() -> bytes:
    return b"data: [DONE]\n\n"


def stream_chunks(
    *,
    chat: bool,
    texts: Sequence[str],
    model: str,
    prompt_tokens: int,
    include_usage: bool,
    finish_reason: str = "stop",
    logprobs: bool = False,
) -> list[dict[str, Any]]:
    """Every chunk of a streamed reply with len(texts) choices, tokens interleaved
    across choices as an n>1 server sends them, then the usage chunk when asked for.
    `logprobs`: each token chunk carries its logprob (fake_logprob), as vLLM's do."""
    created = int(time.time())
    base: dict[str, Any] = {
        "id": "fake-stream",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
    }

    def token_logprobs(text: str | None) -> dict[str, Any] | None:
        if not logprobs or text is None:
            return None
        if chat:
            entry = {
                "token": text,
                "logprob": fake_logprob(text),
                "bytes": list(text.encode()),
                "top_logprobs": [],
            }
            return {"content": [entry], "refusal": None}
        return {
            "tokens": [text],
            "token_logprobs": [fake_logprob(text)],
            "top_logprobs": [None],
            "text_offset": [0],
        }

    def choice(index: int, text: str | None, reason: str | None) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "finish_reason": reason, "logprobs": token_logprobs(text)}
        return {"index": index, "text": text or "", "finish_reason": reason, "logprobs": token_logprobs(text)}

    chunks: list[dict[str, Any]] = []
    if chat:
        for i in range(len(texts)):
            chunks.append(
                {**base, "choices": [{"index": i, "delta": {"role": "assistant"}, "finish_reason": None}]}
            )
    split = [tokens_of(t) for t in texts]
    for step in range(max((len(s) for s in split), default=0)):
        for i, tokens in enumerate(split):
            if step < len(tokens):
                chunks.append({**base, "choices": [choice(i, tokens[step], None)]})
    for i in range(len(texts)):
        chunks.append({**base, "choices": [choice(i, None, finish_reason)]})
    if include_usage:
        completion = sum(len(s) for s in split)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        chunks.append({**base, "choices": [], "usage": usage})
    return chunks


def tool_call_chunks(
    *, calls: Sequence[tuple[str, str]], model: str, prompt_tokens: int, include_usage: bool
) -> list[dict[str, Any]]:
    """A streamed chat reply (one choice, no content) that calls tools, as vLLM sends it:
    per call a first delta with its id, type and name, then its arguments in two pieces;
    finish_reason "tool_calls"."""
    base: dict[str, Any] = {
        "id": "fake-stream",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }

    def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]}

    chunks = [chunk({"role": "assistant", "content": None})]
    for i, (name, arguments) in enumerate(calls):
        first = {
            "index": i,
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        chunks.append(chunk({"tool_calls": [first]}))
        half = len(arguments) // 2
        for piece in (arguments[:half], arguments[half:]):
            chunks.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}))
    chunks.append(chunk({}, "tool_calls"))
    if include_usage:
        completion = 2 * len(calls)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }
        chunks.append({**base, "choices": [], "usage": usage})
    return chunks
