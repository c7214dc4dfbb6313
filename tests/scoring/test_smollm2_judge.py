"""The demo's reward model: real SmolLM2-135M-Instruct weights from the GGUF, as a judge."""

from __future__ import annotations

import pytest

from bon_gateway.metrics import Metrics
from bon_gateway.scoring.pool import WorkerPool
from bon_gateway.smollm2 import smollm2_gguf_path
from bon_gateway.types import Deadline, Message
from tests.fixtures import checkpoints
from tests.scoring.helpers import gateway_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.asyncio
async def test_smollm2_gguf_judge_equals_reference() -> None:
    gguf = smollm2_gguf_path()
    entry = {"name": "smollm2-judge", "path": str(gguf.parent), "gguf_file": gguf.name, "kind": "judge"}
    pool = WorkerPool(gateway_config(entry), Metrics())
    await pool.start()
    messages = (Message("user", "What is the capital of France?"),)
    answers = ["The capital of France is Paris.", "The capital of France is Berlin.", "I like turtles."]
    try:
        got = await pool.score("smollm2-judge", messages, answers, deadline=Deadline.after(60))
    finally:
        await pool.aclose()
    dicts = [{"role": "user", "content": messages[0].content}]
    for answer, score in zip(answers, got.scores, strict=True):
        want = checkpoints.reference_judge_reward(gguf.parent, dicts, answer, gguf_file=gguf.name)
        assert score.reward == pytest.approx(want, abs=1e-4)
    # Real weights, not random: the right answer is preferred.
    assert got.scores[0].reward > got.scores[1].reward
