"""Majority vote over real GSM8K solutions, by a plain count of extracted answers.

    python bench/gsm8k_vote.py [--data PATH] [--out bench/results/gsm8k_vote.md]

Over every problem of example_model_solutions.jsonl (four model-written
solutions each): each model's accuracy, the oracle (any solution right) and
`select(..., "majority_vote")` with equal rewards, all judged against the
reference answer with `answers_equivalent`. Also checks the extraction
against the dataset's own `is_correct` flags. Prints a markdown table and
writes it to --out.
"""

from __future__ import annotations

import argparse
import collections
import logging
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gsm8k import MODELS, Problem, is_right, load_gsm8k_candidates, vote_locally
from tqdm import tqdm  # type: ignore[import-untyped]

from bon_gateway.engine.answers import extract_answer
from bon_gateway.engine.selection import group_by_answer

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gsm8k_vote.md"


@dataclass(slots=True)
class VoteReport:
    problems: int
    single_right: collections.Counter[str] = field(default_factory=collections.Counter)
    oracle_right: int = 0
    majority_right: int = 0
    majority_model_ties_right: int = 0
    flag_agreements: int = 0
    flag_disagreements: list[str] = field(default_factory=list)
    shapes: collections.Counter[tuple[int, ...]] = field(default_factory=collections.Counter)
    shapes_right: collections.Counter[tuple[int, ...]] = field(default_factory=collections.Counter)
    seconds: float = 0.0


def evaluate(problems: list[Problem], *, progress: bool = True) -> VoteReport:
    """Accuracy of each model, the oracle and the plain-count majority vote."""
    report = VoteReport(problems=len(problems))
    started = time.perf_counter()
    for problem in tqdm(problems, desc="gsm8k vote", unit="problem", disable=not progress, file=sys.stderr):
        any_right = False
        for solution in problem.solutions:
            right = is_right(extract_answer(solution.text), problem)
            report.single_right[solution.model] += right
            any_right = any_right or right
            if right == solution.is_correct:
                report.flag_agreements += 1
            else:
                report.flag_disagreements.append(f"problem {problem.index} {solution.model}")
        report.oracle_right += any_right

        vote = vote_locally(problem, "majority_vote")
        right = is_right(vote.selected_answer, problem)
        report.majority_right += right
        shape = tuple(sorted((len(g) for g in group_by_answer(vote.ranked)), reverse=True))
        report.shapes[shape] += 1
        report.shapes_right[shape] += right
        # Same count, but each candidate's reward is its model's position in
        # MODELS (weakest first), so ties go to the stronger model's answer.
        ranked_by_model = vote_locally(problem, "majority_vote", rewards=[float(i) for i in range(4)])
        report.majority_model_ties_right += is_right(ranked_by_model.selected_answer, problem)
    report.seconds = time.perf_counter() - started
    return report


def _pct(right: int, total: int) -> str:
    return f"{100.0 * right / total:.1f} %"


def render(report: VoteReport, data: Path) -> str:
    n = report.problems
    flags = report.flag_agreements + len(report.flag_disagreements)
    lines = [
        "# GSM8K: single models, oracle and majority vote",
        "",
        f"Data: `{data.name}`, {n} problems x {len(MODELS)} solutions. Answers extracted with",
        "`extract_answer`, judged against the reference answer with `answers_equivalent`.",
        f"Command: `python bench/gsm8k_vote.py`; {report.seconds:.1f} s on {platform.machine()},"
        f" Python {platform.python_version()}.",
        "",
        "| Selection | Right | Accuracy |",
        "|---|---:|---:|",
    ]
    for model in MODELS:
        lines.append(
            f"| single model `{model}` | {report.single_right[model]} | "
            f"{_pct(report.single_right[model], n)} |"
        )
    lines += [
        f"| oracle (any solution right) | {report.oracle_right} | {_pct(report.oracle_right, n)} |",
        f"| `majority_vote`, equal rewards (plain count; ties to the earliest candidate) | "
        f"{report.majority_right} | {_pct(report.majority_right, n)} |",
        f"| `majority_vote`, reward = model position (ties to the stronger model) | "
        f"{report.majority_model_ties_right} | {_pct(report.majority_model_ties_right, n)} |",
        "",
        f"Extraction vs the dataset's `is_correct` flags: {report.flag_agreements} of {flags} agree"
        + (f"; disagreements: {', '.join(report.flag_disagreements)}." if report.flag_disagreements else "."),
        "",
        "Where the plain count goes right or wrong, by the sizes of the answer groups",
        "(4 = all agree, 1-1-1-1 = four different answers):",
        "",
        "| Answer groups | Problems | Majority vote right |",
        "|---|---:|---:|",
    ]
    for shape, count in sorted(report.shapes.items(), key=lambda item: (-item[0][0], -item[1])):
        lines.append(
            f"| {'-'.join(map(str, shape))} | {count} | "
            f"{report.shapes_right[shape]} ({_pct(report.shapes_right[shape], count)}) |"
        )
    lines += [
        "",
        "A plain count loses to the best single model because most problems have no",
        "majority: with four different answers (or a 2-2 split) the tie goes to the",
        "earliest candidate, here the weakest model. Breaking ties by a reward",
        "(the model's position stands in for a reward model) recovers that loss.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", type=Path, default=None, help="example_model_solutions.jsonl")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    # math-verify warns once that its signal-based timeout is off; answers.py
    # turns it off on purpose (see its docstring).
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    problems = load_gsm8k_candidates(args.data)
    report = evaluate(problems, progress=not args.no_progress)
    data = args.data or Path("example_model_solutions.jsonl")
    table = render(report, data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
