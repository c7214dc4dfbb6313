"""backend = "sglang": rewards scored on SGLang reward servers equal our workers' within
1e-4 in fp32, for an outcome sequence classifier and Qwen2ForRewardModel; start-up
refuses servers that are not what the entry says and process reward models (SGLang has
no step rewards); a failed server is left for the next; per-server figures reach the
gateway's metrics and /ready follows the servers.

Against FakeSglangReward (SGLang's native routes computed by the transformers reference,
tests/fakes/sglang_reward.py). A real SGLang server was not run: SGLang needs a GPU
(or its own CPU build), and neither was available where this was written.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from bon_gateway.errors import WorkerError
from bon_gateway.metrics import Metrics
from bon_gateway.scoring.pool import WorkerPool
from bon_gateway.types import Deadline, Message
from tests.fakes.sglang_reward import FakeSglangReward
from tests.fixtures.checkpoints import cached_checkpoint
from tests.fixtures.reward_checkpoints import build_qwen2_math_rm
from tests.scoring.helpers import MESSAGES, gateway_config, mixed_candidates
from tests.scoring.test_vllm_backend import SMALL, small_orm, small_prm

pytestmark = pytest.mark.integration

TOL = 1e-4
QUESTION = [Message("user", "Tom has 3 apples and buys 4 more. How many apples does he have?")]
ANSWERS = ["Tom starts with 3 apples and buys 4 more: 3 + 4 = 7. The answer is 7.", "12", "7"]


def small_qwen2_rm() -> Path:
    return cached_checkpoint(
        "qwen2-rm-hd64-s23", lambda out: build_qwen2_math_rm(out, process=False, seed=23, **SMALL)
    )


def _sglang(name: str, path: Path, url: str, **fields: object) -> dict[str, object]:
    return {"name": name, "path": str(path), "backend": "sglang", "backend_urls": [url], **fields}


async def _pool(*entries: dict[str, object], metrics: Metrics | None = None) -> WorkerPool:
    pool = WorkerPool(gateway_config(*entries), metrics or Metrics())
    await pool.start()
    return pool


async def _start_fails(entry: dict[str, object], match: str) -> None:
    pool = WorkerPool(gateway_config(entry), Metrics())
    with pytest.raises(WorkerError, match=match):
        await pool.start()
    await pool.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fakes() -> AsyncIterator[tuple[FakeSglangReward, FakeSglangReward, WorkerPool]]:
    orm, rm = small_orm(), small_qwen2_rm()
    with FakeSglangReward(orm, "orm") as orm_server, FakeSglangReward(rm, "rm") as rm_server:
        pool = await _pool(
            {"name": "orm", "path": str(orm)},
            _sglang("orm-s", orm, orm_server.url),
            {"name": "rm", "path": str(rm)},
            _sglang("rm-s", rm, rm_server.url),
        )
        try:
            yield orm_server, rm_server, pool
        finally:
            await pool.aclose()


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("model", ["orm", "rm"])
async def test_rewards_on_the_fake_server_equal_our_workers(
    fakes: tuple[object, object, WorkerPool], model: str
) -> None:
    pool = fakes[2]
    for messages, candidates in ((MESSAGES, mixed_candidates()), (QUESTION, ANSWERS)):
        want = await pool.score(model, messages, candidates, deadline=Deadline.after(120))
        got = await pool.score(f"{model}-s", messages, candidates, deadline=Deadline.after(120))
        assert len(got.scores) == len(candidates)
        for w, g in zip(want.scores, got.scores, strict=True):
            assert g.reward == pytest.approx(w.reward, abs=TOL)
            assert g.logits == pytest.approx(w.logits, abs=TOL)
            assert g.tokens == w.tokens
        assert len({round(s.reward, 6) for s in got.scores}) > 1  # really different scores


@pytest.mark.asyncio(loop_scope="module")
async def test_a_group_is_one_request(
    fakes: tuple[FakeSglangReward, FakeSglangReward, WorkerPool],
) -> None:
    orm_server, _, pool = fakes
    before = orm_server.calls
    await pool.score("orm-s", MESSAGES, mixed_candidates(), deadline=Deadline.after(60))
    assert orm_server.calls == before + 1
    assert orm_server.batch_sizes[-1] == len(mixed_candidates())


async def test_a_process_reward_model_fails_start_up() -> None:
    prm = small_prm()
    with FakeSglangReward(small_orm(), "prm") as server:
        await _start_fails(_sglang("prm-s", prm, server.url), "SGLang cannot serve .* process reward model")


async def test_an_activated_server_fails_start_up() -> None:
    """One label: the score is checked against our head on the server's pooled hidden state."""
    orm = small_orm()
    with FakeSglangReward(orm, "orm", activate=True) as server:
        await _start_fails(_sglang("orm-s", orm, server.url), "our formula .* an activated server")


