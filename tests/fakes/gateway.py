"""ServedGateway: the real gateway (serve_gateway: uvicorn + grpc.aio) on free
loopback ports, in a background thread with its own event loop, so tests can
use blocking clients (the openai SDK, grpc channels, httpx)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from bon_gateway.api.server import event_loop_factory, serve_gateway
from bon_gateway.config import GatewayConfig
from bon_gateway.engine.engine import Engine, RewardScorer
from bon_gateway.generation.upstream import UpstreamClient
from bon_gateway.metrics import Metrics

__all__ = ["ServedGateway", "gateway_config"]


def gateway_config(
    generator_url: str,
    *,
    reward_models: Sequence[Mapping[str, object]] = (),
    generator_model: str = "fake-generator",
    generator_timeout_s: float = 10.0,
    **server: object,
) -> GatewayConfig:
    """A config for tests: loopback, free ports, the given generator URL.

    `server` keys override [server] (e.g. max_best_of=16, request_timeout_s=0.3);
    `reward_models` are [[reward_models]] entries (for a real WorkerPool).
    """
    return GatewayConfig.model_validate(
        {
            "server": {"host": "127.0.0.1", "http_port": 0, "grpc_port": 0, "log_level": "WARNING", **server},
            "generator": {"url": generator_url, "model": generator_model, "timeout_s": generator_timeout_s},
            "reward_models": [dict(m) for m in reward_models],
        }
    )


class ServedGateway:
    """`serve_gateway` over an Engine(UpstreamClient, scorer) on 127.0.0.1.

    Give a ready `scorer` (e.g. FakeScorer) or a `scorer_factory(config,
    metrics)` (e.g. WorkerPool); a factory's object is built inside the
    gateway's event loop and, if it has `async start()`, started before serving.
    The engine (and so the scorer) is closed on stop.
    """

    def __init__(
        self,
        config: GatewayConfig,
        scorer: RewardScorer | None = None,
        *,
        scorer_factory: Callable[[GatewayConfig, Metrics], RewardScorer] | None = None,
    ) -> None:
        if (scorer is None) == (scorer_factory is None):
            raise ValueError("give exactly one of scorer and scorer_factory")
        self.config = config
        self._scorer = scorer
        self._scorer_factory = scorer_factory
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.http_port = 0
        self.grpc_port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="served-gateway", daemon=True)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def base_url(self) -> str:
        """What an OpenAI client takes as base_url."""
        return f"{self.http_url}/v1"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def _run(self) -> None:
        try:
            # The loop `bon-gateway serve` runs on (uvloop where installed).
            with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
                runner.run(self._main())
        except BaseException as err:  # reported to the thread that called start()
            self._error = err
        finally:
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        scorer = self._scorer
        if self._scorer_factory is not None:
            scorer = self._scorer_factory(self.config, self.metrics)
            start = getattr(scorer, "start", None)
            if start is not None:
                await start()
        assert scorer is not None
        self.engine = Engine(
            self.config, UpstreamClient(self.config.generator, self.metrics), scorer, self.metrics
        )

        def on_started(http_port: int, grpc_port: int) -> None:
            self.http_port, self.grpc_port = http_port, grpc_port
            self._started.set()

        try:
            await serve_gateway(
                self.config, self.engine, self.metrics, stop=self._stop, on_started=on_started
            )
        finally:
            await self.engine.aclose()

    def start(self, timeout_s: float = 60.0) -> ServedGateway:
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError("gateway did not start")
        if self._error is not None:
            raise RuntimeError("gateway failed to start") from self._error
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError("gateway did not stop")

    def in_loop(self, work: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        """Call `work()` inside the gateway's event loop (e.g. to count its tasks)."""
        assert self._loop is not None

        async def call() -> Any:
            return work()

        return asyncio.run_coroutine_threadsafe(call(), self._loop).result(timeout_s)

    def __enter__(self) -> ServedGateway:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
