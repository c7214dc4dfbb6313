"""Session fixtures shared by every test folder: tiny reward-model checkpoints.

tests/isolation.py (loaded here) fails any test that starts a subprocess or a
server without the `integration` marker; pytester tests that guard itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import checkpoints

pytest_plugins = ("pytester", "tests.isolation")


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir() -> Path:
    return checkpoints.smollm2_tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_llama_rm() -> Path:
    """LlamaForSequenceClassification, hidden 64, 2 layers, SmolLM2 tokenizer (read-only dir)."""
    return checkpoints.tiny_llama_rm()


@pytest.fixture(scope="session")
def tiny_qwen2_rm() -> Path:
    """Qwen2ForSequenceClassification, one label."""
    return checkpoints.tiny_qwen2_rm()


@pytest.fixture(scope="session")
def tiny_qwen3_rm() -> Path:
    """Qwen3ForSequenceClassification, one label."""
    return checkpoints.tiny_qwen3_rm()


@pytest.fixture(scope="session")
def tiny_judge_lm() -> Path:
    """LlamaForCausalLM to be used with kind = "judge"."""
    return checkpoints.tiny_judge_lm()


@pytest.fixture(scope="session")
def reference_outcome_reward():  # type: ignore[no-untyped-def]
    """reference_outcome_reward(path, messages, answer) -> float (messages as dicts)."""
    return checkpoints.reference_outcome_reward


@pytest.fixture(scope="session")
def reference_judge_reward():  # type: ignore[no-untyped-def]
    """reference_judge_reward(path, messages, answer, judge=None) -> float."""
    return checkpoints.reference_judge_reward


@pytest.fixture(scope="session")
def tiny_qwen2_classifier() -> Path:
    """Qwen2ForSequenceClassification with 2 labels."""
    return checkpoints.tiny_qwen2_classifier()


@pytest.fixture(scope="session")
def tiny_gemma2_rm() -> Path:
    """Gemma2ForSequenceClassification (eager attention), sliding window 64."""
    return checkpoints.tiny_gemma2_rm()


@pytest.fixture(scope="session")
def tiny_jamba_rm() -> Path:
    """JambaForSequenceClassification (Mamba + attention + MoE)."""
    return checkpoints.tiny_jamba_rm()


@pytest.fixture(scope="session")
def llama_cpp_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real llama.cpp server on the SmolLM2 GGUF, shared by the whole session; yields …/v1."""
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed")
    from tests.fakes.llamacpp import llama_cpp_server

    with llama_cpp_server(tmp_path_factory.mktemp("llama")) as url:
        yield url
