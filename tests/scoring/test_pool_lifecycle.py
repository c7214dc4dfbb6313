"""Worker pool start-up failures, bad input, shutdown, and the front staying torch-free."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from bon_gateway.config import ConfigError, RewardModelConfig, parse_config
from bon_gateway.errors import DeadlineExceeded, InvalidRequest, WorkerError
from bon_gateway.metrics import Metrics
from bon_gateway.scoring.pool import WorkerPool, worker_gpus
from bon_gateway.types import Deadline
from bon_gateway.v1 import reward_worker_pb2
from tests.fixtures import checkpoints
from tests.scoring.helpers import MESSAGE_DICTS, MESSAGES, gateway_config


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _children() -> set[int]:
    me = str(os.getpid())
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[1] == me and fields[0] != "Z":
            kids.add(int(stat.parent.name))
    return kids


def _truncated_reference(path: Path, answer: str, limit: int) -> float:
    """The reference on the left-truncated sequence: first token (BOS) kept, oldest prompt tokens cut."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    text = tok.apply_chat_template([*MESSAGE_DICTS, {"role": "assistant", "content": answer}], tokenize=False)
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) > limit
    ids = ids[:1] + ids[1 + len(ids) - limit :]
    with torch.no_grad():
        return float(model(input_ids=torch.tensor([ids])).logits[0][0])


