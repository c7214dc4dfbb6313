"""Output rows of a batch job, built from a gateway reply. Pure (no I/O).

One output row per input row:

```
{"id", "messages", "reference"?, "reward_model", "best_of",
 "candidates": [{"index", "text", "reward", "rank", "finish_reason",
                 "step_rewards", "answer", "correct"?}, ...],   # ranked, best first
 "selected_index", "selected_answer", "vote_share"?,
 "correct"?, "first_correct"?, "oracle_correct"?,               # with a reference
 "dropped", "usage", "seconds"}
```

`correct` is the selected (rank 1) candidate's; `first_correct` is that of the
first candidate generated (index 0: what one sample without reranking gives);
`oracle_correct` is true when any candidate is right.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from bon_gateway.batch.rows import BatchItem
from bon_gateway.engine.answers import answers_equivalent, extract_answer

__all__ = ["build_record", "error_record"]

Equivalent = Callable[[str | None, str | None], bool]


def _reward(value: Any) -> float:
    # JSON has no NaN: a broken head's NaN arrives as null and must sort last.
    return float(value) if isinstance(value, (int, float)) else math.nan


def build_record(
    item: BatchItem,
    body: dict[str, Any],
    *,
    best_of: int,
    seconds: float,
    equivalent: Equivalent = answers_equivalent,
) -> dict[str, Any]:
    """The output row for `item` from a /v1/chat/completions reply with `candidates`."""
    raw = body.get("candidates")
    if not isinstance(raw, list) or not raw:
        raise ValueError("the gateway reply has no candidates (return_candidates was not honoured)")
    candidates: list[dict[str, Any]] = []
    for position, c in enumerate(raw, start=1):
        text = str(c.get("text") or "")
        answer = c.get("answer")
        if answer is None:
            answer = extract_answer(text)
        candidate: dict[str, Any] = {
            "index": int(c.get("index", position - 1)),
            "text": text,
            "reward": _reward(c.get("reward")),
            "rank": int(c.get("rank") or position),
            "finish_reason": c.get("finish_reason") or "stop",
            "step_rewards": [_reward(r) for r in c.get("step_rewards") or ()],
            "answer": answer,
        }
        if item.reference is not None:
            candidate["correct"] = bool(answer is not None and equivalent(answer, item.reference))
        candidates.append(candidate)
    candidates.sort(key=lambda c: c["rank"])
    selected = candidates[0]
    record: dict[str, Any] = {
        "id": item.raw_id if item.raw_id is not None else item.id,
        "messages": list(item.messages),
    }
    if item.reference is not None:
        record["reference"] = item.reference
    record.update(
        {
            "reward_model": body.get("reward_model"),
            "best_of": best_of,
            "candidates": candidates,
            "selected_index": selected["index"],
            "selected_answer": body.get("selected_answer", selected["answer"]),
        }
    )
    if body.get("vote_share") is not None:
        record["vote_share"] = body["vote_share"]
    if item.reference is not None:
        first = min(candidates, key=lambda c: c["index"])
        record["correct"] = selected["correct"]
        record["first_correct"] = first["correct"]
        record["oracle_correct"] = any(c["correct"] for c in candidates)
    record["dropped"] = int(body.get("candidates_dropped") or 0)
    usage = body.get("usage") or {}
    record["usage"] = {
        k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens") if k in usage
    }
    record["seconds"] = round(seconds, 4)
    return record


def error_record(row_id: Any, error: BaseException | str, *, attempts: int, seconds: float) -> dict[str, Any]:
    """A line of the errors file: which row failed, how, after how many tries. No prompt text."""
    if isinstance(error, BaseException):
        kind, message = type(error).__name__, str(error) or type(error).__name__
    else:
        kind, message = "RowError", error
    return {
        "id": row_id,
        "error": kind,
        "message": message[:2000],
        "attempts": attempts,
        "seconds": round(seconds, 4),
    }
