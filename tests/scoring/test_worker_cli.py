"""`bon-gateway worker`: argument handling, and how it reports a start-up error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bon_gateway.config import ConfigError, RewardModelConfig
from bon_gateway.scoring.worker.__main__ import ERROR_PREFIX, build_parser, model_entries
from bon_gateway.scoring.worker.status import Serving, StartFailed, decode_status, encode_status


def _entries(argv: list[str]) -> list[RewardModelConfig]:
    return model_entries(build_parser().parse_args(["--listen", "127.0.0.1:0", *argv]))


def test_models_from_config_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[[reward_models]]\nname = "a"\npath = "/models/a"\nmax_length = 512\n\n'
        '[[reward_models]]\nname = "b"\npath = "/models/b"\nkind = "judge"\n'
    )
    assert [e.name for e in _entries(["--config", str(config)])] == ["a", "b"]
    (only,) = _entries(["--config", str(config), "--model", "b"])
    assert (only.name, only.kind) == ("b", "judge")
    with pytest.raises(ConfigError, match="c"):
        _entries(["--config", str(config), "--model", "c"])


def test_models_from_flags_and_json() -> None:
    (flag,) = _entries(
        [
            "--reward-model",
            "rm=/models/rm",
            "--max-length",
            "128",
            "--truncate-prompt",
            "--gguf-file",
            "m.gguf",
            "--kind",
            "judge",
            "--max-wait-ms",
            "0",
            "--prefix-cache-bytes",
            "0",
        ]
    )
    assert (
        flag.name,
        flag.path,
        flag.max_length,
        flag.truncate_prompt,
        flag.gguf_file,
        flag.kind,
        flag.max_wait_ms,
        flag.prefix_cache_bytes,
    ) == ("rm", "/models/rm", 128, True, "m.gguf", "judge", 0.0, 0)
    entry = RewardModelConfig(name="j", path="/p", normalize_std=2.0)
    (parsed,) = _entries(["--model-json", entry.model_dump_json()])
    assert parsed == entry
    with pytest.raises(ConfigError, match="no reward model"):
        _entries([])


def test_status_lines_round_trip() -> None:
    serving = Serving(listen="unix:/tmp/w.sock", pid=42, models=("rm", "prm"))
    assert decode_status(encode_status(serving)) == serving
    failed = StartFailed("unsupported architecture ['X']; supported: ...")
    assert decode_status(encode_status(failed)) == failed
    with pytest.raises(ValueError):
        decode_status(b'{"ready": true}\n')


@pytest.mark.integration
def test_start_up_error_on_the_status_pipe_and_one_line_on_stderr(tmp_path: Path) -> None:
    """What the pool reads (a typed status; the pool reports it, so not also on stderr)
    and what an operator reads when starting a worker by hand (one stderr line)."""
    argv = [
        sys.executable,
        "-m",
        "bon_gateway.scoring.worker",
        "--listen",
        f"unix:{tmp_path}/w.sock",
        "--reward-model",
        f"rm={tmp_path / 'missing'}",
    ]
    read_fd, write_fd = os.pipe()
    try:
        proc = subprocess.run(
            [*argv, "--status-fd", str(write_fd)],
            pass_fds=(write_fd,),
            capture_output=True,
            text=True,
            timeout=240,
        )
    finally:
        os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        status = decode_status(pipe.read())
    assert proc.returncode == 2
    assert isinstance(status, StartFailed) and "missing" in status.error
    assert ERROR_PREFIX not in proc.stderr
    by_hand = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert by_hand.returncode == 2
    assert by_hand.stderr.strip().splitlines() == [f"{ERROR_PREFIX}{status.error}"]