@pytest.mark.integration
@pytest.mark.asyncio
async def test_unsupported_architecture_fails_at_start_with_the_list(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints.tiny_llama_rm(), bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["FancyForSequenceClassification"]
    (bad / "config.json").write_text(json.dumps(config))
    before = _children()
    pool = WorkerPool(gateway_config({"name": "bad", "path": str(bad)}), Metrics())
    with pytest.raises(WorkerError) as info:
        await pool.start()
    message = info.value.message
    # The worker's own error, from its status pipe (not scraped from its log lines).
    assert message.startswith("reward model 'bad': worker failed to start: unsupported architecture")
    assert "FancyForSequenceClassification" in message
    for arch in (
        "LlamaForSequenceClassification",
        "Qwen2ForSequenceClassification",
        "Qwen3ForSequenceClassification",
    ):
        assert arch in message
    assert not pool.ready()
    assert _children() - before == set()


@pytest.mark.integration
@pytest.mark.asyncio
async def test_overlong_input_truncation_and_clean_shutdown(tiny_llama_rm: Path) -> None:
    config = gateway_config(
        {"name": "strict", "path": str(tiny_llama_rm), "max_length": 96},
        {"name": "lenient", "path": str(tiny_llama_rm), "max_length": 96, "truncate_prompt": True},
    )
    metrics = Metrics()
    before = _children()
    pool = WorkerPool(config, metrics)
    await pool.start()
    try:
        pids = pool.worker_pids()
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        assert metrics.workers_up.labels("strict")._value.get() == 1
        long_answer = "word " * 120
        with pytest.raises(InvalidRequest) as info:
            await pool.score("strict", MESSAGES, ["short", long_answer], deadline=Deadline.after(60))
        assert "candidates[1]" in info.value.message and "max_length of 96" in info.value.message
        assert info.value.param == "candidates[1]"
        # The worker keeps serving after bad input.
        ok = await pool.score("strict", MESSAGES, ["short"], deadline=Deadline.after(60))
        want = checkpoints.reference_outcome_reward(tiny_llama_rm, MESSAGE_DICTS, "short")
        assert ok.scores[0].reward == pytest.approx(want, abs=1e-4)
        # Left-truncating the prompt: the answer is kept whole, the prompt loses its oldest tokens.
        mid_answer = "word " * 70
        got = await pool.score("lenient", MESSAGES, [mid_answer, "short"], deadline=Deadline.after(60))
        assert got.scores[0].tokens == 96
        assert got.scores[0].reward == pytest.approx(
            _truncated_reference(tiny_llama_rm, mid_answer, 96), abs=1e-4
        )
        assert got.scores[1].reward == pytest.approx(want, abs=1e-4)  # short: nothing cut
        # The answer alone too long: still an error, never cut.
        with pytest.raises(InvalidRequest):
            await pool.score("lenient", MESSAGES, ["word " * 200], deadline=Deadline.after(60))
        with pytest.raises(InvalidRequest):
            await pool.score("nope", MESSAGES, ["x"], deadline=Deadline.after(60))
    finally:
        await pool.aclose()
    assert not any(_alive(p) for p in pids)
    assert _children() - before == set()
    assert metrics.workers_up.labels("strict")._value.get() == 0


@pytest.mark.integration
@pytest.mark.asyncio
async def test_worker_dying_before_it_serves_is_a_start_failure(tiny_llama_rm: Path) -> None:
    # A crash (here: a kill while it loads) leaves no status: the exit code says what happened.
    pool = WorkerPool(gateway_config({"name": "rm", "path": str(tiny_llama_rm)}), Metrics(), restart=False)
    starting = asyncio.create_task(pool.start())
    while not pool.worker_pids():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    os.kill(pool.worker_pids()[0], signal.SIGKILL)
    with pytest.raises(WorkerError, match=r"worker exited with code -9 before serving"):
        await starting


@pytest.mark.integration
@pytest.mark.asyncio
async def test_deadline_bounds_the_worker_call(tiny_llama_rm: Path) -> None:
    pool = WorkerPool(gateway_config({"name": "rm", "path": str(tiny_llama_rm)}), Metrics())
    await pool.start()
    try:
        (worker,) = pool._workers["rm"]
        assert worker.stub is not None

        async def groups_scored() -> int:
            assert worker.stub is not None
            info = await worker.stub.Info(reward_worker_pb2.WorkerInfoRequest(), timeout=10)
            return int(info.groups_scored)

        # An expired deadline: refused before any call.
        with pytest.raises(DeadlineExceeded):
            await pool.score("rm", MESSAGES, ["x"], deadline=Deadline(time.monotonic() - 1))
        assert await groups_scored() == 0
        # The worker call gets the time left, not the server's request timeout (300 s here):
        # a big group cannot be scored in 50 ms (distinct texts: identical ones would share
        # their keys and values, and 64 of them took under 50 ms on a fast machine).
        big = [f"w{i} " + "word " * 300 for i in range(128)]
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await pool.score("rm", MESSAGES, big, deadline=Deadline.after(0.05))
        assert time.monotonic() - started < 5
        ok = await pool.score("rm", MESSAGES, ["short"], deadline=Deadline.after(60))
        want = checkpoints.reference_outcome_reward(tiny_llama_rm, MESSAGE_DICTS, "short")
        assert ok.scores[0].reward == pytest.approx(want, abs=1e-4)
        # No worker up: waiting for one ends at the deadline, not at the pool's start timeout.
        pool._workers["rm"] = []
        with pytest.raises(DeadlineExceeded):
            await asyncio.wait_for(pool.score("rm", MESSAGES, ["x"], deadline=Deadline.after(0.2)), 5)
        pool._workers["rm"] = [worker]
    finally:
        await pool.aclose()


@pytest.mark.parametrize(
    ("device", "workers", "gpus_per_worker", "want"),
    [
        ("cpu", 2, 1, [None, None]),
        ("cuda", 1, 1, [None]),  # one worker sees every GPU, as the operator set it
        ("cuda", 2, 1, ["0", "1"]),  # one worker per GPU
        ("cuda", 2, 2, ["0,1", "2,3"]),  # each worker spans its own two GPUs
        ("cuda", 1, 4, ["0,1,2,3"]),
    ],
)
def test_each_spawned_worker_gets_its_own_gpus(
    device: str, workers: int, gpus_per_worker: int, want: list[str | None]
) -> None:
    entry = RewardModelConfig(
        name="m", path="-", device=device, workers=workers, gpus_per_worker=gpus_per_worker
    )
    assert [worker_gpus(entry, i) for i in range(workers)] == want


def test_gpus_per_worker_needs_cuda() -> None:
    with pytest.raises(ConfigError, match=r"gpus_per_worker > 1 needs device = \"cuda\""):
        parse_config({"reward_models": [{"name": "m", "path": "-", "device": "cpu", "gpus_per_worker": 2}]})
