"""A killed worker is restarted and its in-flight groups retried; remote workers over TCP."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bon_gateway.errors import Overloaded
from bon_gateway.metrics import Metrics
from bon_gateway.scoring.pool import WorkerPool
from bon_gateway.types import Deadline, ScoreBatchResult
from tests.fixtures import checkpoints
from tests.scoring.helpers import (
    MESSAGE_DICTS,
    MESSAGES,
    gateway_config,
    mixed_candidates,
    remote_worker_process,
)

pytestmark = pytest.mark.integration

TOL = 1e-4


def _candidates_and_reference(checkpoint: Path) -> tuple[list[str], list[float]]:
    """Answers of mixed lengths and their one-sequence reference rewards."""
    candidates = mixed_candidates()
    want = [checkpoints.reference_outcome_reward(checkpoint, MESSAGE_DICTS, a) for a in candidates]
    return candidates, want


@pytest.mark.slow
@pytest.mark.asyncio
async def test_killed_worker_restarted_and_inflight_requests_answered(
    tiny_llama_rm: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bon_gateway.scoring")
    metrics = Metrics()
    pool = WorkerPool(gateway_config({"name": "rm", "path": str(tiny_llama_rm), "workers": 2}), metrics)
    await pool.start()
    try:
        candidates, want = _candidates_and_reference(tiny_llama_rm)
        before = set(pool.worker_pids())
        assert len(before) == 2
        tasks = [
            asyncio.create_task(
                pool.score("rm", MESSAGES, candidates, request_id=f"r{i}", deadline=Deadline.after(60))
            )
            for i in range(12)
        ]
        # Kill a worker while it holds in-flight requests.
        victim = None
        deadline = time.monotonic() + 10
        while victim is None and time.monotonic() < deadline:
            busy = [w for w in pool._workers["rm"] if w.inflight > 0 and w.proc is not None]
            if busy:
                victim = busy[0]
            else:
                await asyncio.sleep(0.001)
        assert victim is not None and victim.proc is not None
        os.kill(victim.proc.pid, signal.SIGKILL)
        results = await asyncio.gather(*tasks)
        for result in results:
            assert [s.reward for s in result.scores] == pytest.approx(want, abs=TOL)
        assert "phase=score-retry" in caplog.text
        # The worker comes back.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if pool.ready() and len(pool.worker_pids()) == 2 and all(w.up for w in pool._workers["rm"]):
                break
            await asyncio.sleep(0.2)
        after = set(pool.worker_pids())
        assert len(after) == 2 and after != before
        assert metrics.worker_restarts.labels("rm")._value.get() == 1
        assert metrics.workers_up.labels("rm")._value.get() == 2
        again = await pool.score("rm", MESSAGES, candidates, deadline=Deadline.after(60))
        assert [s.reward for s in again.scores] == pytest.approx(want, abs=TOL)
    finally:
        await pool.aclose()


@pytest.mark.slow
@pytest.mark.asyncio
async def test_only_worker_killed_inflight_requests_wait_for_its_restart(tiny_llama_rm: Path) -> None:
    # With one worker there is no other to retry on: the retry waits for the restart
    # instead of failing with "no worker is up".
    metrics = Metrics()
    pool = WorkerPool(gateway_config({"name": "rm", "path": str(tiny_llama_rm), "workers": 1}), metrics)
    seen: list[bool] = []  # pool.ready() at each readiness change the listener is told of
    pool.on_readiness_change(lambda: seen.append(pool.ready()))
    await pool.start()
    assert seen == [True]
    try:
        candidates, want = _candidates_and_reference(tiny_llama_rm)
        (worker,) = pool._workers["rm"]
        tasks = [
            asyncio.create_task(
                pool.score("rm", MESSAGES, candidates, request_id=f"r{i}", deadline=Deadline.after(60))
            )
            for i in range(6)
        ]
        deadline = time.monotonic() + 10
        while worker.inflight == 0 and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        assert worker.inflight > 0 and worker.proc is not None
        killed = worker.proc.pid
        os.kill(killed, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
        for result in results:
            assert [s.reward for s in result.scores] == pytest.approx(want, abs=TOL)
        assert pool.worker_pids() != [killed] and len(pool.worker_pids()) == 1
        assert metrics.worker_restarts.labels("rm")._value.get() == 1
        assert seen == [True, False, True]  # died, restarted
    finally:
        await pool.aclose()
    assert seen == [True, False, True, False]  # closed


@pytest.mark.asyncio
async def test_channel_closed_under_inflight_call_is_retried_not_cancelled(tiny_llama_rm: Path) -> None:
    # When a worker dies, its supervisor reconnects and closes the old channel; calls
    # still on it end as "locally cancelled". That must be retried like any worker
    # failure, never surface as a CancelledError of the caller's request.
    pool = WorkerPool(gateway_config({"name": "rm", "path": str(tiny_llama_rm), "workers": 2}), Metrics())
    await pool.start()
    try:
        candidates, want = _candidates_and_reference(tiny_llama_rm)
        tasks = [
            asyncio.create_task(
                pool.score("rm", MESSAGES, candidates, request_id=f"r{i}", deadline=Deadline.after(60))
            )
            for i in range(6)
        ]
        busy = []
        deadline = time.monotonic() + 10
        while not busy and time.monotonic() < deadline:
            busy = [w for w in pool._workers["rm"] if w.inflight > 0]
            await asyncio.sleep(0.001)
        assert busy
        await busy[0].close_channel()
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        for result in results:
            assert [s.reward for s in result.scores] == pytest.approx(want, abs=TOL)
    finally:
        await pool.aclose()


@pytest.fixture
def remote_worker(tiny_qwen2_rm: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`bon-gateway worker --listen 127.0.0.1:PORT`, stopped with SIGTERM (must exit 0)."""
    with remote_worker_process("remote", tiny_qwen2_rm, "--max-wait-ms", "1", "--max-queue-tokens", "1") as w:
        yield w


