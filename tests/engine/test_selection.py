"""argmax, weighted_vote and majority_vote over scored candidates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bon_gateway.engine.answers import answers_equivalent
from bon_gateway.engine.selection import group_by_answer, rank_argmax, select
from bon_gateway.types import ScoredCandidate


def cands(*pairs: tuple[str, float]) -> list[ScoredCandidate]:
    """Candidates from (text, reward) pairs, indexed in order."""
    return [ScoredCandidate(index=i, text=text, reward=reward) for i, (text, reward) in enumerate(pairs)]


def order(ranked: Sequence[ScoredCandidate]) -> list[int]:
    return [c.index for c in ranked]


def assert_ranks_match_order(ranked: Sequence[ScoredCandidate]) -> None:
    assert [c.rank for c in ranked] == list(range(1, len(ranked) + 1))


def test_argmax_ranks_by_reward_and_reports_answers() -> None:
    candidates = cands(("\\boxed{5}", 0.2), ("A: 6", 0.9), ("no answer", 0.5))
    result = select(candidates, "argmax")
    assert order(result.ranked) == [1, 2, 0]
    assert_ranks_match_order(result.ranked)
    assert result.selected.index == 1
    assert [c.answer for c in candidates] == ["5", "6", None]
    assert result.selected_answer == "6"
    assert result.vote_share is None


def test_select_defaults_to_argmax_and_matches_rank_argmax() -> None:
    a = cands(("1", 0.1), ("2", math.nan), ("3", 0.1), ("4", 0.3))
    b = cands(("1", 0.1), ("2", math.nan), ("3", 0.1), ("4", 0.3))
    assert order(select(a).ranked) == order(rank_argmax(b)) == [3, 0, 2, 1]


def test_weighted_vote_sums_rewards_of_equivalent_answers() -> None:
    candidates = cands(
        ("so \\boxed{0.5}", 0.4),
        ("A: 6", 0.7),
        ("\\boxed{\\frac{1}{2}}", 0.45),  # the same answer as candidate 0
        ("nothing", 0.99),
    )
    result = select(candidates, "weighted_vote")
    # 0.4 + 0.45 = 0.85 beats 0.7; the group's best candidate is selected.
    assert order(result.ranked) == [2, 0, 3, 1]
    assert_ranks_match_order(result.ranked)
    assert result.selected.index == 2
    assert result.selected_answer == "\\frac{1}{2}"
    assert result.vote_share == pytest.approx(2 / 4)


def test_weighted_vote_single_high_reward_beats_many_low() -> None:
    result = select(cands(("A: 1", 0.1), ("A: 1", 0.1), ("A: 1", 0.1), ("A: 2", 0.5)), "weighted_vote")
    assert result.selected.index == 3
    assert result.selected_answer == "2"
    assert result.vote_share == pytest.approx(1 / 4)
    assert order(result.ranked) == [3, 0, 1, 2]


def test_weighted_vote_sums_raw_negative_logits_as_they_are() -> None:
    # Documented: rewards are summed as given, so with negative logits more
    # votes weigh less; use probabilities (PRMs, activation) for weighted_vote.
    result = select(cands(("A: 1", -1.0), ("A: 1", -1.0), ("A: 2", -0.5)), "weighted_vote")
    assert result.selected_answer == "2"


def test_weighted_vote_ties_go_to_the_larger_group_then_the_earliest() -> None:
    result = select(cands(("A: 1", 0.5), ("A: 2", 0.25), ("A: 2", 0.25)), "weighted_vote")
    assert result.selected_answer == "2"
    assert result.selected.index == 1
    result = select(cands(("A: 3", 0.5), ("A: 4", 0.5)), "weighted_vote")
    assert result.selected.index == 0


def test_majority_vote_counts_then_sums_then_takes_the_earliest() -> None:
    # 2 votes beat 1 whatever the rewards
    result = select(cands(("A: 7", 0.1), ("A: 8", 0.9), ("A: 7.0", 0.2)), "majority_vote")
    assert result.selected_answer == "7.0"
    assert result.selected.index == 2
    assert order(result.ranked) == [2, 0, 1]
    assert result.vote_share == pytest.approx(2 / 3)
    # 2-2: the larger summed reward wins
    result = select(cands(("A: 1", 0.5), ("A: 2", 0.4), ("A: 1", 0.0), ("A: 2", 0.4)), "majority_vote")
    assert result.selected_answer == "2"
    assert order(result.ranked) == [1, 3, 0, 2]
    # 2-2 with equal sums: the group that appears first wins
    result = select(cands(("A: 2", 0.0), ("A: 1", 0.3), ("A: 1", 0.3), ("A: 2", 0.6)), "majority_vote")
    assert result.selected_answer == "2"
    assert result.selected.index == 3
    # all different, equal rewards: the earliest candidate
    result = select(cands(("A: 4", 1.0), ("A: 3", 1.0), ("A: 2", 1.0)), "majority_vote")
    assert result.selected.index == 0
    assert result.vote_share == pytest.approx(1 / 3)


def test_candidates_without_an_answer_never_win_a_vote() -> None:
    candidates = cands(("I do not know", 10.0), ("A: 3", -1.0), ("unsure", 9.0))
    for selection in ("weighted_vote", "majority_vote"):
        result = select(candidates, selection)
        assert order(result.ranked) == [1, 0, 2]
        assert result.selected_answer == "3"
        assert result.vote_share == pytest.approx(1 / 3)


def test_vote_with_no_answers_at_all_falls_back_to_argmax() -> None:
    candidates = cands(("no idea", 0.2), ("still none", 0.8))
    for selection in ("weighted_vote", "majority_vote"):
        result = select(candidates, selection)
        assert order(result.ranked) == [1, 0]
        assert_ranks_match_order(result.ranked)
        assert result.selected_answer is None
        assert result.vote_share is None


def test_nan_rewards() -> None:
    # NaN adds no mass to a weighted vote and ranks last within its group...
    candidates = cands(("A: 1", math.nan), ("A: 1", 0.3), ("A: 2", 0.5))
    result = select(candidates, "weighted_vote")
    assert result.selected_answer == "2"
    assert order(result.ranked) == [2, 1, 0]
    # ...but is still a vote in a count.
    result = select(cands(("A: 1", math.nan), ("A: 1", 0.3), ("A: 2", 0.5)), "majority_vote")
    assert result.selected_answer == "1"
    assert order(result.ranked) == [1, 0, 2]
    # all NaN: nothing breaks
    result = select(cands(("A: 1", math.nan), ("A: 2", math.nan)), "weighted_vote")
    assert result.selected.index == 0
    result = select(cands(("A: 1", math.inf), ("A: 1", -math.inf), ("A: 2", 0.0)), "weighted_vote")
    assert result.selected_answer == "2"


@pytest.mark.parametrize("selection", ["argmax", "weighted_vote", "majority_vote"])
def test_single_candidate(selection: str) -> None:
    result = select(cands(("The answer is 42.", -3.0)), selection)  # type: ignore[arg-type]
    assert order(result.ranked) == [0]
    assert result.selected.rank == 1
    assert result.selected_answer == "42"
    assert result.vote_share == (None if selection == "argmax" else 1.0)


def test_a_preset_answer_is_kept() -> None:
    candidates = cands(("A: 1", 0.1), ("A: 2", 0.2))
    candidates[0].answer = "2"  # e.g. parsed upstream
    result = select(candidates, "majority_vote")
    assert result.selected_answer == "2"
    assert result.vote_share == 1.0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="empty list of candidates"):
        select([], "argmax")
    with pytest.raises(ValueError, match="unknown selection 'best'"):
        select(cands(("A: 1", 0.0)), "best")  # type: ignore[arg-type]


def test_grouping_needs_at_most_groups_times_candidates_comparisons() -> None:
    calls = 0

    def counting(a: str | None, b: str | None) -> bool:
        nonlocal calls
        calls += 1
        return answers_equivalent(a, b)

    answers = [str(i % 5) for i in range(40)] + ["5.0", "5", "4.00"]
    candidates = [ScoredCandidate(i, "", 0.0, answer=a) for i, a in enumerate(answers)]
    groups = group_by_answer(candidates, equivalent=counting)
    assert [len(g) for g in groups] == [8, 8, 8, 8, 9, 2]
    assert groups[4][-1].answer == "4.00"
    # Equal strings join without a comparison: only each new string is compared.
    assert calls <= 6 * 7
    # "0".."4" meet 0..4 groups; "5.0" is new after 5; "5" joins "5.0" on the 6th;
    # "4.00" joins "4" on the 5th.
    assert calls == (0 + 1 + 2 + 3 + 4) + 5 + 6 + 5


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["A: 1", "A: 1.0", "A: 2", "\\boxed{\\frac{1}{2}}", "A: 0.5", "none"]),
            st.one_of(st.floats(-5, 5), st.just(math.nan)),
        ),
        min_size=1,
        max_size=8,
    ),
    st.sampled_from(["argmax", "weighted_vote", "majority_vote"]),
)
def test_select_invariants(pairs: list[tuple[str, float]], selection: str) -> None:
    candidates = cands(*pairs)
    result = select(candidates, selection)  # type: ignore[arg-type]
    assert sorted(order(result.ranked)) == list(range(len(pairs)))
    assert_ranks_match_order(result.ranked)
    assert result.selected is result.ranked[0]
    assert result.selected_answer == result.selected.answer
    groups = group_by_answer(candidates)
    if selection == "argmax" or not groups:
        assert result.vote_share is None
        return
    winner = next(g for g in groups if result.selected in g)
    assert result.vote_share == pytest.approx(len(winner) / len(pairs))
    # the winning group's candidates come first
    assert {id(c) for c in result.ranked[: len(winner)]} == {id(c) for c in winner}
    if selection == "majority_vote":
        assert len(winner) == max(len(g) for g in groups)
    else:
        mass = [sum(c.reward for c in g if not math.isnan(c.reward)) for g in groups]
        assert sum(c.reward for c in winner if not math.isnan(c.reward)) == max(mass)
