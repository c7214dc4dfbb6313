"""Reasoning steps for process reward models: aggregation (splitting lives in the
leaf `bon_gateway.steps`, re-exported here). No I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence

from bon_gateway.steps import DEFAULT_STEP_DELIMITER, split_steps
from bon_gateway.types import AGGREGATIONS, Aggregation

__all__ = ["DEFAULT_STEP_DELIMITER", "aggregate_steps", "split_steps"]


def aggregate_steps(step_rewards: Sequence[float], how: Aggregation = "last") -> float:
    """One reward for a candidate from its per-step rewards: last, min, prod or mean.

    A NaN step reward makes min, prod and mean NaN (Python's min would
    otherwise depend on where the NaN sits); `last` looks at the last step only.
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; expected one of {', '.join(AGGREGATIONS)}")
    if not step_rewards:
        raise ValueError("cannot aggregate an empty list of step rewards")
    rewards = [float(r) for r in step_rewards]
    if how == "last":
        return rewards[-1]
    if any(math.isnan(r) for r in rewards):
        return math.nan
    if how == "min":
        return min(rewards)
    if how == "prod":
        return math.prod(rewards)
    # Plain sum: math.fsum raises on inf + -inf and on overflow.
    return sum(rewards) / len(rewards)
