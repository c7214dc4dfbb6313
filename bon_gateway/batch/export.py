"""Training data from batch results: preference pairs and PRM step labels. Pure (no I/O).

Preference pairs follow TRL's conversational preference format, which TRL's
DPOTrainer and RewardTrainer and axolotl's `bradley_terry.chat_template` read:

    {"prompt": [{"role": "user", "content": ...}],
     "chosen": [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}]}

plus `id` (always a string, so a JSON loader infers one column type),
`chosen_reward` and `rejected_reward`: extra columns the trainers ignore.

Step labels follow TRL's stepwise-supervision format (PRMTrainer):

    {"prompt": str, "completions": [step, ...], "labels": [bool, ...]}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from bon_gateway.engine.steps import DEFAULT_STEP_DELIMITER, split_steps

__all__ = ["ExportCounts", "PairsMode", "preference_pairs", "step_label_rows"]

PairsMode = Literal["best-worst", "all"]


@dataclass(slots=True)
class ExportCounts:
    """Why rows produced no training data (reported in the summary)."""

    rows: int = 0
    written: int = 0
    skipped_ties: int = 0  # every candidate has the same reward (or fewer than two usable)
    skipped_no_steps: int = 0  # no step rewards, or steps that do not line up with them


def _usable(candidates: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Candidates with a finite reward and some text: NaN or empty ones teach nothing."""
    return [
        c
        for c in candidates
        if isinstance(c.get("reward"), (int, float))
        and math.isfinite(c["reward"])
        and str(c.get("text", "")).strip()
    ]


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def preference_pairs(
    rows: Iterable[dict[str, Any]],
    *,
    mode: PairsMode = "best-worst",
    margin: float = 0.0,
    counts: ExportCounts | None = None,
) -> Iterator[dict[str, Any]]:
    """Chosen/rejected pairs from result rows.

    chosen = the selected candidate (rank 1: the argmax, or the vote winner's best).
    best-worst: one pair per row, rejected = the lowest-reward candidate.
    all: one pair per candidate whose reward is below the chosen one's by >= `margin`.
    A pair needs a reward gap > 0 and >= `margin` and two different texts; a row
    whose candidates all tie gives none.
    """
    counts = counts if counts is not None else ExportCounts()
    for row in rows:
        counts.rows += 1
        candidates = _usable(row.get("candidates") or ())
        if len(candidates) < 2:
            counts.skipped_ties += 1
            continue
        chosen = min(candidates, key=lambda c: (c.get("rank", 0), c.get("index", 0)))
        others = sorted(
            (c for c in candidates if c is not chosen), key=lambda c: (c["reward"], c.get("index", 0))
        )
        rejected = others[:1] if mode == "best-worst" else others
        emitted = 0
        for loser in rejected:
            gap = float(chosen["reward"]) - float(loser["reward"])
            if gap <= 0 or gap < margin or loser["text"] == chosen["text"]:
                continue
            pair: dict[str, Any] = {
                "id": str(row.get("id")),
                "prompt": [dict(m) for m in row.get("messages") or ()],
                "chosen": _assistant(chosen["text"]),
                "rejected": _assistant(loser["text"]),
                "chosen_reward": chosen["reward"],
                "rejected_reward": loser["reward"],
            }
            emitted += 1
            yield pair
        if emitted:
            counts.written += emitted
        else:
            counts.skipped_ties += 1


def _question(messages: Iterable[dict[str, Any]]) -> str:
    """TRL's stepwise `prompt` is a string: the last user turn."""
    users = [str(m.get("content", "")) for m in messages if m.get("role") == "user"]
    return users[-1] if users else ""


def step_label_rows(
    rows: Iterable[dict[str, Any]],
    *,
    threshold: float = 0.5,
    delimiter: str = DEFAULT_STEP_DELIMITER,
    counts: ExportCounts | None = None,
) -> Iterator[dict[str, Any]]:
    """One stepwise row per PRM-scored candidate: label = step reward >= `threshold`.

    Steps are the candidate split on `delimiter` (the reward model's, as the
    worker split it); a candidate whose step count differs from its step
    rewards is skipped rather than mislabelled.
    """
    counts = counts if counts is not None else ExportCounts()
    for row in rows:
        counts.rows += 1
        prompt = _question(row.get("messages") or ())
        for candidate in row.get("candidates") or ():
            rewards = candidate.get("step_rewards") or []
            steps = split_steps(str(candidate.get("text", "")), delimiter)
            if (
                not rewards
                or len(steps) != len(rewards)
                or any(not isinstance(r, (int, float)) or math.isnan(r) for r in rewards)
            ):
                counts.skipped_no_steps += 1
                continue
            counts.written += 1
            yield {
                "id": str(row.get("id")),
                "candidate": candidate.get("index"),
                "prompt": prompt,
                "completions": steps,
                "labels": [float(r) >= threshold for r in rewards],
            }
