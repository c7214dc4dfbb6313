"""Where a batch job sends its Best-of-N requests: a running gateway over HTTP, or
an engine built in this process from the same config as `bon-gateway serve`.

Both take the body of a `/v1/chat/completions` request (with the Best-of-N
extras) and return the gateway's JSON reply, so one record builder serves both.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from bon_gateway.config import GatewayConfig
from bon_gateway.engine.protocols import RewardScorer
from bon_gateway.logs import log_phase
from bon_gateway.types import Deadline

__all__ = [
    "BatchClient",
    "EngineClient",
    "GatewayHttpClient",
    "RequestFailed",
    "ServedModels",
    "check_reward_model",
]

log = logging.getLogger("bon_gateway.batch")

# Statuses worth another try: overload (429), the upstream or workers briefly down
# (502/503), a deadline (504/408). A 400 will fail the same way again.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class RequestFailed(Exception):
    """One Best-of-N request failed; `retryable` says whether trying again may help."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@dataclass(frozen=True)
class ServedModels:
    """What the gateway serves: its generator model and its reward models (the first is the default)."""

    generator: str | None
    reward_models: tuple[str, ...]


def check_reward_model(served: ServedModels, name: str | None, where: str) -> str:
    """The reward model the rows will use (`name`, or the gateway's default); RequestFailed
    naming what `where` serves when it is not there. Checked once, before the first row."""
    if not served.reward_models:
        raise RequestFailed(f"{where} serves no reward model")
    if name is None:
        return served.reward_models[0]
    if name not in served.reward_models:
        raise RequestFailed(
            f"{where} serves no reward model {name!r} (--reward-model); it serves: "
            + ", ".join(served.reward_models)
        )
    return name


# Called with how many more candidates finished generating (see follow_candidates).
CandidateReport = Callable[[int], None]


class BatchClient(Protocol):
    """Runs one /v1/chat/completions body and returns the reply as JSON."""

    async def start(self) -> None: ...

    async def served_models(self) -> ServedModels: ...

    async def complete(self, payload: dict[str, Any]) -> dict[str, Any]: ...

    async def follow_candidates(self, report: CandidateReport) -> None:
        """Report candidates as they finish, while rows are in flight, until cancelled."""
        ...

    async def aclose(self) -> None: ...


class GatewayHttpClient:
    """A running gateway (`bon-gateway serve`), e.g. http://127.0.0.1:8080 or .../v1."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        max_connections: int = 64,
        transport: httpx.AsyncBaseTransport | None = None,
        metrics_interval_s: float = 1.0,
    ) -> None:
        base = url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        self.url = base
        self._metrics_url = base[: -len("/v1")] + "/metrics"
        self._metrics_interval_s = metrics_interval_s
        self._models: httpx.Response | None = None
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=base,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=max_connections),
            transport=transport,
        )

    async def start(self) -> None:
        """Fail fast when the gateway is unreachable or refuses the key, before any row is tried."""
        try:
            response = await self._client.get("/models")
        except httpx.HTTPError as err:
            raise RequestFailed(f"gateway unreachable: {type(err).__name__}: {err}") from None
        if response.status_code in (401, 403):
            raise RequestFailed(f"the gateway refused the API key (HTTP {response.status_code})")
        self._models = response

    async def served_models(self) -> ServedModels:
        """From the /v1/models reply that `start()` read (entries of kind "generator" and the others)."""
        response = self._models if self._models is not None else await self._client.get("/models")
        try:
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            data = response.json()["data"]
            generator = next((str(m["id"]) for m in data if m.get("kind") == "generator"), None)
            rewards = tuple(str(m["id"]) for m in data if m.get("kind") != "generator")
        except (ValueError, KeyError, TypeError) as err:
            raise RequestFailed(f"{self.url}/models is not a bon-gateway model list: {err}") from None
        return ServedModels(generator, rewards)

    async def follow_candidates(self, report: CandidateReport) -> None:
        """Poll the gateway's /metrics: generator calls finished (bon_upstream_requests_total),
        one per candidate with an upstream that takes one call per candidate. Gateway-wide:
        other clients' requests count too. Returns at once when /metrics cannot be read."""
        last = await self._upstream_calls()
        if last is None:
            return
        while True:
            await asyncio.sleep(self._metrics_interval_s)
            now = await self._upstream_calls()
            if now is None:
                return
            if now > last:
                report(int(now - last))
            last = max(last, now)

    async def _upstream_calls(self) -> float | None:
        try:
            response = await self._client.get(self._metrics_url)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        return upstream_calls(response.text)

    async def complete(self, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._client.post("/chat/completions", json=payload)
        except httpx.TimeoutException as err:
            raise RequestFailed(f"timeout: {type(err).__name__}", retryable=True) from None
        except httpx.HTTPError as err:
            raise RequestFailed(f"{type(err).__name__}: {err}", retryable=True) from None
        if response.status_code >= 400:
            raise RequestFailed(
                f"HTTP {response.status_code}: {_error_message(response)}",
                status=response.status_code,
                retryable=response.status_code in RETRYABLE_STATUSES,
            )
        try:
            body: dict[str, Any] = response.json()
        except ValueError:
            raise RequestFailed("the gateway answered something that is not JSON", retryable=True) from None
        return body

    async def aclose(self) -> None:
        await self._client.aclose()


def upstream_calls(metrics_text: str) -> float | None:
    """Sum of bon_upstream_requests_total over its statuses in Prometheus text; None without it."""
    total, seen = 0.0, False
    for line in metrics_text.splitlines():
        if line.startswith("bon_upstream_requests_total"):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
            seen = True
    return total if seen else None


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])[:500]
    except (ValueError, AttributeError):
        pass
    return response.text[:200]


