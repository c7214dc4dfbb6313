"""The gateway side of scoring: a pool of RewardWorker processes.

Co-located workers are spawned as `python -m bon_gateway.scoring.worker` on a
Unix socket in a private temp dir and supervised (a dead one is restarted);
remote ones (`addresses` in the model entry) are used over TCP with the same
protocol. An entry with both spawns `workers` and shares the load with the
remote ones (least outstanding groups first). One request's candidates go to
one worker as one group; the worker batches groups across requests.

A remote address may name several workers (`dns:///reward-workers:50061`
resolves to every pod, `ipv4:10.0.0.1:50061,10.0.0.2:50061`): its channel
spreads calls over all of them (gRPC round robin) and stops sending to one
that goes away. How one worker is spawned and reached: handle.py.

This module runs in the front process: it must not import torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

import bon_gateway
from bon_gateway.balancer import upstream_label
from bon_gateway.config import GatewayConfig, RewardModelConfig
from bon_gateway.errors import DeadlineExceeded, InvalidRequest, Overloaded, WorkerError
from bon_gateway.logs import log_phase
from bon_gateway.metrics import Metrics
from bon_gateway.scoring.group import PooledGroup
from bon_gateway.scoring.handle import WorkerHandle
from bon_gateway.scoring.preflight import check_path, check_worker_extra
from bon_gateway.scoring.prober import is_probed, probe_until_closed
from bon_gateway.scoring.wire import error_param, prompt_affinity, score_request
from bon_gateway.types import CandidateScore, Deadline, Message, ModelInfo, RawInput, ScoreBatchResult
from bon_gateway.v1 import reward_worker_pb2

if TYPE_CHECKING:
    from bon_gateway.engine.protocols import RewardScorer, ScoringGroup

log = logging.getLogger("bon_gateway.scoring")

__all__ = ["WorkerPool"]

# A request whose prompt maps to a worker (prompt_affinity) goes there while that worker has
# at most this many calls in flight more than the least loaded: the prompt's cached keys
# and values are worth a short wait, not an idle worker beside a queue.
AFFINITY_SLACK = 2

_DYING_WAIT_S = 0.5  # how long a failed call waits to see whether its worker process died


def _channel_closed() -> grpc.aio.AioRpcError:
    """The error of a call cancelled because the pool closed a dead worker's channel."""
    return grpc.aio.AioRpcError(
        grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), details="worker channel closed"
    )


_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


def worker_gpus(entry: RewardModelConfig, index: int) -> str | None:
    """CUDA_VISIBLE_DEVICES of spawned worker `index`: its own GPU, or its own run of
    `gpus_per_worker` GPUs; None where the worker may see them all (CPU, one worker)."""
    if entry.device != "cuda" or (entry.workers == 1 and entry.gpus_per_worker == 1):
        return None
    first = index * entry.gpus_per_worker
    return ",".join(str(first + k) for k in range(entry.gpus_per_worker))


