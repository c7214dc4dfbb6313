"""`bon-gateway worker` argument handling (no model is loaded here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bon_gateway.config import ConfigError, RewardModelConfig
from bon_gateway.scoring.worker.__main__ import build_parser, model_entries


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
    ) == ("rm", "/models/rm", 128, True, "m.gguf", "judge", 0.0)
    entry = RewardModelConfig(name="j", path="/p", normalize_std=2.0)
    (parsed,) = _entries(["--model-json", entry.model_dump_json()])
    assert parsed == entry
    with pytest.raises(ConfigError, match="no reward model"):
        _entries([])
