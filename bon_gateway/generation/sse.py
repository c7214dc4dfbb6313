"""Server-sent events as OpenAI-compatible servers stream them: pure parsing, no I/O.

Each event's `data:` lines are joined; comments (`:`) and other fields are
skipped; `data: [DONE]` ends the stream. vLLM, SGLang and llama.cpp send one
JSON object per event (`event_json`); `transformers serve` ends without
`[DONE]` (EOF then).

Every upstream call is a stream and every token an event, so both run per
chunk: a chunk's complete lines are split off in one pass (not sliced off the
buffer line by line), and only a data line's value is decoded.
"""

from __future__ import annotations

import json
from json.scanner import make_scanner
from typing import Any, cast

__all__ = ["DONE", "SseDecoder", "event_json"]

DONE = "[DONE]"

# The C scanner json.loads itself calls, without json.loads' Python layers around it.
_SCAN_ONCE = make_scanner(cast(Any, json.JSONDecoder()))


def event_json(text: str) -> Any:
    """`json.loads(text)`: the same value, or the same error (ValueError), but cheaper for
    an event's data, which is one JSON value with nothing around it."""
    try:
        value, end = _SCAN_ONCE(text, 0)
    except StopIteration:
        return json.loads(text)  # leading whitespace, or not JSON: json.loads says which
    if end != len(text):
        return json.loads(text)  # trailing whitespace, or extra data
    return value


class SseDecoder:
    """Feed it raw bytes as they arrive; it returns each complete event's data."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """The data of every event completed by `chunk` (a blank line ends an event)."""
        lines = (self._buffer + chunk).split(b"\n")
        self._buffer = lines.pop()  # the unfinished line: b"" after a newline
        events: list[str] = []
        data = self._data
        for raw in lines:
            line = raw.rstrip(b"\r")
            if not line:
                if data:
                    events.append("\n".join(data))
                    data = self._data = []
            elif line.startswith(b"data:"):
                # "data:" is ASCII: decoding the value alone gives what decoding the line would.
                value = line[6:] if line.startswith(b"data: ") else line[5:]
                data.append(value.decode("utf-8", errors="replace"))
            # Comments (":") and fields other than data (event:, id:, retry:) say nothing we use.
        return events

    def close(self) -> list[str]:
        """At EOF: an event the server did not end with a blank line still counts."""
        tail = self.feed(b"\n\n") if self._buffer or self._data else []
        return tail

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished line (bounded by the caller against a line-length limit)."""
        return len(self._buffer)