class WorkerPool:
    """Implements the engine's RewardScorer over RewardWorker processes."""

    def __init__(
        self,
        config: GatewayConfig,
        metrics: Metrics,
        *,
        start_timeout_s: float = 600.0,
        restart: bool = True,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.start_timeout_s = start_timeout_s
        self.restart = restart
        self._workers: dict[str, list[WorkerHandle]] = {}
        self._entries = {m.name: m for m in config.reward_models}
        self._dir: str | None = None
        self._closing = False
        self._up_changed = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []
        self._supervisors: list[asyncio.Task[None]] = []
        # Groups outstanding per model (waiting for a worker or being scored):
        # bounded so overload is shed with 429 instead of piling up in memory.
        self._queue_capacity = config.server.limits.max_queued_groups
        self._outstanding: dict[str, int] = {}
        for name, entry in self._entries.items():
            metrics.score_queue_capacity.labels(name).set(self._queue_capacity)
            metrics.workers_configured.labels(name).set(entry.workers + len(entry.addresses))
            if entry.backend != "workers":
                for index, url in enumerate(entry.backend_urls):
                    metrics.backend_servers.known(name, upstream_label(url, index))

    # -- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        """Spawn or connect every worker and wait until all have loaded their models."""
        for entry in self.config.reward_models:
            if entry.workers:
                check_worker_extra(entry)  # a gateway installed without torch: say what to install
                check_path(entry)  # before spawning: a missing local model fails in a second
        self._dir = tempfile.mkdtemp(prefix="bon-workers-")
        local_count = sum(m.workers for m in self.config.reward_models)
        threads = max(1, (os.cpu_count() or 1) // max(1, local_count))
        for entry in self.config.reward_models:
            # `workers` co-located processes and the remote `addresses`, one pool per model
            workers: list[WorkerHandle] = []
            for i in range(entry.workers):
                sock = f"unix:{self._dir}/{len(self._workers)}-{i}.sock"
                argv = self._argv(entry, sock, threads)
                workers.append(WorkerHandle(entry, sock, argv, self._env(entry, i)))
            workers += [WorkerHandle(entry, addr, None, None) for addr in entry.addresses]
            self._workers[entry.name] = workers
        try:
            all_workers = [w for ws in self._workers.values() for w in ws]
            for w in all_workers:
                if w.argv is not None:
                    await w.spawn()
            await asyncio.gather(*(self._bring_up(w) for w in all_workers))
        except BaseException:
            await self.aclose()
            raise
        for name, workers in self._workers.items():
            self.metrics.workers_up.labels(name).set(sum(w.serving for w in workers))
            for w in workers:
                if w.argv is not None:
                    self._supervisors.append(asyncio.create_task(self._supervise(w)))
                if is_probed(w):  # a hung worker is marked down, retried around, restarted
                    watch = probe_until_closed(w, self._set_up, lambda: self._closing, self._observe)
                    self._supervisors.append(asyncio.create_task(watch, name=f"probe-{w.target}"))

    async def _bring_up(self, worker: WorkerHandle) -> None:
        await worker.connect(self.start_timeout_s)
        log_phase(
            log,
            "worker-ready",
            model=worker.entry.name,
            target=worker.target,
            device=worker.info.device if worker.info else "?",
        )
        self._mark(worker, up=True)
        self._observe(worker)

    def _argv(self, entry: RewardModelConfig, sock: str, threads: int) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "bon_gateway.scoring.worker",
            "--listen",
            sock,
            "--model-json",
            entry.model_dump_json(),
            "--parent-pid",
            str(os.getpid()),
            "--log-level",
            self.config.server.log_level,
            # JSON lines, re-emitted here once with their fields (handle.py): not a
            # second timestamp and level inside this process's own line.
            "--log-format",
            "json",
        ]
        if entry.device == "cpu":
            argv += ["--threads", str(threads)]
        return argv

    @staticmethod
    def _env(entry: RewardModelConfig, index: int) -> dict[str, str]:
        env = dict(os.environ)
        # The child imports this very package, wherever it was imported from.
        root = str(Path(bon_gateway.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        # Weight-loading progress bars (GGUF de-quantizing, safetensors) would reach the
        # gateway log as one long line per refresh; the worker logs its own load phases.
        env.setdefault("TQDM_DISABLE", "1")
        env.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")  # as cli.quiet_grpc_environment
        env.setdefault("GRPC_VERBOSITY", "ERROR")
        # glibc gives each thread that allocates its own arena (the batch threads, torch's);
        # a worker's prefix cache churn fragmented them: over 10,000 varied requests its RSS
        # levelled off ~90 MiB lower with 2 (bench/worker_rss.py). glibc reads it at exec.
        env.setdefault("MALLOC_ARENA_MAX", "2")
        gpus = worker_gpus(entry, index)
        if gpus is not None and "CUDA_VISIBLE_DEVICES" not in env:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        return env

    async def _supervise(self, worker: WorkerHandle) -> None:
        """Restart the worker whenever its process dies (until the pool closes)."""
        delay = 0.5
        while not self._closing:
            assert worker.proc is not None
            code = await worker.proc.wait()
            if self._closing:
                return
            worker.hung_since = None  # dead now, whatever it was before: restarted below
            self._mark(worker, up=False)
            log_phase(
                log, "worker-died", logging.WARNING, model=worker.entry.name, target=worker.target, code=code
            )
            if not self.restart:
                return
            while not self._closing:
                try:
                    await worker.spawn()
                    await worker.connect(self.start_timeout_s)
                    break
                except WorkerError as err:
                    log_phase(
                        log,
                        "worker-restart-failed",
                        logging.ERROR,
                        model=worker.entry.name,
                        error=err.message,
                    )
                    await worker.stop()  # one that is alive but not serving is not kept
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
            if self._closing:
                return
            delay = 0.5
            self.metrics.worker_restarts.labels(worker.entry.name).inc()
            self._mark(worker, up=True)
            self._observe(worker)
            log_phase(log, "worker-restarted", model=worker.entry.name, target=worker.target)

    def _set_up(self, worker: WorkerHandle, up: bool) -> None:
        self._mark(worker, up=up)

    def _observe(self, worker: WorkerHandle) -> None:
        """Read a worker's latest Info: its backend servers' figures, and whether each model
        it serves has a server up (if not, it takes no calls until one is)."""
        info = worker.info
        if info is None or not info.backend_servers:
            return
        self.metrics.backend_servers.record(worker, info.pid, info.backend_servers)
        by_model: dict[str, bool] = {}
        for server in info.backend_servers:
            by_model[server.model] = by_model.get(server.model, False) or server.up
        backends_up = all(by_model.values())
        if backends_up == worker.backends_up:
            return
        worker.backends_up = backends_up
        log_phase(
            log,
            "backend-servers-up" if backends_up else "backend-servers-down",
            logging.INFO if backends_up else logging.WARNING,
            model=worker.entry.name,
            target=worker.target,
            down=",".join(sorted(m for m, up in by_model.items() if not up)),
        )
        self._changed(worker.entry.name)

    def _mark(self, worker: WorkerHandle, *, up: bool) -> None:
        """Set whether `worker` takes calls; a change wakes waiting calls and the listeners."""
        if worker.up == up:
            return
        worker.up = up
        model = worker.entry.name
        if not up:  # a worker that went away took its prefix cache with it
            worker.cache_bytes = worker.cache_entries = 0
            if model in self._workers:
                self._set_cache_gauges(model)
            self.metrics.backend_servers.not_serving(worker)
        self._changed(model)

    def _changed(self, model: str) -> None:
        self.metrics.workers_up.labels(model).set(sum(w.serving for w in self._workers.get(model, ())))
        self._up_changed.set()
        self._up_changed = asyncio.Event()
        for listener in list(self._listeners):
            try:
                listener()
            except Exception:  # one broken listener must not stop the pool's bookkeeping
                log.exception("readiness listener failed")

    def on_readiness_change(self, listener: Callable[[], None]) -> None:
        """Call `listener` (on the event loop) whenever the set of up workers changes."""
        self._listeners.append(listener)

    async def aclose(self) -> None:
        """Stop every spawned worker (SIGTERM, then SIGKILL) and remove the sockets."""
        self._closing = True
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        self._supervisors.clear()
        workers = [w for ws in self._workers.values() for w in ws]
        for w in workers:
            self._mark(w, up=False)
        await asyncio.gather(*(w.stop() for w in workers))
        for name in self._workers:
            self.metrics.workers_up.labels(name).set(0)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- RewardScorer -------------------------------------------------------
    def models(self) -> list[ModelInfo]:
        return [
            ModelInfo(name=name, kind="reward", architecture=self._architecture(name))
            for name in self._entries
        ]

    def _architecture(self, name: str) -> str:
        for w in self._workers.get(name, ()):
            if w.info is not None:
                for m in w.info.models:
                    if m.name == name:
                        return str(m.architecture)
        config = Path(self._entries[name].path) / "config.json"
        try:
            archs = json.loads(config.read_text(encoding="utf-8")).get("architectures") or [""]
            return str(archs[0])
        except (OSError, ValueError):
            return ""

    def ready(self) -> bool:
        return bool(self._workers) and all(any(w.serving for w in ws) for ws in self._workers.values())

    def worker_pids(self) -> list[int]:
        """Process ids of the spawned workers that are running (tests, diagnostics)."""
        return [
            w.proc.pid
            for ws in self._workers.values()
            for w in ws
            if w.proc is not None and w.proc.returncode is None
        ]

    def served_by_worker(self, model: str) -> dict[str, int]:
        """Groups answered per worker target (unix:... spawned, HOST:PORT remote)."""
        return {w.target: w.served for w in self._workers.get(model, [])}

    async def _await_if_dying(self, worker: WorkerHandle) -> None:
        """After a failed call, let a spawned worker that is dying be seen as dead.

        A killed process closes its socket before asyncio reaps it; until then the
        worker still looks up and a retry could pick it again. A dead worker is
        marked down at once, so the retry goes to another one or waits for the restart.
        """
        proc = worker.proc
        if proc is None:
            return
        if proc.returncode is None:
            try:
                await asyncio.wait_for(asyncio.shield(proc.wait()), _DYING_WAIT_S)
            except TimeoutError:
                return  # alive: the failure was something else
        self._mark(worker, up=False)

    async def _pick(
        self,
        model: str,
        exclude: set[int],
        deadline: Deadline,
        prefer: WorkerHandle | None = None,
        affinity: int | None = None,
    ) -> WorkerHandle:
        """The least-loaded live worker, preferring `prefer` (a group's worker, which keeps its
        prompt), then the worker `affinity` (a prompt's hash) maps to while it is not busier
        than the least loaded by more than AFFINITY_SLACK calls, then ones not tried yet;
        waits for a restart (within the request's deadline and the start timeout)."""
        until = min(time.monotonic() + self.start_timeout_s, deadline.at)
        while True:
            if prefer is not None and prefer.serving and id(prefer) not in exclude:
                return prefer
            workers = self._workers[model]
            live = [w for w in workers if w.serving]
            fresh = [w for w in live if id(w) not in exclude] or live
            if fresh:
                least = min(fresh, key=lambda w: w.inflight)
                if affinity is not None and len(workers) > 1:
                    # Over every configured worker, not the live ones: a prompt keeps its
                    # worker while others come and go (and its cached prefix with it).
                    home = workers[affinity % len(workers)]
                    if any(w is home for w in fresh) and home.inflight <= least.inflight + AFFINITY_SLACK:
                        return home
                return least
            if deadline.expired():
                raise DeadlineExceeded(f"no reward worker for {model!r} came up before the deadline")
            if self._closing or time.monotonic() >= until:
                raise WorkerError(f"no reward worker for {model!r} is up")
            waiter = self._up_changed
            try:
                await asyncio.wait_for(waiter.wait(), max(0.0, until - time.monotonic()))
            except TimeoutError:
                pass

    def serves(self, model: str) -> bool:
        return model in self._workers

    def workers(self, model: str) -> list[WorkerHandle]:
        return list(self._workers.get(model, ()))

    def live_worker(self, model: str, exclude: set[int]) -> WorkerHandle | None:
        """The least-loaded worker up now and not in `exclude`, without waiting (None: none)."""
        if self._closing:
            return None
        live = [w for w in self._workers.get(model, ()) if w.serving and id(w) not in exclude]
        return min(live, key=lambda w: w.inflight) if live else None

    async def await_if_dying(self, worker: WorkerHandle) -> None:
        await self._await_if_dying(worker)

    def open_group(
        self, model: str, messages: Sequence[Message], *, deadline: Deadline, request_id: str = ""
    ) -> ScoringGroup:
        """A group for one request's candidates, sticky to one worker; its OpenGroup call
        starts now, in the background (see scoring/group.py)."""
        return PooledGroup(self, model, messages, deadline=deadline, request_id=request_id)

    async def score(
        self,
        model: str,
        messages: Sequence[Message],
        candidates: Sequence[str],
        *,
        deadline: Deadline,
        steps: Sequence[Sequence[str]] = (),
        activation: str | None = None,
        request_id: str = "",
        raw: Sequence[RawInput] = (),
        truncate_prompt_tokens: int = 0,
    ) -> ScoreBatchResult:
        """Scores in input order; each worker call gets the time left before `deadline`."""
        request = score_request(
            model,
            messages,
            candidates,
            steps=steps,
            activation=activation,
            request_id=request_id,
            raw=raw,
            truncate_prompt_tokens=truncate_prompt_tokens,
        )
        affinity = prompt_affinity(messages, raw)
        reply, _ = await self.call_score(model, request, deadline, affinity=affinity)
        return self.result(model, reply)

    async def call_score(
        self,
        model: str,
        request: reward_worker_pb2.WorkerScoreRequest,
        deadline: Deadline,
        prefer: WorkerHandle | None = None,
        affinity: int | None = None,
    ) -> tuple[reward_worker_pb2.WorkerScoreResponse, WorkerHandle]:
        """One group through admission (bounded queue) and a worker (retried once on another
        when it fails); the reply and the worker that gave it. `affinity`: see `_pick`."""
        if model not in self._workers:
            raise InvalidRequest(f"unknown reward model {model!r}", param="reward_model")
        if deadline.expired():
            raise DeadlineExceeded(f"no time left to score with {model!r}")
        outstanding = self._outstanding.get(model, 0)
        if outstanding >= self._queue_capacity:
            raise Overloaded(
                f"scoring queue of {model!r} is full ({self._queue_capacity} groups, "
                "server.limits.max_queued_groups)",
                retry_after_s=self.config.server.limits.retry_after_s,
            )
        self._set_outstanding(model, outstanding + 1)
        try:
            return await self._score_group(model, request, deadline, prefer, affinity)
        finally:
            self._set_outstanding(model, self._outstanding[model] - 1)

    def _set_outstanding(self, model: str, count: int) -> None:
        self._outstanding[model] = count
        self.metrics.score_queue_depth.labels(model).set(count)

    async def _score_group(
        self,
        model: str,
        request: reward_worker_pb2.WorkerScoreRequest,
        deadline: Deadline,
        prefer: WorkerHandle | None,
        affinity: int | None = None,
    ) -> tuple[reward_worker_pb2.WorkerScoreResponse, WorkerHandle]:
        request_id = request.request_id
        tried: set[int] = set()
        for attempt in range(2):  # a group whose worker died is retried once
            worker = await self._pick(model, tried, deadline, prefer, affinity)
            tried.add(id(worker))
            if deadline.expired():
                raise DeadlineExceeded(f"no time left to score with {model!r}")
            worker.inflight += 1
            try:
                assert worker.stub is not None
                try:
                    reply = await worker.call(worker.stub.Score(request, timeout=deadline.remaining()))
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise  # this request was cancelled (deadline, client gone)
                    # The call was cancelled under us: the supervisor closed the channel of
                    # a worker that died, or the prober found the worker hung. That is a
                    # worker failure, not the caller's.
                    raise _channel_closed() from None
            except grpc.aio.AioRpcError as err:
                code = err.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise InvalidRequest(err.details() or "invalid input", param=error_param(err)) from None
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise Overloaded(err.details() or f"reward model {model!r} is overloaded") from None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DeadlineExceeded(
                        f"reward model {model!r} did not answer before the deadline"
                    ) from None
                if code in _RETRYABLE and attempt == 0 and not self._closing:
                    log_phase(
                        log,
                        "score-retry",
                        logging.WARNING,
                        model=model,
                        id=request_id,
                        worker=worker.target,
                        code=code.name,
                    )
                    await self._await_if_dying(worker)
                    continue
                raise WorkerError(f"reward model {model!r} failed: {code.name}: {err.details()}") from None
            finally:
                worker.inflight -= 1
            worker.served += 1
            self._record(model, reply, worker)
            return reply, worker
        raise WorkerError(f"reward model {model!r}: no worker could score the request")

    @staticmethod
    def result(model: str, reply: reward_worker_pb2.WorkerScoreResponse) -> ScoreBatchResult:
        return ScoreBatchResult(
            model=model,
            scores=[
                CandidateScore(
                    reward=s.reward,
                    step_rewards=tuple(s.step_rewards),
                    tokens=s.tokens,
                    logits=tuple(s.logits),
                    labels=s.labels,
                )
                for s in reply.scores
            ],
            prompt_tokens=reply.prompt_tokens,
            total_tokens=reply.total_tokens,
        )

    def _record(self, model: str, reply: reward_worker_pb2.WorkerScoreResponse, worker: WorkerHandle) -> None:
        # Batch figures ride on one group per batch (zero on the others), so they are
        # counted once per forward batch; queue and compute times are per group.
        self.metrics.observe_worker_stats(model, reply.stats, scored_tokens=reply.total_tokens)
        worker.cache_bytes = reply.stats.cache_bytes
        worker.cache_entries = reply.stats.cache_entries
        self._set_cache_gauges(model)

    def _set_cache_gauges(self, model: str) -> None:
        # Each worker reports its own cache with every reply: the pool's is their sum.
        workers = self._workers.get(model, ())
        self.metrics.prompt_cache_bytes.labels(model).set(sum(w.cache_bytes for w in workers))
        self.metrics.prompt_cache_entries.labels(model).set(sum(w.cache_entries for w in workers))


if TYPE_CHECKING:

    def _is_a_reward_scorer(pool: WorkerPool) -> RewardScorer:
        """mypy checks here that the pool implements the engine's RewardScorer."""
        return pool
