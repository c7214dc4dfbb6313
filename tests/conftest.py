"""Session fixtures shared by every test folder: tiny reward-model checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures import checkpoints


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    return checkpoints.smollm2_tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_llama_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LlamaForSequenceClassification, hidden 64, 2 layers, SmolLM2 tokenizer."""
    return checkpoints.build_sequence_classifier(tmp_path_factory.mktemp("tiny-llama-rm"), "llama", seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_sequence_classifier(tmp_path_factory.mktemp("tiny-qwen2-rm"), "qwen2", seed=2)


@pytest.fixture(scope="session")
def tiny_qwen3_rm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoints.build_sequence_classifier(
        tmp_path_factory.mktemp("tiny-qwen3-rm"), "qwen3", seed=3, head_dim=16
    )


@pytest.fixture(scope="session")
def tiny_judge_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LlamaForCausalLM to be used with kind = "judge"."""
    return checkpoints.build_causal_lm(tmp_path_factory.mktemp("tiny-judge"), "llama", seed=4)


@pytest.fixture(scope="session")
def reference_outcome_reward():  # type: ignore[no-untyped-def]
    """reference_outcome_reward(path, messages, answer) -> float (messages as dicts)."""
    return checkpoints.reference_outcome_reward


@pytest.fixture(scope="session")
def reference_judge_reward():  # type: ignore[no-untyped-def]
    """reference_judge_reward(path, messages, answer, judge=None) -> float."""
    return checkpoints.reference_judge_reward
