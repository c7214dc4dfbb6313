"""Pure selection logic: rank scored candidates. No I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence

from bon_gateway.types import ScoredCandidate


def rank_argmax(candidates: Sequence[ScoredCandidate]) -> list[ScoredCandidate]:
    """Best reward first; ties keep generation order. Sets `rank` (1 = best)."""
    # A NaN reward (a broken head) must rank last, not poison the sort.
    ranked = sorted(candidates, key=lambda c: (-c.reward if not math.isnan(c.reward) else math.inf, c.index))
    for position, candidate in enumerate(ranked, start=1):
        candidate.rank = position
    return ranked
