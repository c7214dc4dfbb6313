"""The verifier's training pieces, without the model: split, folds, fit, AUC, the shipped head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bon_gateway.verifier.data import SOURCE_MODELS, file_sha256, is_held_out, load_training_solutions
from bon_gateway.verifier.fit import average_ranks, fit_logistic, grouped_folds, roc_auc
from bon_gateway.verifier.head import HEAD_FILE, load_head

SHARED_DATA = (
    Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "example_model_solutions.jsonl"
)


def _row(question: str) -> str:
    return json.dumps(
        {
            "question": question,
            "ground_truth": "A: 1",
            **{
                m: {"solution": f"{question} by {m}\nA: 1", "is_correct": i % 2 == 0}
                for i, m in enumerate(SOURCE_MODELS)
            },
        }
    )


def test_training_never_reads_the_held_out_third(tmp_path: Path) -> None:
    # Held-out lines (i % 3 == 0) are not even valid JSON: parsing one would raise.
    lines = ["not json {" if is_held_out(i) else _row(f"q{i}") for i in range(7)]
    data = tmp_path / "solutions.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    solutions = load_training_solutions(data)
    assert sorted({s.problem for s in solutions}) == [1, 2, 4, 5]
    assert [s.source for s in solutions[:4]] == [0, 1, 2, 3]
    assert [s.is_correct for s in solutions[:4]] == [True, False, True, False]
    assert solutions[0].question == "q1" and solutions[0].solution.startswith("q1 by 6b_finetuning")


def test_folds_keep_a_problem_together_and_follow_the_seed() -> None:
    problems = np.repeat(np.arange(50), 4)
    folds = grouped_folds(problems, 5, seed=0)
    for problem in range(50):
        assert len(set(folds[problems == problem].tolist())) == 1
    assert sorted(np.bincount(folds).tolist()) == [40] * 5
    assert np.array_equal(folds, grouped_folds(problems, 5, seed=0))
    assert not np.array_equal(folds, grouped_folds(problems, 5, seed=1))


def _synthetic(n: int = 600, d: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = rng.normal(size=d)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 10, size=d) + 3.0  # unequal scales, not centred
    logits = (x - 3.0) @ (true / x.std(0))
    y = rng.random(n) < 1 / (1 + np.exp(-logits))
    return x.astype(np.float32), y, true


def test_fit_is_deterministic_bit_for_bit() -> None:
    x, y, _ = _synthetic()
    a = fit_logistic(x, y, l2=1e-2)
    b = fit_logistic(x.copy(), y.copy(), l2=1e-2)
    assert a.weight.tobytes() == b.weight.tobytes()
    assert a.bias == 0.0


def test_fit_finds_the_signal() -> None:
    x, y, true = _synthetic(n=4000)
    head = fit_logistic(x, y, l2=1e-3, intercept=True)
    # The direction of the generating weights, in the scaled space.
    cosine = (
        np.dot(head.weight * x.std(0), true) / np.linalg.norm(head.weight * x.std(0)) / np.linalg.norm(true)
    )
    assert cosine > 0.95
    assert roc_auc(head.logits(x), y) > 0.8
    # Stronger L2 shrinks the weights.
    assert np.linalg.norm(fit_logistic(x, y, l2=1.0).weight) < np.linalg.norm(head.weight)


def test_roc_auc_counts_pairs_and_ties() -> None:
    scores = np.array([0.9, 0.5, 0.5, 0.1, 0.5])
    labels = np.array([True, True, False, False, False])
    # positives 0.9, 0.5 vs negatives 0.5, 0.1, 0.5: 3 + (0.5 + 1 + 0.5) = 5 of 6 pairs
    assert roc_auc(scores, labels) == pytest.approx(5 / 6)
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]


def test_the_shipped_head_is_the_documented_file() -> None:
    weight, metadata = load_head(HEAD_FILE)
    assert weight.shape == (1, 576) and weight.dtype == np.float32
    assert np.isfinite(weight).all() and np.abs(weight).max() > 0
    assert HEAD_FILE.stat().st_size < 16_000  # kilobytes: it ships in the wheel
    assert metadata["split"].startswith("train on line index i % 3 != 0")
    assert float(metadata["l2"]) > 0 and metadata["seed"].isdigit()
    if SHARED_DATA.is_file():  # made from the shared data this checkout sees
        assert metadata["data_sha256"] == file_sha256(SHARED_DATA)
