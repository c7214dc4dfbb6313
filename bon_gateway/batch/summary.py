"""Figures of a batch output file: accuracy of the selected vs the first vs any
candidate, reward gain over the first candidate, accuracy vs N. Pure (no I/O).

Accuracy vs N is read off one run at best_of = N_max: for each k, the first k
candidates in generation order stand in for a Best-of-k run (argmax of their
rewards; majority = the most frequent extracted answer, by string; oracle =
any right). Sampling is i.i.d. per candidate, so a prefix is a fair Best-of-k.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchFigures", "accuracy_vs_n", "compute_figures"]


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


@dataclass(slots=True)
class BatchFigures:
    """Everything the summary and the report show, over all rows of an output file."""

    rows: int = 0
    candidates: int = 0
    with_reference: int = 0
    correct_selected: int = 0
    correct_first: int = 0
    correct_oracle: int = 0
    selected_rewards: list[float] = field(default_factory=list)
    first_rewards: list[float] = field(default_factory=list)
    all_rewards: list[float] = field(default_factory=list)
    gains: list[float] = field(default_factory=list)  # selected reward - first candidate's reward
    completion_tokens: int = 0
    # k -> (best-of-k accuracy, majority@k accuracy, oracle@k accuracy)
    by_n: dict[int, tuple[float, float, float]] = field(default_factory=dict)

    def accuracy(self, count: int) -> float | None:
        return count / self.with_reference if self.with_reference else None

    def as_dict(self) -> dict[str, Any]:
        def mean(values: Sequence[float]) -> float | None:
            return sum(values) / len(values) if values else None

        return {
            "rows": self.rows,
            "candidates": self.candidates,
            "rows_with_reference": self.with_reference,
            "accuracy_selected": self.accuracy(self.correct_selected),
            "accuracy_first": self.accuracy(self.correct_first),
            "accuracy_oracle": self.accuracy(self.correct_oracle),
            "mean_reward_selected": mean(self.selected_rewards),
            "mean_reward_first": mean(self.first_rewards),
            "mean_gain_over_first": mean(self.gains),
            "completion_tokens": self.completion_tokens,
            "accuracy_vs_n": {
                str(k): {"best_of_k": a, "majority_at_k": m, "oracle_at_k": o}
                for k, (a, m, o) in self.by_n.items()
            },
        }


def compute_figures(rows: Iterable[dict[str, Any]]) -> BatchFigures:
    """Figures over result rows (as written by the batch runner)."""
    figures = BatchFigures()
    with_ref: list[list[dict[str, Any]]] = []
    for row in rows:
        candidates = row.get("candidates") or []
        if not candidates:
            continue
        figures.rows += 1
        figures.candidates += len(candidates)
        figures.completion_tokens += int((row.get("usage") or {}).get("completion_tokens") or 0)
        selected = min(candidates, key=lambda c: c.get("rank", 0))
        first = min(candidates, key=lambda c: c.get("index", 0))
        figures.all_rewards.extend(r for r in (_finite(c.get("reward")) for c in candidates) if r is not None)
        best, one = _finite(selected.get("reward")), _finite(first.get("reward"))
        if best is not None and one is not None:
            figures.selected_rewards.append(best)
            figures.first_rewards.append(one)
            figures.gains.append(best - one)
        if "correct" in row:
            figures.with_reference += 1
            figures.correct_selected += bool(row.get("correct"))
            figures.correct_first += bool(row.get("first_correct"))
            figures.correct_oracle += bool(row.get("oracle_correct"))
            with_ref.append(sorted(candidates, key=lambda c: c.get("index", 0)))
    figures.by_n = accuracy_vs_n(with_ref)
    return figures


def _argmax(candidates: Sequence[dict[str, Any]]) -> dict[str, Any]:
    # Ties go to the earlier candidate; a missing/NaN reward never wins.
    return max(reversed(candidates), key=lambda c: _finite(c.get("reward")) or -math.inf)


def _majority(candidates: Sequence[dict[str, Any]]) -> bool:
    answers = Counter(c.get("answer") for c in candidates if c.get("answer") is not None)
    if not answers:
        return False
    top = max(answers.values())
    # Ties: the answer seen first in generation order, like the gateway's vote.
    winner = next(c.get("answer") for c in candidates if answers.get(c.get("answer")) == top)
    return any(bool(c.get("correct")) for c in candidates if c.get("answer") == winner)


def accuracy_vs_n(rows: Sequence[Sequence[dict[str, Any]]]) -> dict[int, tuple[float, float, float]]:
    """k -> (best-of-k, majority@k, oracle@k) accuracy over rows of candidates in generation order."""
    if not rows:
        return {}
    max_n = max(len(r) for r in rows)
    out: dict[int, tuple[float, float, float]] = {}
    for k in range(1, max_n + 1):
        usable = [r[:k] for r in rows if len(r) >= k]
        if not usable:
            break
        best = sum(bool(_argmax(r).get("correct")) for r in usable)
        majority = sum(_majority(r) for r in usable)
        oracle = sum(any(bool(c.get("correct")) for c in r) for r in usable)
        out[k] = (best / len(usable), majority / len(usable), oracle / len(usable))
    return out
