"""The SSE decoder and the event JSON decoding, against the plain implementations they
replace: the same events and the same values (or errors) for any bytes, however the
stream is cut into chunks."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bon_gateway.generation.sse import DONE, SseDecoder, event_json


class LineByLineDecoder:
    """The decoder as it was written first: one line at a time, sliced off the buffer."""

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
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

    def close(self) -> list[str]:
        return self.feed(b"\n\n") if self._buffer or self._data else []


def _decode(decoder: Any, chunks: list[bytes]) -> tuple[list[str], int]:
    events: list[str] = []
    buffered = 0
    for chunk in chunks:
        events += decoder.feed(chunk)
        buffered = max(buffered, len(decoder._buffer))
    return events + decoder.close(), buffered


def _cut(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(stream)) for c in cuts})
    return [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]


# Pieces of real streams and of hostile ones: CRLF, bare CR, comments, other fields,
# multi-line data, no space after the colon, broken UTF-8, [DONE].
PIECES = st.sampled_from(
    [
        b"data: ",
        b"data:",
        b'{"a": 1}',
        b"\n",
        b"\r\n",
        b"\r",
        b"\n\n",
        b": keep-alive\n",
        b"event: x\n",
        b"id: 3\n",
        b"data: [DONE]\n\n",
        b"\xe2\x82",
        b"\xac",
        b"\xff",
        b" ",
        "é".encode(),
        b"dat",
        b"a: ",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(PIECES, max_size=30), st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_the_decoder_gives_what_line_by_line_decoding_gives(pieces: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(pieces)
    chunks = _cut(stream, cuts)
    assert _decode(SseDecoder(), chunks) == _decode(LineByLineDecoder(), chunks)


def test_a_vllm_stream_in_one_chunk() -> None:
    stream = b'data: {"x":1}\n\ndata: {"x":2}\r\n\r\n: ping\n\ndata: [DONE]\n\n'
    decoder = SseDecoder()
    assert decoder.feed(stream) == ['{"x":1}', '{"x":2}', DONE]
    assert decoder.buffered == 0 and decoder.close() == []


@pytest.mark.parametrize(
    "text",
    [
        '{"choices":[{"index":0,"delta":{"content":"hi"}}]}',
        ' {"a":1}',
        '{"a":1} ',
        '{"a":1}\n',
        '{"a":1}{"b":2}',
        '{"a":1',
        '{"a":"\\ud800"}',
        "\ufeff{}",
        "",
        "[DONE]",
        "NaN",
        "1e999",
        '"text"',
        "[" * 100_000,
    ],
)
def test_event_json_is_json_loads(text: str) -> None:
    try:
        expected: Any = json.loads(text)
    except (ValueError, RecursionError) as err:
        with pytest.raises(type(err)) as raised:
            event_json(text)
        assert str(raised.value) == str(err)
    else:
        got = event_json(text)
        assert got == expected or (got != got and expected != expected)  # NaN