@pytest.mark.asyncio
async def test_remote_worker_over_tcp(
    tiny_qwen2_rm: Path, remote_worker: tuple[str, subprocess.Popen[bytes]]
) -> None:
    address, proc = remote_worker
    entry = {"name": "remote", "path": str(tiny_qwen2_rm), "addresses": [address]}
    pool = WorkerPool(gateway_config(entry), Metrics(), start_timeout_s=120)
    await pool.start()
    try:
        assert pool.worker_pids() == []  # nothing spawned
        assert [m.architecture for m in pool.models()] == ["Qwen2ForSequenceClassification"]
        candidates = mixed_candidates()[:4]
        got = await pool.score("remote", MESSAGES, candidates, deadline=Deadline.after(60))
        for answer, score in zip(candidates, got.scores, strict=True):
            want = checkpoints.reference_outcome_reward(tiny_qwen2_rm, MESSAGE_DICTS, answer)
            assert score.reward == pytest.approx(want, abs=TOL)
        # A queue bound of one token: while one group runs and one waits, more are shed.
        outcomes = await asyncio.gather(
            *(
                pool.score("remote", MESSAGES, mixed_candidates(), deadline=Deadline.after(60))
                for _ in range(6)
            ),
            return_exceptions=True,
        )
        shed = [o for o in outcomes if isinstance(o, Overloaded)]
        assert shed and "overloaded" in shed[0].message
        assert all(isinstance(o, (Overloaded, ScoreBatchResult)) for o in outcomes)
        again = await pool.score("remote", MESSAGES, candidates, deadline=Deadline.after(60))
        assert [s.reward for s in again.scores] == [s.reward for s in got.scores]
    finally:
        await pool.aclose()
    assert proc.poll() is None  # the pool does not stop workers it did not start


@pytest.mark.asyncio
async def test_co_located_and_remote_worker_share_the_load(tiny_llama_rm: Path) -> None:
    """`workers = 1` plus `addresses`: one spawned worker and one remote one, both serving."""
    candidates = mixed_candidates()[:4]
    want = [checkpoints.reference_outcome_reward(tiny_llama_rm, MESSAGE_DICTS, a) for a in candidates]
    remote = remote_worker_process("rm", tiny_llama_rm, "--threads", "1", "--max-wait-ms", "1")
    with remote as (address, proc):
        entry = {
            "name": "rm",
            "path": str(tiny_llama_rm),
            "workers": 1,
            "addresses": [address],
            "max_wait_ms": 1,
        }
        metrics = Metrics()
        pool = WorkerPool(gateway_config(entry), metrics, start_timeout_s=120)
        await pool.start()
        try:
            assert len(pool.worker_pids()) == 1 and proc.pid not in pool.worker_pids()
            assert metrics.workers_up.labels("rm")._value.get() == 2
            results = await asyncio.gather(
                *(
                    pool.score("rm", MESSAGES, candidates, request_id=f"r{i}", deadline=Deadline.after(60))
                    for i in range(16)
                )
            )
            for result in results:
                assert [s.reward for s in result.scores] == pytest.approx(want, abs=TOL)
            served = pool.served_by_worker("rm")
            assert len(served) == 2 and address in served and sum(served.values()) == 16
            assert all(count > 0 for count in served.values()), served
        finally:
            await pool.aclose()
        assert proc.poll() is None  # the remote worker is not the pool's to stop
