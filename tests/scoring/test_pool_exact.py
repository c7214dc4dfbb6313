"""Scores through a real spawned worker equal the plain transformers forward."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from bon_gateway.errors import InvalidRequest
from bon_gateway.metrics import Metrics
from bon_gateway.scoring.pool import WorkerPool
from bon_gateway.types import Deadline
from tests.scoring.helpers import MESSAGE_DICTS, MESSAGES, gateway_config, mixed_candidates

pytestmark = pytest.mark.integration

TOL = 1e-4


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool(
    tiny_llama_rm: Path, tiny_qwen2_rm: Path, tiny_qwen3_rm: Path, tiny_judge_lm: Path
) -> AsyncIterator[WorkerPool]:
    config = gateway_config(
        {"name": "llama", "path": str(tiny_llama_rm), "max_length": 1024},
        {"name": "qwen2", "path": str(tiny_qwen2_rm)},
        {"name": "qwen3", "path": str(tiny_qwen3_rm)},
        {"name": "judge", "path": str(tiny_judge_lm), "kind": "judge"},
    )
    pool = WorkerPool(config, Metrics())
    await pool.start()
    yield pool
    await pool.aclose()


def _reference(kind: str, path: Path, answer: str, refs: dict[str, object]) -> float:
    fn = refs["judge" if kind == "judge" else "outcome"]
    return fn(path, MESSAGE_DICTS, answer)  # type: ignore[operator]


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("model", ["llama", "qwen2", "qwen3", "judge"])
async def test_scores_equal_reference(
    pool: WorkerPool,
    model: str,
    request: pytest.FixtureRequest,
    reference_outcome_reward: object,
    reference_judge_reward: object,
) -> None:
    path = Path(pool.config.reward_model(model).path)
    candidates = mixed_candidates()
    result = await pool.score(model, MESSAGES, candidates, request_id="t", deadline=Deadline.after(60))
    assert result.model == model
    assert len(result.scores) == len(candidates)
    refs = {"outcome": reference_outcome_reward, "judge": reference_judge_reward}
    for answer, got in zip(candidates, result.scores, strict=True):
        want = _reference(model, path, answer, refs)
        assert got.reward == pytest.approx(want, abs=TOL), (model, answer[:20])
    lengths = [s.tokens for s in result.scores]
    assert max(lengths) - min(lengths) > 300  # answers from 0 to ~400 tokens
    assert result.total_tokens == sum(lengths)


@pytest.mark.asyncio(loop_scope="module")
async def test_models_report_architectures(pool: WorkerPool) -> None:
    assert pool.ready()
    got = {m.name: (m.kind, m.architecture) for m in pool.models()}
    assert got == {
        "llama": ("reward", "LlamaForSequenceClassification"),
        "qwen2": ("reward", "Qwen2ForSequenceClassification"),
        "qwen3": ("reward", "Qwen3ForSequenceClassification"),
        "judge": ("reward", "LlamaForCausalLM"),
    }


@pytest.mark.asyncio(loop_scope="module")
async def test_concurrent_requests_batched_still_exact(
    pool: WorkerPool, reference_outcome_reward: object
) -> None:
    path = Path(pool.config.reward_model("llama").path)
    candidates = mixed_candidates()
    groups = [candidates[i:] + candidates[:i] for i in range(4)]
    registry = pool.metrics.registry
    small_before = registry.get_sample_value("bon_score_batch_size_bucket", {"model": "llama", "le": "8.0"})
    count_before = registry.get_sample_value("bon_score_batch_size_count", {"model": "llama"})
    results = await asyncio.gather(
        *(pool.score("llama", MESSAGES, g, deadline=Deadline.after(60)) for g in groups)
    )
    small = registry.get_sample_value("bon_score_batch_size_bucket", {"model": "llama", "le": "8.0"})
    count = registry.get_sample_value("bon_score_batch_size_count", {"model": "llama"})
    # Every batch observed once; at least one held several requests' groups (> 8 rows).
    assert 1 <= count - count_before < 4
    assert count - count_before > small - small_before
    assert registry.get_sample_value("bon_reused_prompt_tokens_total", {"model": "llama"}) > 0
    for group, result in zip(groups, results, strict=True):
        for answer, got in zip(group, result.scores, strict=True):
            want = reference_outcome_reward(path, MESSAGE_DICTS, answer)  # type: ignore[operator]
            assert got.reward == pytest.approx(want, abs=TOL)


@pytest.mark.asyncio(loop_scope="module")
async def test_cancelled_request_then_next_request_exact(
    pool: WorkerPool, reference_outcome_reward: object
) -> None:
    # Distinct long texts the worker has not seen: repeated ones share keys and values
    # and were scored in under 50 ms on a fast machine, before the cancel arrived.
    big = [f"c{i} " + "word " * 300 for i in range(128)]
    task = asyncio.create_task(pool.score("qwen3", MESSAGES, big, deadline=Deadline.after(60)))
    await asyncio.sleep(0.05)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    path = Path(pool.config.reward_model("qwen3").path)
    got = await pool.score("qwen3", MESSAGES, ["391"], activation="sigmoid", deadline=Deadline.after(60))
    raw = reference_outcome_reward(path, MESSAGE_DICTS, "391")  # type: ignore[operator]
    assert got.scores[0].reward == pytest.approx(1 / (1 + math.exp(-raw)), abs=1e-5)


@pytest.mark.asyncio(loop_scope="module")
async def test_bad_activation_is_invalid_request(pool: WorkerPool) -> None:
    with pytest.raises(InvalidRequest) as info:
        await pool.score("qwen2", MESSAGES, ["x"], activation="relu", deadline=Deadline.after(60))
    assert "activation" in info.value.message and info.value.param == "activation"
