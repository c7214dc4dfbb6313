"""A reward model that cannot load stops `bon-gateway serve` with one line naming the
model, its path and what to do, exit status 1, no traceback (issue 16, item 4); and the
checks behind it (scoring/preflight.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bon_gateway.config import RewardModelConfig
from bon_gateway.errors import WorkerError
from bon_gateway.scoring import preflight

REPO = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as sock:  # bound then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(tmp_path: Path, entry: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[server]\nhost = "127.0.0.1"\nhttp_port = 0\ngrpc_port = 0\n\n'
        f'[generator]\nurl = "http://127.0.0.1:{_closed_port()}/v1"\nmodel = "m"\n\n'
        f"[[reward_models]]\n{entry}\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "bon_gateway", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 1, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.integration
def test_a_missing_local_model_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = _serve(tmp_path, 'name = "rm"\npath = "./models/not-there"\ndevice = "cpu"')
    line = _last_line(result)
    assert line.startswith("bon-gateway: reward model 'rm': ./models/not-there does not exist"), line
    assert str(tmp_path) in line  # relative to where it runs


@pytest.mark.integration
def test_a_hub_id_without_a_hub_fails_at_once(tmp_path: Path) -> None:
    # The hub is a closed port and the cache is empty: the worker says so in one line
    # (before: ~27 s of retries, each line logged twice, then a traceback).
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = _serve(tmp_path, 'name = "sky"\npath = "Org/not-cached"\ndevice = "cpu"', env)
    line = _last_line(result)
    assert "reward model 'sky': Org/not-cached is a hub id, it is not in the hub cache" in line, line
    assert "the hub cannot be reached" in line and "local directory" in line
    assert result.stderr.count("not in the hub cache") <= 2  # the pool's log line and the CLI's


@pytest.mark.integration
def test_cuda_asked_without_cuda_names_the_fix(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from tests.fixtures.checkpoints import tiny_llama_rm

    result = _serve(tmp_path, f'name = "rm"\npath = "{tiny_llama_rm()}"\ndevice = "cuda"')
    line = _last_line(result)
    assert "reward model 'rm': device = 'cuda' but" in line, line
    assert 'set device = "cpu"' in line


def test_local_paths_and_hub_ids() -> None:
    assert preflight.is_local_path("/models/rm") and preflight.is_local_path("./rm")
    assert preflight.is_local_path(".cache/models/gsm8k-verifier")
    assert preflight.is_local_path("a/b/c")
    assert not preflight.is_local_path("Skywork/Skywork-Reward-V2-Qwen3-0.6B")
    assert not preflight.is_local_path("gpt2")


def test_check_path(tmp_path: Path) -> None:
    preflight.check_path(RewardModelConfig(name="rm", path=str(tmp_path)))
    preflight.check_path(RewardModelConfig(name="rm", path="Org/name"))  # the hub's to answer
    with pytest.raises(WorkerError, match=r"gguf_file m\.gguf not found"):
        preflight.check_path(RewardModelConfig(name="rm", path=str(tmp_path), gguf_file="m.gguf"))
    with pytest.raises(WorkerError, match="does not exist"):
        preflight.check_path(RewardModelConfig(name="rm", path=str(tmp_path / "gone")))


def test_no_hub_serves_cached_models_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(preflight, "hub_reachable", lambda timeout_s=3.0: "huggingface.co:443: refused")
    (tmp_path / "models--Org--name" / "snapshots" / "abc").mkdir(parents=True)
    preflight.check_hub([RewardModelConfig(name="rm", path="Org/name")])
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(WorkerError, match="'other': Org/other is a hub id"):
        preflight.check_hub([RewardModelConfig(name="other", path="Org/other")])
    assert "HF_HUB_OFFLINE" not in os.environ
