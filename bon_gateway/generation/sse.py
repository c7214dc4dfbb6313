"""Server-sent events as OpenAI-compatible servers stream them: pure parsing, no I/O.

Each event's `data:` lines are joined; comments (`:`) and other fields are
skipped; `data: [DONE]` ends the stream. vLLM, SGLang and llama.cpp send one
JSON object per event; `transformers serve` ends without `[DONE]` (EOF then).
"""

from __future__ import annotations

__all__ = ["DONE", "SseDecoder"]

DONE = "[DONE]"


class SseDecoder:
    """Feed it raw bytes as they arrive; it returns each complete event's data."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """The data of every event completed by `chunk` (a blank line ends an event)."""
        self._buffer += chunk
        events: list[str] = []
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                return events
            line = self._buffer[:end].rstrip(b"\r").decode("utf-8", errors="replace")
            self._buffer = self._buffer[end + 1 :]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
            elif line.startswith("data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(" ") else value)
            # Comments (":") and fields other than data (event:, id:, retry:) say nothing we use.

    def close(self) -> list[str]:
        """At EOF: an event the server did not end with a blank line still counts."""
        tail = self.feed(b"\n\n") if self._buffer or self._data else []
        return tail

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished line (bounded by the caller against a line-length limit)."""
        return len(self._buffer)
