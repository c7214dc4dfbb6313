"""Splitting a solution into reasoning steps (process reward models). No I/O.

A leaf module: the engine (aggregation, voting) and the torch worker (PRM inputs)
both split steps, and the worker must not import the engine.
"""

from __future__ import annotations

__all__ = ["DEFAULT_STEP_DELIMITER", "split_steps"]

DEFAULT_STEP_DELIMITER = "\n\n"


def split_steps(text: str, delimiter: str = DEFAULT_STEP_DELIMITER) -> list[str]:
    """Steps of a solution: split on `delimiter`, stripped, empty ones dropped."""
    if not delimiter:
        raise ValueError("the step delimiter must be a non-empty string")
    return [step.strip() for step in text.split(delimiter) if step.strip()]
