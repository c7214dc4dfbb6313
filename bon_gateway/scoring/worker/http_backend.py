"""What the HTTP scoring backends (backend = "vllm", "sglang") share.

The worker keeps everything that decides *what* is scored: the adapter builds each
sequence exactly as for its own forward (chat template applied once, step
separators placed by construction, the reward token, truncation) and knows where
the head reads it. The server only runs the model: it gets token ids (so it adds no
BOS and re-tokenizes nothing) and returns raw head outputs, which the adapter turns
into rewards with the same formula as for our forward. A group's candidates go in
one request, so the server's prefix cache and batch see the shared prompt together.

Shared here, one copy for both servers:
- start-up: every server answers `/v1/models` (vLLM and SGLang both list their
  served name and `max_model_len` there) and serves the entry's model; then the
  subclass's probe check (`_check_probe`) decides whether its outputs follow our
  formula;
- balancing (bon_gateway.balancer, shared with generator upstreams): least
  outstanding requests; a server that fails a call (connection, 5xx, timeout, a
  reply that cannot be read) is ejected for a cooldown and the call moves to the
  next; ejected servers are probed on `/health` and come back when they answer;
- per-server figures (`ServerStats`: calls, latency buckets, errors by kind) that
  the worker's Info reply carries to the gateway's /metrics.

The deadline is the gateway's: its Score RPC's gRPC deadline cancels the call here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import httpx
import torch

from bon_gateway.balancer import Balancer, Endpoint
from bon_gateway.config import RewardModelConfig
from bon_gateway.logs import log_phase
from bon_gateway.scoring.worker.adapters import Adapter
from bon_gateway.scoring.worker.adapters.qwen2_rm import Qwen2RewardModelAdapter
from bon_gateway.scoring.worker.formatting import Encoded
from bon_gateway.types import BACKEND_ERROR_KINDS, BACKEND_LATENCY_BUCKETS, Message

__all__ = [
    "BackendCheckFailed",
    "BackendUnavailable",
    "HttpScoringBackend",
    "ServerStats",
]

log = logging.getLogger("bon_gateway.worker")

#: seconds an ejected server waits before it is probed again
COOLDOWN_S = 5.0
#: seconds one call may take (the gateway's deadline cancels the RPC sooner)
CALL_TIMEOUT_S = 600.0
PROBE = (
    [Message("user", "What is 2 + 3?")],
    "2 + 3 = 5. The answer is 5.",
    ("2 + 3 = 5.", "The answer is 5."),
)
#: a second probe answer, scored in one request with the first (batched pooling check)
PROBE_OTHER = "5"


class BackendCheckFailed(RuntimeError):
    """A server is not what the model entry says (start-up fails with this line)."""


class BackendUnavailable(RuntimeError):
    """No server could score the group (every one failed or is ejected)."""


class BadReply(ValueError):
    """A reply whose shape is not the server's documented one."""


@dataclass(slots=True)
class ServerStats:
    """One server's figures since this worker started (cumulative, like counters)."""

    calls: int = 0
    # Calls per latency bucket (BACKEND_LATENCY_BUCKETS, then +Inf), not cumulative.
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(BACKEND_LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BACKEND_ERROR_KINDS, 0))

    def observe(self, seconds: float, error: str | None) -> None:
        self.calls += 1
        self.latency_sum += seconds
        index = next((i for i, b in enumerate(BACKEND_LATENCY_BUCKETS) if seconds <= b), -1)
        self.latency_counts[index] += 1
        if error is not None:
            self.errors[error] += 1


def head_labels(adapter: Adapter) -> int:
    """Outputs of the checkpoint's head, from its config (the tokenizing adapter has no weights)."""
    if isinstance(adapter, Qwen2RewardModelAdapter):
        # Linear(h, 1) (the hub's modeling_qwen2_rm.py; vLLM and SGLang fix it at 1 too):
        # its config.json has no num_labels, so transformers' default (2) would be read.
        return 1
    return int(getattr(adapter.config, "num_labels", 1) or 1)


def error_kind(err: BaseException) -> str:
    """The `kind` label of a failed call (the generator upstreams' kinds)."""
    if isinstance(err, httpx.TimeoutException):
        return "timeout"
    if isinstance(err, httpx.HTTPStatusError):
        return "http_4xx" if err.response.status_code < 500 else "http_5xx"
    if isinstance(err, httpx.TransportError):
        return "connect_error"
    return "bad_response"


