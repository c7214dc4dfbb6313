"""Exports from a real batch run: TRL preference pairs that the `datasets` JSON
loader reads with the columns TRL expects, stepwise rows, the report files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bon_gateway.batch.export import ExportCounts, preference_pairs, step_label_rows
from tests.batch.conftest import REPO, ROWS, STEP_REWARDS, TEXTS, batch_argv, gsm8k_rows, read_rows
from tests.fakes import ServedGateway


@pytest.fixture(scope="module")
def exported(gateway: ServedGateway, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One full run with every export (shared by the tests here); returns the folder."""
    tmp_path = tmp_path_factory.mktemp("exported")
    gsm8k_slice = tmp_path / "gsm8k.jsonl"
    gsm8k_slice.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows(ROWS)), encoding="utf-8")
    argv = batch_argv(
        gateway.http_url, gsm8k_slice, tmp_path / "results.jsonl",
        "--pairs", str(tmp_path / "pairs.jsonl"),
        "--step-labels", str(tmp_path / "steps.jsonl"), "--step-threshold", "0.5",
        "--report", str(tmp_path / "report.html"), "--summary-json", str(tmp_path / "summary.json"),
    )  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return tmp_path


@pytest.mark.integration
def test_pairs_load_with_datasets_in_trl_conversational_format(exported: Path) -> None:
    datasets = pytest.importorskip("datasets")
    pairs = datasets.load_dataset("json", data_files=str(exported / "pairs.jsonl"), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(pairs.column_names)
    assert pairs.num_rows == ROWS  # best-worst: one pair per row
    row = pairs[0]
    assert row["prompt"] == [{"role": "user", "content": row["prompt"][0]["content"]}]
    assert row["chosen"] == [{"role": "assistant", "content": TEXTS[1]}]
    assert row["rejected"] == [{"role": "assistant", "content": TEXTS[2]}]
    assert row["chosen_reward"] > row["rejected_reward"]
    # TRL's is_conversational(): every column is a list of {"role", "content"} messages.
    questions = {r["id"]: r["messages"] for r in read_rows(exported / "results.jsonl")}
    for pair in pairs:
        for column in ("prompt", "chosen", "rejected"):
            assert pair[column] and all(set(m) == {"role", "content"} for m in pair[column])
        assert pair["prompt"] == questions[pair["id"]]
        assert [m["role"] for m in pair["chosen"]] == [m["role"] for m in pair["rejected"]] == ["assistant"]


@pytest.mark.integration
def test_step_labels_rows_line_up(exported: Path) -> None:
    datasets = pytest.importorskip("datasets")
    steps = datasets.load_dataset("json", data_files=str(exported / "steps.jsonl"), split="train")
    assert {"prompt", "completions", "labels"} <= set(steps.column_names)
    assert steps.num_rows == ROWS * len(TEXTS)
    for row in steps:
        assert isinstance(row["prompt"], str) and row["prompt"]
        assert len(row["completions"]) == len(row["labels"]) > 0
        text = "\n\n".join(row["completions"])
        assert row["labels"] == [r >= 0.5 for r in STEP_REWARDS[text]]


@pytest.mark.integration
def test_report_and_summary_are_written(exported: Path) -> None:
    page = (exported / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "data:image/png;base64," in page
    assert "Accuracy vs N" in page
    summary = json.loads((exported / "summary.json").read_text())
    output = summary["output"]
    assert output["rows"] == ROWS and output["rows_with_reference"] == ROWS
    assert set(output["accuracy_vs_n"]) == {"1", "2", "3", "4"}
    # Oracle accuracy can only grow with N; with N = 1 best-of-N is the first candidate.
    oracle = [output["accuracy_vs_n"][k]["oracle_at_k"] for k in "1234"]
    assert oracle == sorted(oracle)
    assert output["accuracy_vs_n"]["1"]["best_of_k"] == output["accuracy_first"]
    assert summary["pairs"]["written"] == ROWS


@pytest.mark.integration
def test_png_report(gateway: ServedGateway, gsm8k_slice: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.png"
    argv = batch_argv(
        gateway.http_url, gsm8k_slice, tmp_path / "r.jsonl", "--limit", "5", "--report", str(out)
    )
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _row(rewards: list[float], texts: list[str] | None = None) -> dict[str, object]:
    texts = texts or [f"answer {i}" for i in range(len(rewards))]
    order = sorted(range(len(rewards)), key=lambda i: -rewards[i])
    return {
        "id": 7,
        "messages": [{"role": "user", "content": "q"}],
        "candidates": [
            {"index": i, "text": texts[i], "reward": rewards[i], "rank": order.index(i) + 1} for i in order
        ],
    }


def test_pairs_modes_margin_and_ties() -> None:
    rows = [_row([1.0, 3.0, 2.0, 0.5]), _row([1.0, 1.0, 1.0]), _row([2.0, 1.0], ["same", "same"])]
    counts = ExportCounts()
    best_worst = list(preference_pairs(rows, counts=counts))
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in best_worst] == [
        ("answer 1", "answer 3")
    ]
    assert counts.skipped_ties == 2 and best_worst[0]["id"] == "7"
    every = list(preference_pairs(rows, mode="all", margin=1.5))  # gaps 2.0 and 2.5 pass, 1.0 does not
    assert sorted(p["rejected"][0]["content"] for p in every) == ["answer 0", "answer 3"]
    assert list(preference_pairs([_row([1.0, float("nan")])])) == []


def test_step_labels_skip_candidates_whose_steps_do_not_line_up() -> None:
    row = _row([0.9, 0.1], ["a\n\nb", "one step"])
    row["candidates"][0]["step_rewards"] = [0.8, 0.3]  # type: ignore[index]
    row["candidates"][1]["step_rewards"] = [0.2, 0.9]  # type: ignore[index]  # 2 rewards, 1 step
    counts = ExportCounts()
    out = list(step_label_rows([row], threshold=0.5, counts=counts))
    assert out == [
        {"id": "7", "candidate": 0, "prompt": "q", "completions": ["a", "b"], "labels": [True, False]}
    ]
    assert counts.skipped_no_steps == 1


@pytest.mark.integration
def test_results_rows_carry_no_nan(exported: Path) -> None:
    for row in read_rows(exported / "results.jsonl"):
        assert "NaN" not in json.dumps(row)
