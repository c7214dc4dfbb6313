"""Input rows of a batch job: parsing and validation. No I/O beyond what the caller reads.

Accepted shapes, one JSON object per line:

- ``{"id": ..., "messages": [{"role", "content"}, ...], "reference": ...}``
- ``{"id": ..., "prompt": "...", "reference": ...}`` (the prompt becomes one user message)
- GSM8K ``{"question": "...", "answer": "... #### 18"}``: the question becomes one user
  message and the reference is the text after ``####``.

A row without ``id`` gets ``line-<n>`` (its 1-based line number in the input), which stays
stable across resumed runs as long as the input file is not edited.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from bon_gateway.engine.answers import extract_answer, normalize_answer

__all__ = ["BatchItem", "InputFormat", "RowError", "gsm8k_reference", "parse_row", "read_items"]

InputFormat = Literal["auto", "chat", "gsm8k"]

_ROLES = frozenset({"system", "user", "assistant", "developer", "tool"})


class RowError(ValueError):
    """An input row that cannot be run; recorded as a failure, never fatal."""

    def __init__(self, row_id: str, message: str) -> None:
        super().__init__(message)
        self.row_id = row_id
        self.message = message


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One prompt to run: what the gateway is asked and what its answers are checked against."""

    id: str
    messages: tuple[dict[str, str], ...]
    reference: str | None = None
    # The row's id exactly as the input gave it (int or str), echoed in the output.
    raw_id: Any = None


def gsm8k_reference(answer: str) -> str | None:
    """The final answer of a GSM8K solution: the text after its last "####", normalised."""
    if "####" not in answer:
        return None
    lines = answer.rsplit("####", 1)[1].strip().splitlines()
    return (normalize_answer(lines[0]) or None) if lines else None


def _reference(value: Any, row_id: str) -> str | None:
    """A reference answer; full solutions ("... #### 18", "\\boxed{18}") are reduced to their answer."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowError(row_id, "reference must be a string or a number")
    text = str(value).strip()
    if not text:
        return None
    if "####" in text or "\\boxed" in text or "\\fbox" in text:
        # A worked solution was given as the reference: keep only its final answer.
        return extract_answer(text)
    return normalize_answer(text) or text


def _messages(value: Any, row_id: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise RowError(row_id, "messages must be a non-empty list")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise RowError(row_id, f"messages[{i}] must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise RowError(row_id, f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}")
        if not isinstance(content, str):
            raise RowError(row_id, f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return tuple(out)


def _row_id(row: dict[str, Any], line_no: int) -> tuple[str, Any]:
    raw = row.get("id")
    if raw is None:
        return f"line-{line_no}", f"line-{line_no}"
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise RowError(f"line-{line_no}", "id must be a string or an integer")
    return str(raw), raw


def parse_row(row: Any, line_no: int, input_format: InputFormat = "auto") -> BatchItem:
    """One BatchItem from a decoded JSON row; RowError names what is wrong."""
    if not isinstance(row, dict):
        raise RowError(f"line-{line_no}", "a row must be a JSON object")
    row_id, raw_id = _row_id(row, line_no)
    is_gsm8k = input_format == "gsm8k" or (
        input_format == "auto" and "question" in row and "messages" not in row and "prompt" not in row
    )
    if is_gsm8k:
        question, answer = row.get("question"), row.get("answer")
        if not isinstance(question, str) or not question.strip():
            raise RowError(row_id, "question must be a non-empty string")
        reference = row.get("reference")
        if reference is None and isinstance(answer, str):
            reference = gsm8k_reference(answer)
        return BatchItem(
            id=row_id,
            messages=({"role": "user", "content": question},),
            reference=_reference(reference, row_id),
            raw_id=raw_id,
        )
    if "messages" in row:
        messages = _messages(row["messages"], row_id)
    elif isinstance(row.get("prompt"), str) and row["prompt"].strip():
        messages = ({"role": "user", "content": row["prompt"]},)
    else:
        raise RowError(row_id, 'a row needs "messages" (a list) or "prompt" (a string)')
    return BatchItem(
        id=row_id, messages=messages, reference=_reference(row.get("reference"), row_id), raw_id=raw_id
    )


def read_items(
    path: Path, input_format: InputFormat = "auto", *, limit: int | None = None
) -> Iterator[BatchItem | RowError]:
    """Every row of a JSONL file, in order: a BatchItem, or the RowError that rejects it.

    Blank lines are skipped (they keep their line number). `limit` stops after that many rows.
    """
    count = 0
    with path.open("r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if limit is not None and count >= limit:
                return
            if not line.strip():
                continue
            count += 1
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                yield RowError(f"line-{line_no}", f"invalid JSON: {err.msg}")
                continue
            try:
                yield parse_row(row, line_no, input_format)
            except RowError as err:
                yield err
