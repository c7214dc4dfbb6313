"""Speculative rejection's decision at a checkpoint: pure, no I/O.

At each checkpoint the candidates still in the race (live ones scored on
their partial text, finished ones on their whole text) are ranked by reward
and the lowest `rate` fraction is rejected (Sun et al. 2024, "Fast Best-of-N
Decoding via Speculative Rejection", arXiv 2410.20290). At least `keep`
candidates always survive (the choices the client asked for).

Per candidate (the default), a checkpoint cannot wait for everyone: a candidate
reaching it is judged against the rewards seen there so far, by the same rule
applied to that growing field: it is rejected when it is among the
floor(rate * m) lowest of the m candidates judged there, itself included
(`rejected_on_arrival`). With everyone arrived that is the round's rule; before,
it is the rate-quantile of the rewards seen so far.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["rejected_at_checkpoint", "rejected_on_arrival"]


def rejected_at_checkpoint(rewards: Mapping[int, float], rate: float, keep: int = 1) -> list[int]:
    """The candidates (by index) to reject: the floor(rate * len) lowest rewards, keeping `keep`.

    Ties are broken by index (the later candidate goes first), so the decision
    is deterministic; a NaN reward ranks lowest.
    """
    count = len(rewards)
    reject = min(math.floor(rate * count + 1e-9), max(0, count - max(1, keep)))
    if reject <= 0:
        return []

    def key(index: int) -> tuple[float, int]:
        reward = rewards[index]
        return (-math.inf if math.isnan(reward) else reward, -index)

    return sorted(sorted(rewards, key=key)[:reject])


def rejected_on_arrival(judged: Mapping[int, float], index: int, rate: float) -> bool:
    """Whether `index`, the latest of `judged` (the rewards seen at a checkpoint so far),
    is among the floor(rate * len) lowest: the checkpoint's rule on the field so far."""
    return index in rejected_at_checkpoint(judged, rate, keep=1)
