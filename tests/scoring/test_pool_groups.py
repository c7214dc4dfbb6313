"""WorkerPool.open_group over real spawned workers: the prompt checked when the group opens,
candidates and partials scored against the kept prompt (exact), sticky to one worker,
moved when that worker dies; plain one-sample requests reusing a cached prompt."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bon_gateway.config import GatewayConfig
from bon_gateway.engine.engine import Engine
from bon_gateway.errors import InvalidRequest
from bon_gateway.metrics import Metrics
from bon_gateway.scoring.group import PooledGroup
from bon_gateway.scoring.pool import WorkerPool
from bon_gateway.scoring.wire import score_request
from bon_gateway.types import BonRequest, Deadline, Message
from tests.fakes.generator import ScriptedGenerator
from tests.fakes.scorer import FakeScorer
from tests.fixtures import checkpoints
from tests.scoring.helpers import MESSAGE_DICTS, MESSAGES, gateway_config, mixed_candidates

TOL = 1e-4
LONG_PROMPT = (Message("user", "Please think about this at length. " * 20),)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool(tiny_llama_rm: Path) -> AsyncIterator[WorkerPool]:
    config = gateway_config(
        {"name": "rm", "path": str(tiny_llama_rm), "max_length": 1024},
        {"name": "short", "path": str(tiny_llama_rm), "max_length": 60},
        {"name": "cut", "path": str(tiny_llama_rm), "max_length": 60, "truncate_prompt": True},
    )
    pool = WorkerPool(config, Metrics())
    await pool.start()
    yield pool
    await pool.aclose()


def reused(pool: WorkerPool, model: str) -> float:
    value = pool.metrics.registry.get_sample_value("bon_reused_prompt_tokens_total", {"model": model})
    return float(value or 0.0)


def want(path: Path, answer: str) -> float:
    return checkpoints.reference_outcome_reward(path, MESSAGE_DICTS, answer)


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
async def test_candidates_scored_as_they_finish_against_the_kept_prompt(
    pool: WorkerPool, tiny_llama_rm: Path
) -> None:
    group = pool.open_group("rm", MESSAGES, deadline=Deadline.after(60), request_id="g1")
    await group.opened()
    assert group.prompt_tokens > 16
    assert isinstance(group, PooledGroup) and group.group_id and group.worker is not None
    before = reused(pool, "rm")
    candidates = mixed_candidates()
    # One candidate at a time, then two at once, then the rest concurrently (as they finish).
    results = [await group.score(candidates[:1], deadline=Deadline.after(60))]
    results.append(await group.score(candidates[1:3], deadline=Deadline.after(60)))
    results += await asyncio.gather(*(group.score([c], deadline=Deadline.after(60)) for c in candidates[3:]))
    rewards = [s.reward for r in results for s in r.scores]
    assert rewards == pytest.approx([want(tiny_llama_rm, c) for c in candidates], abs=TOL)
    # The prompt was computed once, when the group opened: every candidate but its first
    # reader saved it.
    assert reused(pool, "rm") - before >= (len(candidates) - 1) * (group.prompt_tokens - 1)
    gauges = pool.metrics.registry
    assert (gauges.get_sample_value("bon_prompt_cache_bytes", {"model": "rm"}) or 0) > 0
    assert (gauges.get_sample_value("bon_prompt_cache_entries", {"model": "rm"}) or 0) > 0
    await group.close()
    await group.close()  # twice: nothing happens


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
async def test_partials_reuse_the_candidate_s_earlier_text(pool: WorkerPool, tiny_llama_rm: Path) -> None:
    group = pool.open_group("rm", MESSAGES, deadline=Deadline.after(60))
    await group.opened()
    text = " ".join(f"Step {i}: we add {i} and {2 * i}." for i in range(60))
    saved: list[float] = []
    lengths: list[int] = []
    for cut in (120, 260, 520, len(text)):
        before = reused(pool, "rm")
        result = await group.score([text[:cut]], deadline=Deadline.after(60))
        assert result.scores[0].reward == pytest.approx(want(tiny_llama_rm, text[:cut]), abs=TOL)
        saved.append(reused(pool, "rm") - before)
        lengths.append(result.scores[0].tokens)
    # From the second partial on, all of the previous one is reused (but its last few tokens,
    # which the template's end and the tokenizer's merges change).
    for earlier, got in zip(lengths, saved[1:], strict=False):
        assert got >= earlier - 8
    await group.close()


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
async def test_a_prompt_too_long_fails_when_the_group_opens(pool: WorkerPool) -> None:
    group = pool.open_group("short", LONG_PROMPT, deadline=Deadline.after(60))
    with pytest.raises(InvalidRequest) as info:
        await group.opened()
    assert info.value.param == "messages" and "max_length" in info.value.message
    with pytest.raises(InvalidRequest) as again:
        await group.score(["x"], deadline=Deadline.after(60))
    assert again.value.param == "messages"
    await group.close()
    # With truncate_prompt the prompt is cut, not refused.
    cut = pool.open_group("cut", LONG_PROMPT, deadline=Deadline.after(60))
    await cut.opened()
    result = await cut.score(["fine"], deadline=Deadline.after(60))
    assert result.scores[0].tokens == 60
    await cut.close()
    unknown = pool.open_group("nope", MESSAGES, deadline=Deadline.after(60))
    with pytest.raises(InvalidRequest) as missing:
        await unknown.opened()
    assert missing.value.param == "reward_model"
    await unknown.close()


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
async def test_unknown_and_closed_group_ids_fall_back(pool: WorkerPool, tiny_llama_rm: Path) -> None:
    (worker,) = pool.workers("rm")
    assert worker.stub is not None
    request = score_request("rm", MESSAGES, ["391", "17 * 23 = 391."])
    request.group_id = "no-such-group"
    request.keep_candidates = True
    reply = await worker.stub.Score(request, timeout=60)
    assert [s.reward for s in reply.scores] == pytest.approx(
        [want(tiny_llama_rm, "391"), want(tiny_llama_rm, "17 * 23 = 391.")], abs=TOL
    )
    group = pool.open_group("rm", MESSAGES, deadline=Deadline.after(60))
    await group.opened()
    assert isinstance(group, PooledGroup)
    group_id = group.group_id
    await group.close()
    from bon_gateway.v1 import reward_worker_pb2

    closed = await worker.stub.CloseGroup(
        reward_worker_pb2.WorkerCloseGroupRequest(model="rm", group_id=group_id)
    )
    assert not closed.found  # already released by close()
    request.group_id = group_id
    reply = await worker.stub.Score(request, timeout=60)
    assert reply.scores[0].reward == pytest.approx(want(tiny_llama_rm, "391"), abs=TOL)


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
async def test_one_sample_per_request_reuses_the_prompt(pool: WorkerPool, tiny_llama_rm: Path) -> None:
    """The RLHF case: requests of one sample each, the same prompt, many in flight."""
    prompt = (Message("system", "You are graded by a reward model."), Message("user", "Explain 2 + 2."))
    dicts = [{"role": m.role, "content": m.content} for m in prompt]
    samples = [f"Answer {i}: two and two make {4 + i % 2}." for i in range(12)]
    before = reused(pool, "rm")
    results = await asyncio.gather(
        *(pool.score("rm", prompt, [s], deadline=Deadline.after(60)) for s in samples)
    )
    for sample, result in zip(samples, results, strict=True):
        expected = checkpoints.reference_outcome_reward(tiny_llama_rm, dicts, sample)
        assert result.scores[0].reward == pytest.approx(expected, abs=TOL)
    prompt_tokens = results[0].prompt_tokens
    # Computed once (by whichever request came first), reused by the others.
    assert reused(pool, "rm") - before >= (len(samples) - 1) * (prompt_tokens - 2)


@pytest.mark.integration
@pytest.mark.asyncio
async def test_a_group_moves_when_its_worker_dies(tiny_llama_rm: Path) -> None:
    pool = WorkerPool(gateway_config({"name": "rm", "path": str(tiny_llama_rm), "workers": 2}), Metrics())
    await pool.start()
    try:
        group = pool.open_group("rm", MESSAGES, deadline=Deadline.after(120))
        await group.opened()
        assert isinstance(group, PooledGroup)
        first = group.worker
        assert first is not None and first.proc is not None
        candidates = mixed_candidates()[:4]
        result = await group.score(candidates[:2], deadline=Deadline.after(120))
        assert [s.reward for s in result.scores] == pytest.approx(
            [want(tiny_llama_rm, c) for c in candidates[:2]], abs=TOL
        )
        os.kill(first.proc.pid, signal.SIGKILL)
        # Its next call goes to the other worker (which recomputes the prompt); nothing fails.
        result = await group.score(candidates[2:], deadline=Deadline.after(120))
        assert [s.reward for s in result.scores] == pytest.approx(
            [want(tiny_llama_rm, c) for c in candidates[2:]], abs=TOL
        )
        await group.opened()  # the group re-opened on the worker that answered
        assert group.worker is not None and group.worker is not first and group.group_id
        result = await group.score(candidates[:1], deadline=Deadline.after(120))
        assert result.scores[0].reward == pytest.approx(want(tiny_llama_rm, candidates[0]), abs=TOL)
        await group.close()
        # A group whose worker is gone closes without an error.
        lost = pool.open_group("rm", MESSAGES, deadline=Deadline.after(120))
        await lost.opened()
        assert isinstance(lost, PooledGroup) and lost.worker is not None and lost.worker.proc is not None
        os.kill(lost.worker.proc.pid, signal.SIGKILL)
        await asyncio.sleep(0.2)
        await lost.close()
    finally:
        await pool.aclose()


@pytest.mark.asyncio
async def test_fake_scorer_groups_record_their_calls() -> None:
    scorer = FakeScorer({"good": 2.0})
    group = scorer.open_group("fake-rm", MESSAGES, deadline=Deadline.after(5), request_id="r")
    await group.opened()
    result = await group.score(["good", "bad"], deadline=Deadline.after(5))
    assert [s.reward for s in result.scores] == [2.0, 0.0]
    await group.close()
    assert scorer.groups == [group] and group.scored == [("good", "bad")] and group.closed
    assert scorer.calls[-1].candidates == ("good", "bad") and scorer.calls[-1].messages == MESSAGES
    scorer.open_error = InvalidRequest("too long", param="messages")
    with pytest.raises(InvalidRequest):
        await scorer.open_group("fake-rm", MESSAGES, deadline=Deadline.after(5)).opened()


class _RecordingGroup:
    """A pool group that records the texts of its calls in `calls`."""

    def __init__(self, group: Any, calls: list[tuple[str, ...]]) -> None:
        self.group = group
        self.calls = calls

    def __getattr__(self, name: str) -> Any:
        return getattr(self.group, name)

    async def score(self, texts: Any, *, deadline: Deadline) -> Any:
        self.calls.append(tuple(texts))
        return await self.group.score(texts, deadline=deadline)


class _Recording:
    """The pool as the engine's scorer, its groups recording their calls."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.calls: list[tuple[str, ...]] = []
        self.groups: list[_RecordingGroup] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)

    def open_group(self, model: str, messages: Any, *, deadline: Deadline, request_id: str = "") -> Any:
        group = self.pool.open_group(model, messages, deadline=deadline, request_id=request_id)
        self.groups.append(_RecordingGroup(group, self.calls))
        return self.groups[-1]


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
async def test_texts_sent_ahead_are_reused_and_every_reward_stays_exact(
    pool: WorkerPool, tiny_llama_rm: Path
) -> None:
    # Best-of-3 on the real pool, the candidates streaming word by word (10 ms a step),
    # their texts sent ahead every 8 words: every reward equals the reference forward of
    # the whole text, and the calls reused the candidates' earlier texts, not only the prompt.
    candidates = [" ".join(f"Step {i}: add {i} and {j}." for i in range(n)) for j, n in enumerate((3, 9, 14))]
    config = GatewayConfig.model_validate(
        {
            "generator": {"url": "http://127.0.0.1:9/v1", "model": "scripted"},
            "strategy": {"prefill_every": 8},
        }
    )
    scorer = _Recording(pool)
    gateway = Engine(config, ScriptedGenerator(candidates, step_s=0.01), scorer, Metrics())  # type: ignore[arg-type]
    before = reused(pool, "rm")
    request = BonRequest(MESSAGES, best_of=3, reward_model="rm")
    result = await gateway.run(gateway.admit(request), Deadline.after(60))
    got = {c.index: c.reward for c in result.ranked}
    assert got == pytest.approx({i: want(tiny_llama_rm, t) for i, t in enumerate(candidates)}, abs=TOL)
    texts = [t for call in scorer.calls for t in call]
    ahead = [t for t in texts if t not in candidates]
    assert len(ahead) >= 4, scorer.calls  # the long ones went ahead several times
    # A text reuses at most the whole prompt from the prompt alone: the rest is the
    # candidates' own earlier texts.
    assert reused(pool, "rm") - before > len(texts) * scorer.groups[0].prompt_tokens