class EngineClient:
    """An Engine in this process: the upstream client plus the reward-worker pool.

    `start()` spawns the workers and waits until they have loaded their models;
    `aclose()` stops them. `scorer` replaces the worker pool (tests).
    """

    def __init__(self, config: GatewayConfig, *, scorer: RewardScorer | None = None) -> None:
        self.config = config
        self._scorer = scorer
        self._engine: Any = None
        self._report: CandidateReport | None = None

    async def start(self) -> None:
        # Imported here: the pool spawns processes; building the parser must stay cheap.
        from bon_gateway.engine.engine import Engine
        from bon_gateway.generation.upstream import UpstreamClient
        from bon_gateway.metrics import Metrics
        from bon_gateway.scoring.pool import WorkerPool

        if self._scorer is None and not self.config.reward_models:
            raise RequestFailed("the config lists no [[reward_models]]")
        metrics = Metrics()
        scorer = self._scorer
        if scorer is None:
            pool = WorkerPool(self.config, metrics)
            log_phase(log, "workers_starting", models=",".join(m.name for m in self.config.reward_models))
            await pool.start()
            scorer = pool
        self._engine = Engine(self.config, UpstreamClient(self.config.generator, metrics), scorer, metrics)

    async def served_models(self) -> ServedModels:
        if self._engine is None:
            raise RuntimeError("EngineClient.start() was not awaited")
        models = self._engine.list_models()
        generator = next((m.name for m in models if m.kind == "generator"), None)
        return ServedModels(generator, tuple(m.name for m in models if m.kind != "generator"))

    async def follow_candidates(self, report: CandidateReport) -> None:
        """Every candidate of every row, as the engine finishes generating it (until cancelled)."""
        self._report = report
        try:
            await asyncio.Event().wait()
        finally:
            self._report = None

    async def _on_generated(self, generation: object) -> None:
        if self._report is not None:
            self._report(1)

    async def complete(self, payload: dict[str, Any]) -> dict[str, Any]:
        from pydantic import ValidationError

        from bon_gateway.api.openai_schema import ChatCompletionRequest, chat_completion_body
        from bon_gateway.errors import BonError, InvalidRequest

        if self._engine is None:
            raise RuntimeError("EngineClient.start() was not awaited")
        try:
            deadline = Deadline.after(self.config.server.request_timeout_s)
            admitted = self._engine.admit(
                ChatCompletionRequest.model_validate(payload).to_bon_request(
                    self.config.server.default_best_of
                )
            )
            result = await self._engine.run(admitted, deadline, on_generated=self._on_generated)
        except ValidationError as err:
            raise RequestFailed(f"invalid request: {err.errors()[0].get('msg')}") from None
        except BonError as err:
            raise RequestFailed(
                f"{err.code}: {err.message}", retryable=not isinstance(err, InvalidRequest)
            ) from None
        body: dict[str, Any] = chat_completion_body(result, admitted.request)
        return body

    async def aclose(self) -> None:
        if self._engine is not None:
            await self._engine.aclose()
            self._engine = None
        elif self._scorer is not None:
            await self._scorer.aclose()
