"""The pool's handle on one RewardWorker: a process it spawns on a Unix socket, or a
remote address; its status pipe, its gRPC channel and the figures the pool keeps on it.

A spawned worker writes on a pipe when it serves (or why it cannot start, see
worker/status.py) and only then is its channel opened: the first connection
attempt succeeds however long the model took to load. Remote channels retry
their connection at least every second and spread calls over every worker their
address resolves to (round robin).

Front process: no torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections import deque
from typing import Any

import grpc

from bon_gateway.config import RewardModelConfig
from bon_gateway.errors import WorkerError
from bon_gateway.logs import forward_child_line
from bon_gateway.scoring.worker.status import Serving, StartFailed, decode_status
from bon_gateway.v1 import reward_worker_pb2, reward_worker_pb2_grpc

__all__ = ["WorkerHandle", "channel_options"]

log = logging.getLogger("bon_gateway.scoring")

_INFO_TIMEOUT_S = 30.0  # Info of a spawned worker that has said it serves: answered at once

_MESSAGE_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
# gRPC's default reconnect backoff (1 s, x1.6 per try, up to 2 min) made a remote worker
# that came back, or one still loading when the channel opened, wait out the backoff:
# a gateway was seen ready 20-27 s after its worker served. Retry at least every second.
_BACKOFF_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
# A remote address may resolve to several workers: pick_first (gRPC's default) would send
# every call to one of them. When one of them dies, the calls it held fail UNAVAILABLE and a
# retry sent at once can still be picked onto it (the balancer has not seen the loss yet:
# the pool's one retry failed so in 1 of 9 runs of tests/scoring/test_pool_connect.py, 0 of 8
# with this policy): gRPC retries those (scoring is idempotent) after a short backoff,
# within the call's deadline, before the pool's own retry.
_REMOTE_SERVICE_CONFIG = json.dumps(
    {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": "bon_gateway.v1.RewardWorker"}],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "1s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
)


def channel_options(target: str) -> list[tuple[str, int | str]]:
    """Options of the channel to one worker target (unix:PATH spawned, else remote)."""
    options: list[tuple[str, int | str]] = [*_MESSAGE_OPTIONS, *_BACKOFF_OPTIONS]
    if not target.startswith("unix:"):
        options.append(("grpc.service_config", _REMOTE_SERVICE_CONFIG))
    return options


def _remove_stale_socket(path: str) -> None:
    # A restarted worker binds the same path; a socket file left by a killed one blocks it.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class WorkerHandle:
    """One RewardWorker: a spawned process on a Unix socket, or a remote address."""

    def __init__(
        self, entry: RewardModelConfig, target: str, argv: list[str] | None, env: dict[str, str] | None
    ) -> None:
        self.entry = entry
        self.target = target
        self.argv = argv  # None: remote, not ours to spawn
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.status: asyncio.StreamReader | None = None  # the spawned worker's status pipe
        self._status_transport: asyncio.ReadTransport | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: reward_worker_pb2_grpc.RewardWorkerStub | None = None
        self.up = False
        # False while a model it serves has none of its HTTP backend servers up (its Info
        # says so): it takes no calls, though its process is well (not `up = False`, which
        # is the supervisor's and the prober's).
        self.backends_up = True
        self.inflight = 0
        self.served = 0  # groups this worker answered
        # Its prefix cache for this model, as its last reply reported it.
        self.cache_bytes = 0
        self.cache_entries = 0
        self.info: reward_worker_pb2.WorkerInfoResponse | None = None
        self.tail: deque[str] = deque(maxlen=40)
        self.tasks: list[asyncio.Task[None]] = []
        # Calls on the worker now (Score, OpenGroup, CloseGroup): cancelled when it is
        # found hung, so that they are retried elsewhere instead of waiting for it.
        self.calls: set[Any] = set()
        self.hung_since: float | None = None  # monotonic time it was found hung (None: it is not)
        self.connects = 0  # channels opened: a probe's answer is stale once this moved

    async def call(self, call: Any) -> Any:
        """Await a call on this worker's channel (a grpc.aio call), cancellable by `cancel_calls`."""
        self.calls.add(call)
        try:
            return await call
        finally:
            self.calls.discard(call)

    def cancel_calls(self) -> int:
        """Cancel every call on the worker (their callers see a cancelled call: a worker
        failure, retried elsewhere); how many there were."""
        calls = list(self.calls)
        self.calls.clear()
        for call in calls:
            call.cancel()
        return len(calls)

    @property
    def serving(self) -> bool:
        """Whether calls may go to this worker now."""
        return self.up and self.backends_up

    async def probe(self, timeout_s: float) -> bool:
        """Whether the worker answers Info within `timeout_s` (the answer is kept in `info`)."""
        stub = self.stub
        if stub is None:
            return False
        try:
            self.info = await stub.Info(reward_worker_pb2.WorkerInfoRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return False  # its channel was closed under the probe (a restart)
        return True

    @property
    def name(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"{self.entry.name}@{self.target}" + (f"(pid {pid})" if pid else "")

    async def spawn(self) -> None:
        assert self.argv is not None
        if self.target.startswith("unix:"):
            _remove_stale_socket(self.target[5:])
        self.tail.clear()
        self._close_status()
        read_fd, write_fd = os.pipe()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                "--status-fd",
                str(write_fd),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=self.env,
                pass_fds=(write_fd,),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            # Only the child holds the write end: the pipe closes when the child exits.
            os.close(write_fd)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
        )
        self.status = reader
        self._status_transport = transport
        self.tasks.append(asyncio.create_task(self._read_stderr(self.proc)))

    def _close_status(self) -> None:
        if self._status_transport is not None:
            self._status_transport.close()
            self._status_transport = None
        self.status = None

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        # Forward the worker's log lines (never prompt text) once, with their own level and
        # fields (the pool starts it with --log-format json), and keep the last ones for a crash.
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            text = line.decode("utf-8", "replace").rstrip()
            self.tail.append(forward_child_line(text, log, worker=self.entry.name))

    async def _wait_serving(self, timeout_s: float) -> Serving:
        """The spawned worker's status: Serving, else WorkerError with its own reason."""
        assert self.status is not None and self.proc is not None
        try:
            line = await asyncio.wait_for(self.status.readline(), timeout_s)
        except TimeoutError:
            raise WorkerError(
                f"reward model {self.entry.name!r}: worker {self.target} not serving after {timeout_s:.0f} s"
            ) from None
        finally:
            self._close_status()
        status = None
        with contextlib.suppress(ValueError):
            status = decode_status(line) if line else None
        if isinstance(status, Serving):
            return status
        code = await self.proc.wait()
        if isinstance(status, StartFailed):
            raise WorkerError(f"reward model {self.entry.name!r}: worker failed to start: {status.error}")
        await asyncio.sleep(0.1)  # let the stderr reader catch the last lines: the only clue of a crash
        last = " | ".join(list(self.tail)[-5:]) or "no output"
        raise WorkerError(
            f"reward model {self.entry.name!r}: worker exited with code {code} before serving "
            f"(last output: {last})"
        )

    async def connect(self, timeout_s: float) -> None:
        """Wait until the worker serves, then until it answers Info."""
        await self.close_channel()
        self.connects += 1
        started = time.monotonic()
        if self.argv is not None:
            await self._wait_serving(timeout_s)
        self.channel = grpc.aio.insecure_channel(self.target, options=channel_options(self.target))
        self.stub = reward_worker_pb2_grpc.RewardWorkerStub(self.channel)  # type: ignore[no-untyped-call]
        left = max(0.1, timeout_s - (time.monotonic() - started))
        try:
            if self.argv is not None:
                # It said it listens: the first connection succeeds, or the worker is gone.
                self.info = await self.stub.Info(
                    reward_worker_pb2.WorkerInfoRequest(), timeout=min(left, _INFO_TIMEOUT_S)
                )
            else:
                # A remote worker may still be starting: wait for the channel to connect
                # (bounded backoff, so it is seen within a second of serving).
                self.info = await self.stub.Info(
                    reward_worker_pb2.WorkerInfoRequest(), timeout=left, wait_for_ready=True
                )
        except grpc.aio.AioRpcError as err:
            await self.close_channel()
            raise WorkerError(
                f"reward model {self.entry.name!r}: worker {self.target} not ready after "
                f"{time.monotonic() - started:.0f} s: {err.code().name}: {err.details()}"
            ) from None

    async def close_channel(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    async def stop(self, grace_s: float = 5.0) -> None:
        self.up = False
        await self.close_channel()
        self._close_status()
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks.clear()
