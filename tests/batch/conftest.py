"""Fixtures for the batch tests: a GSM8K slice, the fake upstream, a FakeScorer
that acts as a PRM, and the real gateway on loopback over both."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import FakeScorer, FakeUpstream, ServedGateway, gateway_config

REPO = Path(__file__).resolve().parents[2]
GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"

# With seed 0, candidate i is TEXTS[i] (FakeUpstream answers texts[seed % 4]).
# Steps are "\n\n"-separated, and the FakeScorer gives each text one step reward
# per step, like a PRM. GSM8K rows 1 and 2 have the answers 18 and 3.
TEXTS = (
    "Add the numbers.\n\nThe answer is 18.",
    "Count the eggs.\n\nSubtract.\n\nThe answer is 3.",
    "I am not sure.\n\nThe answer is 7.",
    "Guess.\n\nThe answer is 18.",
)
STEP_REWARDS = {
    TEXTS[0]: (0.9, 0.8),
    TEXTS[1]: (0.7, 0.6, 0.95),
    TEXTS[2]: (0.2, 0.1),
    TEXTS[3]: (0.4, 0.3),
}
ROWS = 40


def gsm8k_rows(count: int) -> list[dict[str, Any]]:
    if not GSM8K.is_file():
        pytest.skip(f"no GSM8K data at {GSM8K}")
    with GSM8K.open(encoding="utf-8") as handle:
        return [json.loads(line) for _, line in zip(range(count), handle, strict=False)]


@pytest.fixture
def gsm8k_slice(tmp_path: Path) -> Path:
    """The first ROWS GSM8K test problems, as the dataset ships them (no ids)."""
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows(ROWS)), encoding="utf-8")
    return path


def prm_scorer() -> FakeScorer:
    # FakeScorer's reward is only used when there are no step rewards; keep them consistent.
    return FakeScorer({t: r[-1] for t, r in STEP_REWARDS.items()}, step_rewards=STEP_REWARDS)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    # A little latency per call so a subprocess can be killed mid-run.
    with FakeUpstream(TEXTS, delay_s=0.02) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream) -> Iterator[ServedGateway]:
    with ServedGateway(gateway_config(upstream.url, max_best_of=16), prm_scorer()) as served:
        yield served


def batch_argv(gateway_url: str, input_path: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "bon_gateway", "batch",
        "--gateway-url", gateway_url, "--input", str(input_path), "--output", str(output),
        "--best-of", "4", "--seed", "0", "--concurrency", "2", "--no-progress", *extra,
    ]  # fmt: skip


def start_batch(argv: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as sink:
        return subprocess.Popen(list(argv), cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)


def wait_for_lines(path: Path, count: int, process: subprocess.Popen[bytes], timeout_s: float = 60.0) -> int:
    """Block until `path` has at least `count` lines (or the process ends); returns the count seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        lines = path.read_bytes().count(b"\n") if path.exists() else 0
        if lines >= count or process.poll() is not None:
            return lines
        time.sleep(0.01)
    raise TimeoutError(f"{path} did not reach {count} lines")


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file; each must be a whole JSON object."""
    raw = path.read_text(encoding="utf-8")
    assert raw.endswith("\n"), "the output must end with a whole line"
    return [json.loads(line) for line in raw.splitlines()]
