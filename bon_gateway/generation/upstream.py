"""Fan-out to an OpenAI-compatible generator (vLLM, SGLang, llama.cpp, TGI).

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
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from bon_gateway.config import GeneratorConfig
from bon_gateway.engine.protocols import OnGenerated, ReadinessListener
from bon_gateway.errors import BonError, InvalidRequest, UpstreamError
from bon_gateway.generation.balancer import Endpoint
from bon_gateway.generation.caller import CandidateFailed, UpstreamCaller, UpstreamRejected
from bon_gateway.generation.payload import BadResponse, build_payload, parse_choices
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

    async def generate(
        self, request: BonRequest, deadline: Deadline, on_generated: OnGenerated | None = None
    ) -> FanOutResult:
        """best_of candidates; failures become `dropped` entries, a client-fault 4xx an InvalidRequest.

        No call, retry or backoff wait runs past `deadline`.
        """
        seed = request.sampling.seed
        fan = _FanOut(
            self,
            request,
            request.model or self.config.model,
            # Without a client seed, a random base still gives distinct seeds per candidate.
            self._rng.randrange(2**31) if seed is None else seed,
            deadline,
            on_generated,
        )
        return await fan.run()

    async def aclose(self) -> None:
        await self.caller.aclose()


class _FanOut:
    """One request's calls; cancelling `run` cancels every call in flight."""

    def __init__(
        self,
        client: UpstreamClient,
        request: BonRequest,
        model: str,
        base_seed: int,
        deadline: Deadline,
        on_generated: OnGenerated | None,
    ) -> None:
        self.client = client
        self.request = request
        self.model = model
        self.base_seed = base_seed
        self.deadline = deadline
        self.on_generated = on_generated
        self.result = FanOutResult()
        self._tasks: set[asyncio.Task[None]] = set()
        # An endpoint whose n>1 probe was refused with a 4xx: it is marked as not
        # honouring n only once a plain call to it succeeds (else the prompt was bad).
        self._refused_n: Endpoint | None = None

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        self._tasks.add(asyncio.create_task(work))

    async def run(self) -> FanOutResult:
        best_of = self.request.best_of
        mode = self.client.config.mode
        if best_of == 1 or mode == "parallel":
            self._spawn_singles(0, best_of)
        else:
            endpoint = self.client.caller.balancer.pick()
            if mode == "auto" and endpoint.honours_n is False:
                self._spawn_singles(0, best_of)
            else:
                self._spawn(self._batch(endpoint, best_of))
        try:
            while self._tasks:
                done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    self._tasks.discard(task)
                    task.result()  # a client-fault rejection ends the whole request
        except UpstreamRejected as err:
            raise self._rejected(err) from None
        finally:
            # Cancelled (deadline, hang-up) or failed: close every call still open,
            # which closes their connections so the upstream stops generating.
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                # wait, not gather: a second cancellation of this task must not
                # reach the calls again while they close their connections.
                await asyncio.wait(self._tasks)
        self.result.generations.sort(key=lambda g: g.index)
        return self.result

    def _rejected(self, err: UpstreamRejected) -> BonError:
        """The client's error for a request the upstream refused."""
        if err.status == 404:
            if self.request.model is None:
                # The operator's configured model: not the client's fault, nor the upstream's health.
                return UpstreamError(
                    f"the generator does not serve the configured model {self.model!r} "
                    f"(generator.model): {err.message}"
                )
            return InvalidRequest(
                f"the generator does not serve model {self.model!r}: {err.message}", param="model"
            )
        return InvalidRequest(f"the generator rejected the request: {err.message}")

    def _spawn_singles(self, first: int, end: int) -> None:
        for index in range(first, end):
            self._spawn(self._single(index))

    async def _deliver(self, generations: list[Generation]) -> None:
        self.result.generations.extend(generations)
        if self.on_generated is not None:
            for generation in generations:
                await self.on_generated(generation)

    def _drop(self, count: int, err: CandidateFailed) -> None:
        self.result.dropped.extend([err.dropped()] * count)

    async def _single(self, index: int) -> None:
        path, body = build_payload(self.request, self.model, self.base_seed + index, 1)
        try:
            data, answered = await self.client.caller.call(path, body, self.deadline, request_key=self)
            generations = parse_choices(data, index, 1)
        except CandidateFailed as err:
            self._drop(1, err)
            return
        except BadResponse as err:
            self._drop(1, CandidateFailed("bad_response", str(err)))
            return
        if answered is self._refused_n and answered.honours_n is None:
            answered.honours_n = False
        await self._deliver(generations)

    async def _batch(self, endpoint: Endpoint, count: int) -> None:
        """One call with n=count; what it does not return is topped up with parallel calls."""
        path, body = build_payload(self.request, self.model, self.base_seed, count)
        try:
            data, answered = await self.client.caller.call(
                path, body, self.deadline, endpoint, request_key=self
            )
            generations = parse_choices(data, 0, count)
        except UpstreamRejected:
            if endpoint.honours_n:
                raise  # it takes n: the request itself is wrong
            # Some servers refuse n>1 outright (a 400/422 about `n`). Parallel
            # calls tell that apart from a bad prompt: those are rejected too.
            self._refused_n = endpoint
            self._spawn_singles(0, count)
            return
        except (CandidateFailed, BadResponse) as err:
            failed = err if isinstance(err, CandidateFailed) else CandidateFailed("bad_response", str(err))
            self._drop(count, failed)
            return
        if answered.honours_n is None and count > 1:
            # Probed once per upstream; a server that returns one choice for n>1
            # (llama.cpp, transformers serve) gets parallel calls from now on.
            answered.honours_n = len(generations) >= count
        self._spawn_singles(len(generations), count)
        await self._deliver(generations)
