"""Fan-out to an OpenAI-compatible generator (vLLM, SGLang, llama.cpp, TGI).

Every call streams (SSE): `UpstreamClient.stream` returns the request's live
run (generation/fanout.py), whose events the engine reads as candidates grow
and finish; `generate` collects a whole run (tests, simple callers).

Modes (GeneratorConfig.mode):
- parallel: N calls with n=1 and seeds base+i. Works with every server;
  llama.cpp server and `transformers serve` silently ignore `n`.
- n: one call with n=N (vLLM/SGLang share the prompt's KV cache across the
  N samples); when fewer choices come back, the rest are topped up with
  parallel calls.
- auto: the first request to each upstream is an n=N call; whether N choices
  came back is remembered per base URL, and later requests use n or parallel.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

from bon_gateway.balancer import Endpoint
from bon_gateway.config import GeneratorConfig
from bon_gateway.engine.protocols import ReadinessListener
from bon_gateway.generation.caller import CandidateFailed, UpstreamCaller
from bon_gateway.generation.fanout import FanOut, collect
from bon_gateway.metrics import Metrics
from bon_gateway.types import BonRequest, Deadline, Dropped, Generation

__all__ = ["CandidateFailed", "FanOutResult", "UpstreamClient"]


@dataclass(slots=True)
class FanOutResult:
    generations: list[Generation] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)  # one per failed candidate


class UpstreamClient:
    """N candidates from one or more replicas of the generator (GeneratorConfig.base_urls)."""

    def __init__(
        self,
        config: GeneratorConfig,
        metrics: Metrics,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self._rng = rng or random.Random()
        self.caller = UpstreamCaller(config, metrics, rng=self._rng)
        self._listeners: list[ReadinessListener] = []
        self.caller.balancer.on_change = self._ejection_changed

    @property
    def default_model(self) -> str:
        return self.config.model

    def usable(self) -> bool:
        """At least one upstream is not ejected."""
        return self.caller.balancer.any_available()

    def on_readiness_change(self, listener: ReadinessListener) -> None:
        self._listeners.append(listener)

    def _ejection_changed(self, endpoint: Endpoint) -> None:
        """An endpoint was ejected or recovered: tell the listeners now, and again
        when an ejection's cooldown ends (usable() turns true then without an event)."""
        for listener in self._listeners:
            listener()
        if endpoint.ejected_until and self._listeners:
            delay = max(0.0, endpoint.ejected_until - time.monotonic())
            loop = asyncio.get_running_loop()
            for listener in self._listeners:
                loop.call_later(delay + 0.001, listener)

    @property
    def endpoints(self) -> list[Endpoint]:
        return self.caller.balancer.endpoints

    def stream(
        self, request: BonRequest, deadline: Deadline, *, progress: bool = False, progress_every: int = 0
    ) -> FanOut:
        """Start best_of candidates; iterate the run for their events, `aclose` it when done.

        A client-fault 4xx from the upstream is raised from the iteration as an
        InvalidRequest; no call, retry or backoff wait runs past `deadline`.
        """
        seed = request.sampling.seed
        return FanOut(
            self,
            request,
            request.model or self.config.model,
            # Without a client seed, a random base still gives distinct seeds per candidate.
            self._rng.randrange(2**31) if seed is None else seed,
            deadline,
            progress=progress,
            progress_every=progress_every,
        )

    async def generate(self, request: BonRequest, deadline: Deadline) -> FanOutResult:
        """A whole run: every candidate generated, failures as `dropped` entries."""
        generations, dropped = await collect(self.stream(request, deadline))
        return FanOutResult(generations, dropped)

    async def aclose(self) -> None:
        await self.caller.aclose()
