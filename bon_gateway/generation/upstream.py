"""Fan-out to an OpenAI-compatible generator (vLLM, SGLang, llama.cpp, TGI).

N candidates are N parallel calls, each with its own seed: several servers
(llama.cpp server, `transformers serve`) silently ignore `n` and return one
choice, so `n` is never relied on here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bon_gateway.config import GeneratorConfig
from bon_gateway.engine.engine import OnGenerated
from bon_gateway.metrics import Metrics
from bon_gateway.types import BonRequest, Generation

log = logging.getLogger("bon_gateway.generation")


@dataclass(slots=True)
class FanOutResult:
    generations: list[Generation] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # "reason: detail", one per failed candidate


class CandidateFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def build_payload(request: BonRequest, model: str, seed: int) -> tuple[str, dict[str, Any]]:
    """The upstream path and JSON body for one candidate."""
    s = request.sampling
    body: dict[str, Any] = dict(s.extra)
    body["model"] = model
    body["seed"] = seed
    body["n"] = 1
    body["stream"] = False
    if s.temperature is not None:
        body["temperature"] = s.temperature
    if s.top_p is not None:
        body["top_p"] = s.top_p
    if s.max_tokens is not None:
        body["max_tokens"] = s.max_tokens
    if s.stop:
        body["stop"] = list(s.stop)
    if request.prompt is not None:
        body["prompt"] = request.prompt
        return "/completions", body
    body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    return "/chat/completions", body


def parse_choice(index: int, data: Any) -> Generation:
    """One Generation from an OpenAI chat or completions response body."""
    try:
        choice = data["choices"][0]
        if "message" in choice:
            text = choice["message"].get("content") or ""
        else:
            text = choice["text"]
        usage = data.get("usage") or {}
        return Generation(
            index=index,
            text=str(text),
            finish_reason=str(choice.get("finish_reason") or "stop"),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise CandidateFailed("bad_response", f"unexpected upstream body ({err!r})") from None


class UpstreamClient:
    """N parallel calls to one upstream base URL (e.g. http://host:8000/v1)."""

    def __init__(
        self,
        config: GeneratorConfig,
        metrics: Metrics,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        limits = httpx.Limits(max_connections=config.max_connections, max_keepalive_connections=64)
        self._client = httpx.AsyncClient(
            base_url=config.url.rstrip("/"),
            timeout=httpx.Timeout(config.timeout_s, connect=10.0),
            limits=limits,
            transport=transport,
        )

    @property
    def default_model(self) -> str:
        return self.config.model

    async def generate(self, request: BonRequest, on_generated: OnGenerated | None = None) -> FanOutResult:
        model = request.model or self.config.model
        base_seed = request.sampling.seed
        if base_seed is None:
            base_seed = random.randrange(2**31)
        result = FanOutResult()

        async def one(index: int) -> None:
            try:
                generation = await self._call(request, model, index, base_seed + index)
            except CandidateFailed as err:
                result.dropped.append(str(err))
                return
            result.generations.append(generation)
            if on_generated is not None:
                await on_generated(generation)

        async with asyncio.TaskGroup() as group:
            for i in range(request.best_of):
                group.create_task(one(i))
        result.generations.sort(key=lambda g: g.index)
        return result

    async def _call(self, request: BonRequest, model: str, index: int, seed: int) -> Generation:
        path, body = build_payload(request, model, seed)
        started = time.perf_counter()
        try:
            response = await self._client.post(path, json=body)
        except httpx.TimeoutException as err:
            self.metrics.upstream_requests.labels("timeout").inc()
            raise CandidateFailed("timeout", type(err).__name__) from None
        except httpx.HTTPError as err:
            self.metrics.upstream_requests.labels("connect_error").inc()
            raise CandidateFailed("connect_error", f"{type(err).__name__}: {err}") from None
        finally:
            self.metrics.upstream_duration.observe(time.perf_counter() - started)
        self.metrics.upstream_requests.labels(str(response.status_code)).inc()
        if response.status_code != 200:
            raise CandidateFailed("upstream_error", f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            data = response.json()
        except ValueError:
            raise CandidateFailed("bad_response", "upstream body is not JSON") from None
        return parse_choice(index, data)

    async def aclose(self) -> None:
        await self._client.aclose()
