"""Where a batch job sends its Best-of-N requests: a running gateway over HTTP, or
an engine built in this process from the same config as `bon-gateway serve`.

Both take the body of a `/v1/chat/completions` request (with the Best-of-N
extras) and return the gateway's JSON reply, so one record builder serves both.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import httpx

from bon_gateway.config import GatewayConfig
from bon_gateway.engine.protocols import RewardScorer
from bon_gateway.logs import log_phase
from bon_gateway.types import Deadline

__all__ = ["BatchClient", "EngineClient", "GatewayHttpClient", "RequestFailed"]

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


class BatchClient(Protocol):
    """Runs one /v1/chat/completions body and returns the reply as JSON."""

    async def start(self) -> None: ...

    async def complete(self, payload: dict[str, Any]) -> dict[str, Any]: ...

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
    ) -> None:
        base = url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
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
            result = await self._engine.run(admitted, deadline)
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
