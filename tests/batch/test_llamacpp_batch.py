"""A real batch: llama.cpp's server on SmolLM2-135M-Instruct as the generator, an
in-process engine (`--config`) with a reward worker on a tiny checkpoint, a few
GSM8K rows; killed with SIGKILL halfway, then resumed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.batch.conftest import gsm8k_rows, read_rows, start_batch, wait_for_lines
from tests.fakes import unused_port

pytestmark = pytest.mark.slow

ROWS = 6


@pytest.fixture(scope="module")
def llama_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed")
    from bon_gateway.smollm2 import smollm2_gguf_path

    port = unused_port()
    log = tmp_path_factory.mktemp("llama") / "server.log"
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf_path()),
            "--host", "127.0.0.1", "--port", str(port), "--n_threads", "1"]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail("llama.cpp server exited:\n" + log.read_text(errors="replace")[-3000:])
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama.cpp server never answered")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_real_batch_killed_and_resumed(llama_url: str, tiny_llama_rm: Path, tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[generator]\nurl = "{llama_url}"\nmodel = "smollm2"\ntimeout_s = 120\n\n'
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
