"""Pure selection logic: rank scored candidates, optionally voting on final answers. No I/O.

Order of `select(...).ranked` (and so `rank`, 1 = best):
- argmax: by reward, best first (NaN last), ties by candidate index.
- weighted_vote / majority_vote: the winning answer's candidates first, by
  reward; then every other candidate, by reward. The first is the selected one.

`vote_share` is the share of all candidates whose answer is the winning one,
for both votes. A share of reward mass would be undefined for raw reward-model
logits, which are often negative; the count share always lies in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bon_gateway.engine.answers import answers_equivalent, extract_answer
from bon_gateway.types import SELECTIONS, ScoredCandidate, Selection

__all__ = ["SelectionResult", "group_by_answer", "rank_argmax", "select"]


@dataclass(slots=True)
class SelectionResult:
    """Candidates ranked best first, with the winning answer of a vote."""

    ranked: list[ScoredCandidate]
    selected_answer: str | None = None
    vote_share: float | None = None  # None for argmax and when no candidate has an answer

    @property
    def selected(self) -> ScoredCandidate:
        return self.ranked[0]


def rank_argmax(candidates: Sequence[ScoredCandidate]) -> list[ScoredCandidate]:
    """Best reward first; ties keep generation order. Sets `rank` (1 = best)."""
    # A NaN reward (a broken head) must rank last, not poison the sort.
    ranked = sorted(candidates, key=lambda c: (-c.reward if not math.isnan(c.reward) else math.inf, c.index))
    for position, candidate in enumerate(ranked, start=1):
        candidate.rank = position
    return ranked


def select(candidates: Sequence[ScoredCandidate], selection: Selection = "argmax") -> SelectionResult:
    """Rank candidates by `selection`; fills each candidate's `answer` (if unset) and `rank`.

    weighted_vote: the answer whose candidates' rewards sum highest wins (NaN
    rewards add nothing; ties by candidate count, then the earliest index).
    majority_vote: the answer most candidates give wins (ties by summed reward,
    then the earliest index). Either way the winner's best-reward candidate is
    selected. Candidates without an answer never win a vote; when none has an
    answer, the vote falls back to argmax.
    """
    if not candidates:
        raise ValueError("cannot select from an empty list of candidates")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; expected one of {', '.join(SELECTIONS)}")
    for candidate in candidates:
        if candidate.answer is None:
            candidate.answer = extract_answer(candidate.text)
    if selection == "argmax":
        ranked = rank_argmax(candidates)
        return SelectionResult(ranked, ranked[0].answer)

    groups = group_by_answer(candidates)
    if not groups:
        return SelectionResult(rank_argmax(candidates))

    def weighted(group: list[ScoredCandidate]) -> tuple[float, int, int]:
        return (_reward_mass(group), len(group), -min(c.index for c in group))

    def majority(group: list[ScoredCandidate]) -> tuple[int, float, int]:
        return (len(group), _reward_mass(group), -min(c.index for c in group))

    winner = max(groups, key=weighted) if selection == "weighted_vote" else max(groups, key=majority)
    in_winner = {id(c) for c in winner}
    ranked = rank_argmax(winner) + rank_argmax([c for c in candidates if id(c) not in in_winner])
    for position, candidate in enumerate(ranked, start=1):
        candidate.rank = position
    return SelectionResult(ranked, ranked[0].answer, len(winner) / len(candidates))


def group_by_answer(
    candidates: Sequence[ScoredCandidate],
    equivalent: Callable[[str | None, str | None], bool] = answers_equivalent,
) -> list[list[ScoredCandidate]]:
    """Candidates with equivalent `answer`s, in first-seen order; no-answer candidates are left out.

    Each candidate is compared with one representative per group (the group's
    first answer), so at most groups x candidates equivalence checks; equal
    strings join without any.
    """
    groups: list[list[ScoredCandidate]] = []
    by_text: dict[str, list[ScoredCandidate]] = {}
    for candidate in candidates:
        answer = candidate.answer
        if answer is None:
            continue
        group = by_text.get(answer)
        if group is None:
            group = next((g for g in groups if equivalent(g[0].answer, answer)), None)
            if group is None:
                group = []
                groups.append(group)
            by_text[answer] = group
        group.append(candidate)
    return groups


def _reward_mass(group: Sequence[ScoredCandidate]) -> float:
    total = sum(c.reward for c in group if not math.isnan(c.reward))
    # inf + -inf: no meaningful mass; rank such a group below every finite one.
    return -math.inf if math.isnan(total) else total
