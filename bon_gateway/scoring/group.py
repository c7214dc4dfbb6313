"""The pool's ScoringGroup: one request's candidates on one worker, which keeps their prompt.

`WorkerPool.open_group` makes one (synchronously) and starts the OpenGroup call
in the background on the least-loaded worker that is up: the worker answers
once it has tokenized and length-checked the prompt, and computes the prompt's
keys and values in its batcher meanwhile. Every later call of the group goes
to that worker (sticky): `score` sends the group id and asks the worker to keep
each candidate's sequence, so that a candidate's next partial text reuses its
earlier one as well as the prompt. `close` releases it all.

Kept candidates: always, while the group is open. The group cannot tell a
partial text from a finished one, and keeping costs no compute (the keys and
values exist during the forward pass anyway), only cache bytes that the
worker's budget bounds (over it, nothing more is kept) and that `close`
releases, as soon as the engine has what it needs.

Failures change nothing that would fail without a group: a worker that cannot
open the group (down, dying) leaves the group without one, and its candidates
are scored like any others; when the group's worker dies (or is found hung,
see prober.py), its calls go to another worker (which recomputes the prompt, or
finds it in its own cache) and the group moves there. Only a prompt the reward model cannot take fails, in
`opened()`, with InvalidRequest naming `messages`.

Front process: no torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc

from bon_gateway.errors import InvalidRequest
from bon_gateway.logs import log_phase
from bon_gateway.scoring.wire import chat_messages, error_param, score_request
from bon_gateway.types import Deadline, Message, ScoreBatchResult
from bon_gateway.v1 import reward_worker_pb2

if TYPE_CHECKING:
    from bon_gateway.scoring.handle import WorkerHandle
    from bon_gateway.scoring.pool import WorkerPool

__all__ = ["PooledGroup"]

log = logging.getLogger("bon_gateway.scoring")

_CLOSE_TIMEOUT_S = 5.0  # CloseGroup, and waiting for an OpenGroup still in flight at close
_RETRYABLE_OPEN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN}


def _cancelled() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), details="worker channel closed"
    )


class PooledGroup:
    """Implements the engine's ScoringGroup on a WorkerPool (see the module docstring)."""

    def __init__(
        self,
        pool: WorkerPool,
        model: str,
        messages: Sequence[Message],
        *,
        deadline: Deadline,
        request_id: str = "",
    ) -> None:
        self._pool = pool
        self.model = model
        self.messages = tuple(messages)
        self.deadline = deadline
        self.request_id = request_id
        self.worker: WorkerHandle | None = None  # where the group lives (None: nowhere)
        self.group_id = ""
        self._prompt_tokens = 0
        self._closed = False
        self._invalid: InvalidRequest | None = None
        self._opening: asyncio.Task[None] = asyncio.get_running_loop().create_task(
            self._open(set()), name=f"open-group-{request_id}"
        )

    @property
    def prompt_tokens(self) -> int:
        return self._prompt_tokens

    async def opened(self) -> None:
        """Wait for the OpenGroup reply; a prompt too long for the model raises InvalidRequest
        naming `messages` (an unknown model names `reward_model`). Nothing else raises here."""
        await self._settled()
        if self._invalid is not None:
            raise self._invalid

    async def _settled(self) -> None:
        """Wait for the open call to end, whatever its outcome (a cancellation of the caller
        still cancels the caller, and never the open call)."""
        task = self._opening
        if not task.done():
            await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: its failure only means "no group"

    async def _open(self, exclude: set[int]) -> None:
        """OpenGroup on a worker that is up now (never waits for one: scoring would anyway)."""
        pool = self._pool
        if not pool.serves(self.model):
            self._invalid = InvalidRequest(f"unknown reward model {self.model!r}", param="reward_model")
            return
        request = reward_worker_pb2.WorkerOpenGroupRequest(
            request_id=self.request_id,
            model=self.model,
            messages=chat_messages(self.messages),
            ttl_s=max(0.001, self.deadline.remaining()),
        )
        tried = set(exclude)
        for attempt in range(2):
            worker = pool.live_worker(self.model, tried)
            if worker is None or worker.stub is None or self.deadline.expired():
                return
            tried.add(id(worker))
            try:
                try:
                    call = worker.stub.OpenGroup(request, timeout=self.deadline.remaining())
                    reply = await worker.call(call)
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        raise  # close() gave up waiting for it
                    # The supervisor closed the channel of a worker that died under the call,
                    # or the prober found the worker hung.
                    raise _cancelled() from None
            except grpc.aio.AioRpcError as err:
                code = err.code()
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    self._invalid = InvalidRequest(err.details() or "invalid prompt", param=error_param(err))
                    return
                if code in _RETRYABLE_OPEN and attempt == 0:
                    await pool.await_if_dying(worker)
                    continue
                # An old worker without the RPC, overload, deadline: no group, plain scoring.
                log_phase(log, "open-group-failed", logging.DEBUG, model=self.model, code=code.name)
                return
            self.worker, self.group_id = worker, reply.group_id
            self._prompt_tokens = reply.prompt_tokens
            return

    async def score(self, candidates: Sequence[str], *, deadline: Deadline) -> ScoreBatchResult:
        """Score texts (whole or partial) against the group's prompt on its worker; input order."""
        await self._settled()
        if self._invalid is not None:
            raise self._invalid
        worker, group_id = self.worker, self.group_id
        request = score_request(self.model, self.messages, candidates, request_id=self.request_id)
        request.group_id = group_id
        request.keep_candidates = bool(group_id) and not self._closed
        reply, answered = await self._pool.call_score(self.model, request, deadline, prefer=worker)
        if self._prompt_tokens == 0:
            self._prompt_tokens = reply.prompt_tokens
        if answered is not worker and self.worker is worker and not self._closed:
            # The group's worker is gone (or never was): move the group to the one that answered.
            log_phase(log, "group-moved", model=self.model, id=self.request_id, worker=answered.target)
            self.worker, self.group_id = None, ""
            self._opening = asyncio.get_running_loop().create_task(self._open_on(answered))
        return self._pool.result(self.model, reply)

    async def _open_on(self, worker: WorkerHandle) -> None:
        others = {id(w) for w in self._pool.workers(self.model) if w is not worker}
        await self._open(others)

    async def close(self) -> None:
        """Release the group on its worker; never raises (a dead worker's group is just gone)."""
        if self._closed:
            return
        self._closed = True
        try:
            if not self._opening.done():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(self._opening), _CLOSE_TIMEOUT_S)
                self._opening.cancel()
            worker, group_id = self.worker, self.group_id
            self.worker, self.group_id = None, ""
            if worker is None or not group_id or not worker.up or worker.stub is None:
                return
            request = reward_worker_pb2.WorkerCloseGroupRequest(model=self.model, group_id=group_id)
            try:
                await worker.call(worker.stub.CloseGroup(request, timeout=_CLOSE_TIMEOUT_S))
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                raise _cancelled() from None  # its worker was found hung (or its channel closed)
        except Exception as err:  # the worker expires the group at its deadline anyway
            log_phase(log, "close-group-failed", logging.DEBUG, model=self.model, error=type(err).__name__)
