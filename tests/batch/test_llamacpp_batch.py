"""A real batch: llama.cpp's server on SmolLM2-135M-Instruct as the generator, an
in-process engine (`--config`) with a reward worker on a tiny checkpoint, a few
GSM8K rows; killed with SIGKILL halfway, then resumed."""

from __future__ import annotations

import json
import signal
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.batch.conftest import gsm8k_rows, read_rows, start_batch, wait_for_lines

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROWS = 6


def test_real_batch_killed_and_resumed(llama_cpp_url: str, tiny_llama_rm: Path, tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[generator]\nurl = "{llama_cpp_url}"\nmodel = "smollm2"\ntimeout_s = 120\n\n'
        f'[[reward_models]]\nname = "tiny"\npath = "{tiny_llama_rm}"\ndevice = "cpu"\n'
    )
    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows(ROWS)))
    output, log = tmp_path / "results.jsonl", tmp_path / "batch.log"
    argv = [
        sys.executable, "-m", "bon_gateway", "batch", "--config", str(config), "--input", str(data),
        "--output", str(output), "--best-of", "2", "--max-tokens", "48", "--temperature", "0.7",
        "--concurrency", "1", "--no-progress", "--pairs", str(tmp_path / "pairs.jsonl"),
    ]  # fmt: skip
    first = start_batch(argv, log)
    seen = wait_for_lines(output, ROWS // 2, first, timeout_s=300)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert 0 < seen < ROWS, log.read_text()[-2000:]

    second = start_batch(argv, log)
    assert second.wait(300) == 0, log.read_text()[-3000:]
    rows = read_rows(output)
    ids = Counter(r["id"] for r in rows)
    assert set(ids) == {f"line-{n}" for n in range(1, ROWS + 1)} and max(ids.values()) == 1
    for row in rows:
        assert row["reward_model"] == "tiny" and len(row["candidates"]) == 2
        rewards = [c["reward"] for c in row["candidates"]]
        assert rewards == sorted(rewards, reverse=True)  # ranked best first
        assert all(c["text"] for c in row["candidates"])
        assert isinstance(row["correct"], bool)
    pairs = read_rows(tmp_path / "pairs.jsonl")
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
