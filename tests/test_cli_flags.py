"""`bon-gateway serve` flags override the config file."""

from __future__ import annotations

import argparse

import pytest

from bon_gateway.cli import _add_serve_parser, apply_serve_flags
from bon_gateway.config import ConfigError, parse_config


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    _add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


FILE = {
    "generator": {"url": "http://file:1/v1", "urls": ["http://a:1/v1", "http://b:1/v1"], "model": "m"},
    "reward_models": [{"name": "rm", "path": "/models/rm", "device": "cuda", "workers": 2}],
}


def test_no_flags_keep_the_file() -> None:
    config = apply_serve_flags(parse_config(FILE), _parse([]))
    assert config.generator.base_urls == ("http://a:1/v1", "http://b:1/v1")
    assert config.reward_models[0].workers == 2
    assert config.server.http_port == 8080 and config.server.grpc_port == 50051


def test_generator_urls_replace_the_file_list() -> None:
    one = apply_serve_flags(parse_config(FILE), _parse(["--generator-url", "http://x:2/v1"]))
    assert one.generator.base_urls == ("http://x:2/v1",)
    two = apply_serve_flags(
        parse_config(FILE), _parse(["--generator-url", "http://x:2/v1", "--generator-url", "http://y:2/v1"])
    )
    assert two.generator.base_urls == ("http://x:2/v1", "http://y:2/v1")
    assert two.generator.model == "m"


def test_reward_model_device_workers_and_ports() -> None:
    args = _parse(
        [
            "--reward-model",
            "sky=Skywork/Skywork-Reward-V2-Qwen3-0.6B",
            "--device",
            "cpu",
            "--workers",
            "3",
            "--http-port",
            "9000",
            "--grpc-port",
            "9001",
            "--host",
            "0.0.0.0",
        ]
    )
    config = apply_serve_flags(parse_config(FILE), args)
    [entry] = config.reward_models
    assert (entry.name, entry.path, entry.device, entry.workers) == (
        "sky",
        "Skywork/Skywork-Reward-V2-Qwen3-0.6B",
        "cpu",
        3,
    )
    assert (config.server.host, config.server.http_port, config.server.grpc_port) == ("0.0.0.0", 9000, 9001)


def test_bad_reward_model_flag_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="NAME=PATH_OR_HF_ID"):
        apply_serve_flags(parse_config(FILE), _parse(["--reward-model", "no-equals-sign"]))


def test_workers_and_addresses() -> None:
    from bon_gateway.config import RewardModelConfig

    remote_only = RewardModelConfig(name="rm", path="p", addresses=("h:1",))
    assert remote_only.workers == 0  # addresses alone: remote only, as before
    both = RewardModelConfig(name="rm", path="p", addresses=("h:1",), workers=2)
    assert (both.workers, both.addresses) == (2, ("h:1",))  # 2 spawned + the remote one
    assert RewardModelConfig(name="rm", path="p").workers == 1
    assert RewardModelConfig.model_validate_json(remote_only.model_dump_json()).workers == 0
    with pytest.raises(ValueError, match="workers = 0 needs remote"):
        RewardModelConfig(name="rm", path="p", workers=0)


def test_reward_model_flag_takes_a_gguf_file_and_entry_keys() -> None:
    config = apply_serve_flags(
        parse_config(FILE),
        _parse(["--reward-model", "smollm2-judge=/models/dir/m.Q4_1.gguf,kind=judge,activation=sigmoid"]),
    )
    (entry,) = config.reward_models
    assert (entry.name, entry.path, entry.gguf_file) == ("smollm2-judge", "/models/dir", "m.Q4_1.gguf")
    assert entry.kind == "judge" and entry.activation == "sigmoid"


def test_reward_model_flag_rejects_an_unknown_key() -> None:
    with pytest.raises(ConfigError, match="workers"):
        apply_serve_flags(parse_config(FILE), _parse(["--reward-model", "rm=/m,workers=3"]))


def _subcommand(name: str) -> argparse.ArgumentParser:
    from bon_gateway.cli import build_parser

    [subparsers] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return subparsers.choices[name]


@pytest.mark.parametrize("command", ["serve", "batch", "demo", "local"])
def test_help_explains_every_option_and_shows_its_default(command: str) -> None:
    parser = _subcommand(command)
    text = " ".join(parser.format_help().split())
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        assert action.help, f"{command} {action.option_strings[0]} has no help"
        if action.default not in (None, False, []):
            shown = f"(default: {action.default})"
            assert shown in text or "default" in action.help, f"{action.option_strings[0]}: no default"


def test_serve_help_names_the_ports_host_and_their_defaults() -> None:
    text = " ".join(_subcommand("serve").format_help().split())
    assert "HTTP port" in text and "else 8080" in text
    assert "gRPC port" in text and "else 50051" in text
    assert "--host HOST address both ports listen on" in text and "else 127.0.0.1" in text


def test_batch_help_shows_the_request_defaults() -> None:
    text = " ".join(_subcommand("batch").format_help().split())
    for shown in ("(default: 4)", "(default: 0.8)", "(default: 256)", "(default: argmax)"):
        assert shown in text
