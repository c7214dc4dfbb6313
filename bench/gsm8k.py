"""GSM8K candidate sets from the shared data, for the voting benchmarks.

Reusable by any bench script (`python bench/NAME.py` puts bench/ on sys.path):
`load_gsm8k_candidates()` gives every problem with its four model-written
solutions; `vote_locally()` is the in-process reference that a run through
the gateway's `/v1/rewards` endpoint should reproduce.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# bench/ is not a package: `python bench/NAME.py` sees bench/ only, so make the
# repository's bon_gateway importable without installing it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bon_gateway.engine.answers import answers_equivalent, extract_answer
from bon_gateway.engine.selection import SelectionResult, select
from bon_gateway.types import ScoredCandidate, Selection

__all__ = [
    "MODELS",
    "Problem",
    "Solution",
    "default_data_dir",
    "is_right",
    "load_gsm8k_candidates",
    "vote_locally",
]

# Column order of example_model_solutions.jsonl; also the candidate order.
MODELS: tuple[str, ...] = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")


@dataclass(frozen=True, slots=True)
class Solution:
    model: str
    text: str
    is_correct: bool  # the dataset's own flag


@dataclass(frozen=True, slots=True)
class Problem:
    index: int
    question: str
    reference: str  # the reference solution, ending "A: x"
    answer: str  # the reference's final answer, extracted
    solutions: tuple[Solution, ...]  # in MODELS order

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.solutions]


def default_data_dir() -> Path:
    """$BON_GSM8K_DIR, else ../shared/data/gsm8k next to the repository."""
    env = os.environ.get("BON_GSM8K_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


def load_gsm8k_candidates(path: Path | str | None = None) -> list[Problem]:
    """Every problem of example_model_solutions.jsonl, solutions in MODELS order."""
    path = Path(path) if path is not None else default_data_dir() / "example_model_solutions.jsonl"
    problems: list[Problem] = []
    with open(path, encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            row = json.loads(line)
            answer = extract_answer(row["ground_truth"])
            if answer is None:
                raise ValueError(f"{path}:{index + 1}: the ground truth has no final answer")
            solutions = tuple(
                Solution(model, row[model]["solution"], bool(row[model]["is_correct"])) for model in MODELS
            )
            problems.append(Problem(index, row["question"], row["ground_truth"], answer, solutions))
    return problems


def vote_locally(
    problem: Problem, selection: Selection = "majority_vote", rewards: Sequence[float] | None = None
) -> SelectionResult:
    """Select among a problem's solutions in process; equal rewards unless given."""
    rewards = rewards if rewards is not None else [0.0] * len(problem.solutions)
    candidates = [
        ScoredCandidate(index=i, text=s.text, reward=r)
        for i, (s, r) in enumerate(zip(problem.solutions, rewards, strict=True))
    ]
    return select(candidates, selection)


def is_right(answer: str | None, problem: Problem) -> bool:
    """Whether an answer equals the problem's reference answer (math-verify)."""
    return answers_equivalent(answer, problem.answer)