class HttpScoringBackend(ABC):
    """A model entry's pooling servers: checked at start-up, balanced, retried."""

    #: the server's name in error lines ("vLLM", "SGLang")
    server_name: ClassVar[str]

    def __init__(self, entry: RewardModelConfig, adapter: Adapter) -> None:
        self.entry = entry
        self.adapter = adapter
        self.task = self.task_for(adapter)
        self.num_labels = head_labels(adapter)
        self.model = entry.backend_model or ""
        self.balancer = Balancer(entry.backend_urls, eject_after_failures=1, eject_cooldown_s=COOLDOWN_S)
        self.stats = {e.label: ServerStats() for e in self.balancer.endpoints}
        self.client = httpx.AsyncClient(timeout=CALL_TIMEOUT_S, limits=httpx.Limits(max_connections=256))
        self._probe_task: asyncio.Task[None] | None = None

    @staticmethod
    @abstractmethod
    def task_for(adapter: Adapter) -> str:
        """The server task that gives this adapter's head outputs; ValueError (one line,
        naming the backend that can) for the families this server cannot score the same way."""

    @abstractmethod
    async def _check_probe(self, endpoint: Endpoint, where: str) -> None:
        """BackendCheckFailed unless the server's probe outputs follow our formula."""

    @abstractmethod
    async def _call(
        self, endpoint: Endpoint, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Raw head outputs [positions, labels] per sequence, from one server (one request)."""

    @property
    def label(self) -> str:
        return ",".join(e.label for e in self.balancer.endpoints)

    # -- start-up -------------------------------------------------------------------------
    async def check(self) -> None:
        """Every server serves the model and answers the probe as the formula expects."""
        for endpoint in self.balancer.endpoints:
            where = f"{self.entry.name!r} at {endpoint.url}"
            await self._check_model(endpoint, where)
            await self._check_probe(endpoint, where)
            log_phase(
                log,
                "backend",
                model=self.entry.name,
                server=endpoint.label,
                served=self.model,
                task=self.task,
            )
        self._probe_task = asyncio.create_task(self._probe_ejected())

    async def _check_model(self, endpoint: Endpoint, where: str) -> None:
        try:
            reply = await self.client.get(f"{endpoint.url}/v1/models", timeout=10)
            reply.raise_for_status()
            served = list(reply.json().get("data", []))
        except (httpx.HTTPError, ValueError) as err:
            raise BackendCheckFailed(
                f"reward model {where}: no {self.server_name} server answers /v1/models ({err})"
            ) from None
        names = [str(m.get("id")) for m in served]
        if not self.model:
            if len(names) != 1:
                raise BackendCheckFailed(
                    f"reward model {where}: the server serves {names}; set backend_model to one of them"
                )
            self.model = names[0]
        if self.model not in names:
            raise BackendCheckFailed(f"reward model {where}: the server serves {names}, not {self.model!r}")
        limit = next((m.get("max_model_len") for m in served if m.get("id") == self.model), None)
        if isinstance(limit, int) and 0 < limit < self.adapter.max_length:
            # Longer inputs fail here, naming the field, instead of at the server.
            self.adapter.max_length = limit
            self.adapter.tok.max_length = limit

    def _check_labels(self, got: torch.Tensor, where: str) -> None:
        """BackendCheckFailed unless the server's head has the checkpoint's outputs."""
        if got.shape[-1] != self.num_labels:
            raise BackendCheckFailed(
                f"reward model {where}: the server's head has {got.shape[-1]} outputs, "
                f"the checkpoint {self.num_labels}"
            )

    def probe_encodings(self) -> tuple[Encoded, Encoded]:
        """The probe candidate and a second one sharing its prompt."""
        messages, answer, steps = PROBE
        process = self.adapter.kind == "process"
        first = self.adapter.encode(messages, answer, steps if process else (), what="probe")
        other = self.adapter.encode(messages, PROBE_OTHER, (PROBE_OTHER,) if process else (), what="probe")
        return first, other

    async def _probe_ejected(self) -> None:
        while True:
            await asyncio.sleep(COOLDOWN_S / 2)
            for endpoint in self.balancer.endpoints:
                if self.balancer.available(endpoint):
                    continue
                with contextlib.suppress(httpx.HTTPError):
                    if (await self.client.get(f"{endpoint.url}/health", timeout=2)).status_code == 200:
                        self.balancer.started(endpoint)
                        self.balancer.finished(endpoint, True)

    async def aclose(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        await self.client.aclose()

    # -- scoring --------------------------------------------------------------------------
    async def logits(
        self, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Head outputs [positions, labels] per sequence (fp32), from whichever server answers."""
        tried: list[Endpoint] = []
        last: Exception | None = None
        for _ in range(len(self.balancer.endpoints)):
            endpoint = self.balancer.pick(avoid=tried)
            if endpoint in tried:
                break
            tried.append(endpoint)
            self.balancer.started(endpoint)
            ok: bool | None = None
            error: str | None = None
            started = time.perf_counter()
            try:
                result = await self._call(endpoint, seqs, positions)
                ok = True
                return result
            except httpx.HTTPStatusError as err:
                error = error_kind(err)
                if err.response.status_code < 500:
                    ok = True  # the server is well; the request is what it refuses
                    raise ValueError(
                        f"the {self.server_name} server refused the group: {err.response.text[:300]}"
                    ) from None
                ok, last = False, err
            except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as err:
                ok, last, error = False, err, error_kind(err)
            finally:
                self.balancer.finished(endpoint, ok)
                if ok is not None:  # a cancelled call (the deadline) says nothing about the server
                    self.stats[endpoint.label].observe(time.perf_counter() - started, error)
        raise BackendUnavailable(
            f"no {self.server_name} server of {self.entry.name!r} scored the group ({last})"
        )
