"""The training data of the verifier: GSM8K problems with four real model solutions each.

`example_model_solutions.jsonl` holds the 1,319 GSM8K test problems, each with four
solutions written by real models and the dataset's `is_correct` flag. The head is
trained on the problems whose line index i has i % 3 != 0; the problems with
i % 3 == 0 are held out for the quality table (bench/gsm8k_verifier.py) and are
never read by the training code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

#: column order of example_model_solutions.jsonl (also bench/gsm8k.py's candidate order)
SOURCE_MODELS: tuple[str, ...] = ("6b_finetuning", "6b_verification", "175b_finetuning", "175b_verification")
DATA_FILE_NAME = "example_model_solutions.jsonl"


def is_held_out(line_index: int) -> bool:
    """The held-out third: line indices divisible by 3 (0-based)."""
    return line_index % 3 == 0


@dataclass(frozen=True, slots=True)
class LabelledSolution:
    problem: int  # 0-based line index in the data file
    source: int  # index into SOURCE_MODELS
    question: str
    solution: str
    is_correct: bool  # the dataset's own flag


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_training_solutions(path: Path) -> list[LabelledSolution]:
    """Every solution of the training problems (i % 3 != 0), in file order, sources in order."""
    solutions: list[LabelledSolution] = []
    with open(path, encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            if is_held_out(index):
                continue  # not even parsed: the held-out third never reaches training
            row = json.loads(line)
            for source, model in enumerate(SOURCE_MODELS):
                solutions.append(
                    LabelledSolution(
                        problem=index,
                        source=source,
                        question=row["question"],
                        solution=row[model]["solution"],
                        is_correct=bool(row[model]["is_correct"]),
                    )
                )
    return solutions
