"""Which live texts to send ahead to the scoring group (best-of-N, `prefill_every`): pure logic."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["CALL_SHARE", "texts_to_send_ahead"]

# A call that sends texts ahead carries at most this many times prefill_every new tokens
# (at least one text): short enough that a candidate finishing meanwhile waits little.
CALL_SHARE = 4


def texts_to_send_ahead(grown: Iterable[tuple[int, int]], every: int) -> list[int]:
    """Of (index, tokens not yet sent) of the live candidates, those to send now: the ones
    grown by at least `every` tokens, most grown first (ties: lower index), until the call
    would carry more than CALL_SHARE * every new tokens."""
    due = sorted(((new, index) for index, new in grown if new >= every), key=lambda d: (-d[0], d[1]))
    chosen: list[int] = []
    total = 0
    for new, index in due:
        if chosen and total + new > CALL_SHARE * every:
            break
        chosen.append(index)
        total += new
    return chosen
