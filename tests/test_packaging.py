"""`pip install bon-gateway` is the gateway front only (issue 16, item 2): a fresh venv
with the core dependencies has no torch, serves with remote reward workers only, and
says what to install when asked to spawn workers itself.

A real install from this checkout into a venv in tmp_path (the package index is
reachable; pip's cache makes a rerun quicker): ~1 minute here, hence `slow`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import venv
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fakes import unused_port
from tests.scoring.helpers import remote_worker_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("core-venv")
    root = base / "venv"
    venv.create(root, with_pip=True)
    # Built from a copy of what the package is made of: an in-tree build would leave
    # build/ and *.egg-info in the checkout (and copy its .cache/ of checkpoints).
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    shutil.copytree(
        REPO / "bon_gateway", source / "bon_gateway", ignore=shutil.ignore_patterns("__pycache__")
    )
    result = subprocess.run(
        [str(root / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=900,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return root


def _clean_env() -> dict[str, str]:
    # Nothing from the test's own environment (PYTHONPATH points at the checkout).
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_the_core_install_has_no_gpu_stack(core_venv: Path) -> None:
    heavy = ("torch", "transformers", "accelerate", "safetensors", "gguf", "matplotlib", "llama_cpp")
    code = f"import importlib.util as u; print([m for m in {heavy!r} if u.find_spec(m)])"
    found = subprocess.run(
        [str(core_venv / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd="/",
    )
    assert found.stdout.strip() == "[]", found.stdout + found.stderr


@pytest.fixture
def remote_worker(tiny_llama_rm: Path) -> Iterator[str]:
    """A reward worker from the test's own (full) environment, on a TCP port."""
    with remote_worker_process("tiny", tiny_llama_rm, "--device", "cpu") as (address, _):
        yield address


def _config(tmp_path: Path, reward_model: str) -> Path:
    http_port, grpc_port = unused_port(), unused_port()
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\nhost = "127.0.0.1"\nhttp_port = {http_port}\ngrpc_port = {grpc_port}\n\n'
        f'[generator]\nurl = "http://127.0.0.1:{unused_port()}/v1"\nmodel = "m"\n\n'
        f"[[reward_models]]\n{reward_model}\n"
    )
    return config


def test_serve_with_remote_workers_only(core_venv: Path, remote_worker: str, tmp_path: Path) -> None:
    config = _config(tmp_path, f'name = "tiny"\npath = "tiny"\naddresses = ["{remote_worker}"]')
    port = config.read_text().split("http_port = ")[1].split("\n")[0]
    log = tmp_path / "gateway.log"
    with log.open("wb") as sink:
        gateway = subprocess.Popen(
            [str(core_venv / "bin" / "bon-gateway"), "serve", "--config", str(config)],
            env=_clean_env(),
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        statuses: dict[str, int] = {}
        while time.monotonic() < deadline and statuses.get("ready") != 200:
            assert gateway.poll() is None, log.read_text(errors="replace")[-4000:]
            try:
                for path in ("health", "ready"):
                    statuses[path] = httpx.get(f"http://127.0.0.1:{port}/{path}", timeout=2).status_code
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        assert statuses == {"health": 200, "ready": 200}, log.read_text(errors="replace")[-4000:]
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/rewards",
            json={
                "model": "tiny",
                "messages": [{"role": "user", "content": "2 + 2?"}],
                "candidates": ["4", "5"],
            },
            timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert len(reply.json()["data"]) == 2
    finally:
        gateway.terminate()
        gateway.wait(60)


def test_serve_spawning_workers_without_the_worker_extra_says_what_to_install(
    core_venv: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path, f'name = "tiny"\npath = "{tmp_path}"\nworkers = 1')
    result = subprocess.run(
        [str(core_venv / "bin" / "bon-gateway"), "serve", "--config", str(config)],
        env=_clean_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "pip install 'bon-gateway[worker]'" in line and line.startswith("bon-gateway: reward model 'tiny'")