async def test_an_activated_older_server_with_two_labels_fails_start_up(tiny_qwen2_classifier: Path) -> None:
    """No pooled hidden state (an older SGLang refuses the field): with two labels, softmaxed
    outputs are a probability distribution, raw ones are not."""
    path = tiny_qwen2_classifier
    with FakeSglangReward(path, "cls", activate=True, pooled_hidden=False) as server:
        await _start_fails(_sglang("cls-s", path, server.url), "returns probabilities")


@pytest.mark.parametrize("pooled_hidden", [True, False])
async def test_the_raw_two_label_classifier_starts(tiny_qwen2_classifier: Path, pooled_hidden: bool) -> None:
    """The checks above do not refuse a raw server (with and without the hidden states)."""
    with FakeSglangReward(tiny_qwen2_classifier, "cls", pooled_hidden=pooled_hidden) as server:
        pool = await _pool(_sglang("cls-s", tiny_qwen2_classifier, server.url))
        try:
            result = await pool.score("cls-s", MESSAGES, ["a", "b"], deadline=Deadline.after(60))
            assert [s.labels for s in result.scores] == [2, 2]
        finally:
            await pool.aclose()


@pytest.mark.parametrize(
    ("fields", "server_kw", "match"),
    [
        ({"backend_model": "other"}, {}, r"serves \['orm'\], not 'other'"),
        ({"backend_urls": ["http://127.0.0.1:9"]}, {}, "no SGLang server answers /v1/models"),
        ({}, {"generation": True}, "start it with --is-embedding"),
    ],
)
async def test_start_up_names_what_is_wrong(
    fields: dict[str, object], server_kw: dict[str, bool], match: str
) -> None:
    orm = small_orm()
    with FakeSglangReward(orm, "orm", **server_kw) as server:
        await _start_fails({**_sglang("orm-s", orm, server.url), **fields}, match)


async def test_judges_are_refused_for_the_sglang_backend(tiny_judge_lm: Path) -> None:
    entry = _sglang("j", tiny_judge_lm, "http://127.0.0.1:9", kind="judge")
    await _start_fails(entry, 'needs backend = "workers"')


# Failover to the next server: tests/scoring/test_vllm_backend.py, for both backends.


async def test_server_figures_reach_the_metrics_and_ready_follows_the_servers() -> None:
    orm = small_orm()
    metrics = Metrics()
    get = metrics.registry.get_sample_value
    with FakeSglangReward(orm, "orm") as server:
        label = server.url.removeprefix("http://")
        labels = {"model": "orm-s", "server": label}
        probe = {"interval_s": 0.2, "timeout_s": 2.0, "restart_after_s": 0}
        pool = WorkerPool(gateway_config(_sglang("orm-s", orm, server.url, probe=probe)), metrics)
        assert get("bon_backend_server_up", labels) == 0  # known before start-up, at 0
        assert get("bon_backend_server_errors_total", {**labels, "kind": "http_5xx"}) == 0
        await pool.start()
        try:
            assert pool.ready()
            assert get("bon_backend_server_up", labels) == 1
            await pool.score("orm-s", MESSAGES, ["a", "b"], deadline=Deadline.after(30))
            await _until(lambda: get("bon_backend_server_request_duration_seconds_count", labels) == 1)
            server.fail_with = 503
            with pytest.raises(WorkerError, match="no SGLang server of 'orm-s' scored the group"):
                await pool.score("orm-s", MESSAGES, ["a"], deadline=Deadline.after(10))
            await _until(lambda: not pool.ready())
            assert get("bon_backend_server_up", labels) == 0
            assert (get("bon_backend_server_errors_total", {**labels, "kind": "http_5xx"}) or 0) >= 1
            assert get("bon_workers_up", {"model": "orm-s"}) == 0
            assert pool.worker_pids()  # the worker process was not killed: its servers were down
            server.fail_with = None  # /health answers: the server is probed back in
            await _until(pool.ready)
            assert get("bon_backend_server_up", labels) == 1
            result = await pool.score("orm-s", MESSAGES, ["a"], deadline=Deadline.after(30))
            assert len(result.scores) == 1
        finally:
            await pool.aclose()


async def _until(predicate: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.05)
