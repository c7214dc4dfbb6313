"""How the pool reaches its workers: ready right after a slow worker starts serving,
and client-side round robin over several workers behind one address."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from bon_gateway.metrics import Metrics
from bon_gateway.scoring.pool import WorkerPool
from tests.scoring.helpers import gateway_config

# How long the slow worker takes before it can serve, on top of its own start (torch
# import, model load). gRPC's default reconnect backoff (1 s, x1.6 per try, +-20 %)
# waits 6-10 s between tries by then, so a pool that leans on it sees the worker late.
START_DELAY_S = 8.0
# The bound of the issue is ~1 s; the margin covers a loaded 2-core machine.
READY_BOUND_S = 2.0


def _slow_start_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every Python process the pool spawns sleep START_DELAY_S before it runs.

    A `sitecustomize` module on the children's PYTHONPATH (the pool passes its own
    environment on): the worker is slow to become ready, as with a big checkpoint,
    without a test hook in the worker itself.
    """
    hook = tmp_path / "slow_start"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(f"import time\ntime.sleep({START_DELAY_S})\n")
    paths = [str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))


def _serving_times(caplog: pytest.LogCaptureFixture) -> list[float]:
    """When the pool read each `phase=serving` line its workers wrote (forwarded stderr)."""
    return [
        r.created for r in caplog.records if r.name == "bon_gateway.scoring" and "phase=serving" in r.message
    ]


@pytest.mark.asyncio
async def test_pool_ready_right_after_a_slow_worker_serves(
    tiny_llama_rm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bon_gateway.scoring")
    _slow_start_hook(tmp_path, monkeypatch)
    pool = WorkerPool(gateway_config({"name": "rm", "path": str(tiny_llama_rm)}), Metrics())
    spawned = time.time()
    await pool.start()
    try:
        ready_at = time.time()
        (served_at,) = _serving_times(caplog)
        assert served_at - spawned >= START_DELAY_S  # the hook did slow the worker down
        assert ready_at - served_at < READY_BOUND_S, f"ready {ready_at - served_at:.1f} s after serving"
        # The same after a restart: the new process is as slow, the pool as quick.
        (pid,) = pool.worker_pids()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while pool.ready():  # the death is seen at once; the restart takes START_DELAY_S at least
            assert time.monotonic() < deadline, "the worker's death was not noticed"
            await asyncio.sleep(0.02)
        while not pool.ready():
            assert time.monotonic() < deadline, "the restarted worker never turned ready"
            await asyncio.sleep(0.02)
        ready_again = time.time()
        served_again = _serving_times(caplog)[1]
        assert ready_again - served_again < READY_BOUND_S, (
            f"ready {ready_again - served_again:.1f} s after the restarted worker served"
        )
    finally:
        await pool.aclose()
