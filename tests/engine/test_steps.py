"""Step splitting and per-candidate aggregation of PRM step rewards."""

from __future__ import annotations

import math

import pytest

from bon_gateway.engine.steps import DEFAULT_STEP_DELIMITER, aggregate_steps, split_steps


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "Step 1: add.\n\nStep 2: multiply.\n\nThe answer is 6.",
            ["Step 1: add.", "Step 2: multiply.", "The answer is 6."],
        ),
        ("one step only", ["one step only"]),
        ("  padded \n\n\n\n   \n\n next  \n", ["padded", "next"]),
        ("line 1\nline 2", ["line 1\nline 2"]),  # a single newline stays inside a step
        ("\n\nleading and trailing\n\n", ["leading and trailing"]),
        ("", []),
        ("  \n\n \t ", []),
    ],
)
def test_split_steps_default_delimiter(text: str, expected: list[str]) -> None:
    assert DEFAULT_STEP_DELIMITER == "\n\n"
    assert split_steps(text) == expected


def test_split_steps_custom_delimiter() -> None:
    solution = "16 - 3 - 4 = 9 eggs\n9 * 2 = $18\n\nA: 18\n"
    assert split_steps(solution, "\n") == ["16 - 3 - 4 = 9 eggs", "9 * 2 = $18", "A: 18"]
    assert split_steps("a ки b ки", " ки") == ["a", "b"]


def test_split_steps_rejects_an_empty_delimiter() -> None:
    with pytest.raises(ValueError, match="delimiter"):
        split_steps("a\n\nb", "")


@pytest.mark.parametrize(
    ("how", "expected"),
    [("last", 0.5), ("min", 0.25), ("prod", 0.9 * 0.25 * 0.5), ("mean", (0.9 + 0.25 + 0.5) / 3)],
)
def test_aggregate_steps(how: str, expected: float) -> None:
    assert aggregate_steps([0.9, 0.25, 0.5], how) == pytest.approx(expected, abs=1e-12)  # type: ignore[arg-type]


def test_aggregate_steps_defaults_to_last_and_handles_one_step() -> None:
    assert aggregate_steps([0.1, 0.7]) == 0.7
    for how in ("last", "min", "prod", "mean"):
        assert aggregate_steps((0.3,), how) == pytest.approx(0.3)


def test_aggregate_steps_empty_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="empty list of step rewards"):
        aggregate_steps([], "min")


def test_aggregate_steps_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown aggregation 'max'"):
        aggregate_steps([0.5], "max")  # type: ignore[arg-type]


def test_nan_step_reward_poisons_min_prod_mean_wherever_it_sits() -> None:
    for rewards in ([math.nan, 0.5, 0.9], [0.5, math.nan, 0.9]):
        for how in ("min", "prod", "mean"):
            assert math.isnan(aggregate_steps(rewards, how))
    assert aggregate_steps([math.nan, 0.9], "last") == 0.9
    assert math.isnan(aggregate_steps([0.9, math.nan], "last"))


def test_infinite_step_rewards_do_not_raise() -> None:
    assert math.isnan(aggregate_steps([math.inf, -math.inf], "mean"))
    assert aggregate_steps([math.inf, 1.0], "min") == 1.0
