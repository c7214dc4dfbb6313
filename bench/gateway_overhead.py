"""What the gateway adds on top of the upstream calls it makes.

An instant OpenAI-compatible upstream (raw asyncio, its own process) and the
real gateway (serve_gateway: FastAPI + uvicorn + grpc.aio, its own process)
with a no-op scorer. The same upstream calls (N=4 chat calls with n=1 and
seeds s..s+3) are made once through the gateway and once by a direct fan-out
client (4 parallel posts), in one run. Every client here (the load driver, the
direct fan-out, the gateway's own upstream calls) uses the same HTTP client,
bon_gateway.generation.transport (one aiohttp session), so the difference is
what the gateway adds:

(a) one client in a loop: added latency p50 / p99 (gateway - direct);
(b) 64 concurrent clients: candidates/s through the gateway and direct;
(c) slow upstream (each candidate 200-800 ms, a function of its seed):
    end-to-end latency / (slowest candidate + scoring).

    python bench/gateway_overhead.py             # ~1 minute; writes bench/results/gateway_overhead.{md,json}
    python bench/gateway_overhead.py --quick     # fewer requests, for a smoke run

Counts and durations are bounded; the table is printed and written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout: python bench/gateway_overhead.py
    sys.path.insert(0, str(ROOT))

from bon_gateway.generation.transport import UpstreamHttp  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
N = 4
MESSAGES = [{"role": "user", "content": "Say one word."}]
SLOW_MIN_S, SLOW_MAX_S = 0.2, 0.8


def slow_delay(seed: int) -> float:
    """Deterministic 200-800 ms per seed, so gateway and direct runs see the same delays."""
    return SLOW_MIN_S + (SLOW_MAX_S - SLOW_MIN_S) * (((seed * 2654435761) % 1000) / 999)


def _fast_loop() -> None:
    """uvloop when installed (every process: upstream, gateway and the driver, so the
    direct fan-out runs on the same loop as the gateway's); the default loop otherwise."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


# -- the instant upstream (own process) -------------------------------------------------
_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)
_SEED = re.compile(rb'"seed":\s*(\d+)')


def _reply(text: str) -> bytes:
    body = json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "bench",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5},
        },
        separators=(",", ":"),
    ).encode()
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


class _UpstreamProtocol(asyncio.Protocol):
    """Keep-alive HTTP/1.1, one canned chat completion per request (text chosen by seed)."""

    replies = [_reply(w) for w in ("alpha", "beta", "gamma", "delta")]
    slow = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            match = _LENGTH.search(self.buffer, 0, end)
            size = int(match.group(1)) if match else 0
            if len(self.buffer) < end + 4 + size:
                return
            body = self.buffer[end + 4 : end + 4 + size]
            self.buffer = self.buffer[end + 4 + size :]
            seed_match = _SEED.search(body)
            seed = int(seed_match.group(1)) if seed_match else 0
            reply = self.replies[seed % len(self.replies)]
            if self.slow:
                asyncio.get_running_loop().call_later(slow_delay(seed), self._write, reply)
            else:
                self.transport.write(reply)

    def _write(self, reply: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(reply)


def run_upstream(port: int, slow: bool) -> None:
    _fast_loop()
    _UpstreamProtocol.slow = slow

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(
            _UpstreamProtocol, "127.0.0.1", port, backlog=1024
        )
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- the gateway (own process) ------------------------------------------------------------
def run_gateway(http_port: int, grpc_port: int, upstream_url: str) -> None:
    from bon_gateway.api.server import serve_gateway
    from bon_gateway.config import GatewayConfig
    from bon_gateway.engine.engine import Engine
    from bon_gateway.generation.upstream import UpstreamClient
    from bon_gateway.metrics import Metrics
    from bon_gateway.types import CandidateScore, Message, ModelInfo, ScoreBatchResult

    class NoopScorer:
        """Scores nothing: every candidate gets 0 at once."""

        def models(self) -> list[ModelInfo]:
            return [ModelInfo("noop", "reward")]

        def ready(self) -> bool:
            return True

        async def score(
            self,
            model: str,
            messages: Any,
            candidates: Any,
            *,
            steps: Any = (),
            activation: Any = None,
            request_id: str = "",
        ) -> ScoreBatchResult:
            return ScoreBatchResult(model, [CandidateScore(0.0) for _ in candidates])

        async def aclose(self) -> None:
            pass

    _ = Message  # the scorer protocol's message type; unused by a no-op
    _fast_loop()
    config = GatewayConfig.model_validate(
        {
            "server": {
                "host": "127.0.0.1",
                "http_port": http_port,
                "grpc_port": grpc_port,
                "log_level": "WARNING",
                "max_best_of": 16,
                "limits": {"max_in_flight": 1024},
            },
            "generator": {"url": upstream_url, "model": "bench", "mode": "parallel"},
        }
    )

    async def main() -> None:
        metrics = Metrics()
        engine = Engine(config, UpstreamClient(config.generator, metrics), NoopScorer(), metrics)
        await serve_gateway(config, engine, metrics, on_started=lambda h, g: print("ready", flush=True))
        await engine.aclose()

    asyncio.run(main())


# -- driver ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def child(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    # The repository root on the path: the gateway child imports bon_gateway from the checkout.
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if b"ready" not in line:
            raise RuntimeError(f"{args[0]} did not start")
        yield process
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _body(seed: int) -> dict[str, Any]:
    return {"model": "bench", "messages": MESSAGES, "seed": seed, "n": 1, "stream": False, "max_tokens": 16}


async def _post(client: UpstreamHttp, url: str, body: dict[str, Any]) -> Any:
    reply = await client.post(url, json.dumps(body, separators=(",", ":")).encode(), timeout_s=30)
    if reply.status != 200:
        raise RuntimeError(f"HTTP {reply.status} from {url}: {reply.content[:200]!r}")
    return json.loads(reply.content)


async def direct_once(client: UpstreamHttp, upstream: str, seed: int) -> None:
    """The baseline: the same N calls, made by the client itself."""
    await asyncio.gather(*(_post(client, f"{upstream}/chat/completions", _body(seed + i)) for i in range(N)))


async def gateway_once(client: UpstreamHttp, gateway: str, seed: int) -> None:
    body = {"model": "bench", "messages": MESSAGES, "seed": seed, "best_of": N, "max_tokens": 16}
    reply = await _post(client, f"{gateway}/chat/completions", body)
    if reply["usage"]["candidates_generated"] != N:
        raise RuntimeError("the gateway dropped candidates")


@contextlib.asynccontextmanager
async def _client() -> AsyncIterator[UpstreamHttp]:
    pool = UpstreamHttp(max_connections=1024)
    try:
        yield pool
    finally:
        await pool.aclose()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def latency(upstream: str, gateway: str, requests: int) -> dict[str, float]:
    """(a): one client in a loop; gateway and direct requests alternate so drift hits both."""
    times: dict[str, list[float]] = {"direct": [], "gateway": []}
    async with _client() as client:
        for warm in range(50):
            await direct_once(client, upstream, warm * N)
            await gateway_once(client, gateway, warm * N)
        for i in range(requests):
            seed = 1000 + i * N
            for name in ("direct", "gateway") if i % 2 else ("gateway", "direct"):
                started = time.perf_counter()
                if name == "direct":
                    await direct_once(client, upstream, seed)
                else:
                    await gateway_once(client, gateway, seed)
                times[name].append(time.perf_counter() - started)
    out: dict[str, float] = {}
    for name, values in times.items():
        out[f"{name}_p50_ms"] = 1000 * pct(values, 50)
        out[f"{name}_p99_ms"] = 1000 * pct(values, 99)
    out["added_p50_ms"] = out["gateway_p50_ms"] - out["direct_p50_ms"]
    out["added_p99_ms"] = out["gateway_p99_ms"] - out["direct_p99_ms"]
    out["requests"] = requests
    return out


async def throughput(target: str, url: str, clients: int, seconds: float) -> dict[str, float]:
    """(b): `clients` concurrent loops for `seconds`; candidates/s = N x requests/s."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def loop(worker: int, client: UpstreamHttp) -> None:
        nonlocal done
        seed = worker * 1_000_000
        while time.perf_counter() < stop_at:
            if target == "direct":
                await direct_once(client, url, seed)
            else:
                await gateway_once(client, url, seed)
            seed += N
            done += 1

    async with _client() as client:
        stop_at = time.perf_counter() + 1.0  # warm-up: open the connections
        await asyncio.gather(*(loop(w, client) for w in range(clients)))
        done = 0
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(loop(w, client) for w in range(clients)))
        elapsed = time.perf_counter() - started
    return {"requests_per_s": done / elapsed, "candidates_per_s": N * done / elapsed}


async def slow_upstream(upstream: str, gateway: str, requests: int, concurrency: int) -> dict[str, float]:
    """(c): end-to-end / slowest candidate, per request (the scorer adds ~0)."""
    ratios: dict[str, list[float]] = {"direct": [], "gateway": []}
    counter = iter(range(requests))

    async def loop(client: UpstreamHttp) -> None:
        for i in counter:
            seed = 5000 + i * N
            slowest = max(slow_delay(seed + k) for k in range(N))
            for name in ("direct", "gateway"):
                started = time.perf_counter()
                if name == "direct":
                    await direct_once(client, upstream, seed)
                else:
                    await gateway_once(client, gateway, seed)
                ratios[name].append((time.perf_counter() - started) / slowest)

    async with _client() as client:
        # Warm-up, not measured: connections, and the gateway's first-request costs.
        await asyncio.gather(*(gateway_once(client, gateway, 90_000 + i * N) for i in range(concurrency)))
        await asyncio.gather(*(direct_once(client, upstream, 90_000 + i * N) for i in range(concurrency)))
        await asyncio.gather(*(loop(client) for _ in range(concurrency)))
    out: dict[str, float] = {"requests": requests}
    for name, values in ratios.items():
        out[f"{name}_ratio_p50"] = statistics.median(values)
        out[f"{name}_ratio_p95"] = pct(values, 95)
        out[f"{name}_ratio_max"] = max(values)
    return out


def table(results: dict[str, Any]) -> str:
    a, b, c = results["latency"], results["throughput"], results["slow"]
    rows = [
        (
            "(a) added latency p50, 1 client, N=4",
            f"{a['added_p50_ms']:.2f} ms",
            "<= 1 ms",
            f"gateway {a['gateway_p50_ms']:.2f} ms, direct {a['direct_p50_ms']:.2f} ms",
        ),
        (
            "(a) added latency p99",
            f"{a['added_p99_ms']:.2f} ms",
            "<= 5 ms",
            f"gateway {a['gateway_p99_ms']:.2f} ms, direct {a['direct_p99_ms']:.2f} ms",
        ),
        (
            "(b) candidates/s, 64 clients, N=4",
            f"{b['gateway']['candidates_per_s']:.0f}",
            ">= 1,000",
            f"direct client {b['direct']['candidates_per_s']:.0f}/s",
        ),
        (
            "(c) end-to-end / slowest candidate, p50",
            f"{c['gateway_ratio_p50']:.3f}",
            "<= 1.1",
            f"direct {c['direct_ratio_p50']:.3f}",
        ),
        (
            "(c) end-to-end / slowest candidate, p95",
            f"{c['gateway_ratio_p95']:.3f}",
            "<= 1.1",
            f"direct {c['direct_ratio_p95']:.3f}",
        ),
        (
            "(c) end-to-end / slowest candidate, max",
            f"{c['gateway_ratio_max']:.3f}",
            "<= 1.1",
            f"direct {c['direct_ratio_max']:.3f}",
        ),
    ]
    env = results["environment"]
    lines = [
        "# Gateway overhead (bench/gateway_overhead.py)",
        "",
        f"{env['date']} · {env['cpus']} CPUs (shared) · Python {env['python']} · event loop {env['loop']} · "
        f"load average at start {env['load_average']}",
        "",
        "| Figure | Gateway | Target | Next to it |",
        "|---|---|---|---|",
        *[f"| {name} | {value} | {target} | {note} |" for name, value, target, note in rows],
        "",
        f"(a) {a['requests']} requests each, alternating; (b) {results['throughput_seconds']:g} s per side; "
        f"(c) {c['requests']} requests each, {results['slow_concurrency']} at a time, candidates "
        f"{SLOW_MIN_S * 1000:.0f}-{SLOW_MAX_S * 1000:.0f} ms, no-op scorer.",
    ]
    return "\n".join(lines) + "\n"


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    fast_port, slow_port = free_port(), free_port()
    gw_fast, gw_slow = (free_port(), free_port()), (free_port(), free_port())
    fast_url, slow_url = f"http://127.0.0.1:{fast_port}/v1", f"http://127.0.0.1:{slow_port}/v1"
    with contextlib.ExitStack() as stack:
        stack.enter_context(child("_upstream", str(fast_port)))
        stack.enter_context(child("_upstream", str(slow_port), "--slow"))
        stack.enter_context(child("_gateway", str(gw_fast[0]), str(gw_fast[1]), fast_url))
        stack.enter_context(child("_gateway", str(gw_slow[0]), str(gw_slow[1]), slow_url))
        gateway_fast = f"http://127.0.0.1:{gw_fast[0]}/v1"
        gateway_slow = f"http://127.0.0.1:{gw_slow[0]}/v1"
        print("(a) latency ...", flush=True)
        lat = await latency(fast_url, gateway_fast, args.latency_requests)
        print("(b) throughput ...", flush=True)
        thr = {
            "direct": await throughput("direct", fast_url, 64, args.seconds),
            "gateway": await throughput("gateway", gateway_fast, 64, args.seconds),
        }
        print("(c) slow upstream ...", flush=True)
        slow = await slow_upstream(slow_url, gateway_slow, args.slow_requests, args.slow_concurrency)
    return {
        "latency": lat,
        "throughput": thr,
        "slow": slow,
        "throughput_seconds": args.seconds,
        "slow_concurrency": args.slow_concurrency,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_upstream":
        run_upstream(int(sys.argv[2]), "--slow" in sys.argv)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_gateway":
        run_gateway(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    parser.add_argument("--output", type=Path, default=RESULTS / "gateway_overhead")
    args = parser.parse_args()
    args.latency_requests = 200 if args.quick else 1000
    args.seconds = 3.0 if args.quick else 10.0
    args.slow_requests = 16 if args.quick else 48
    args.slow_concurrency = 8
    environment = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loop": loop_name(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    _fast_loop()
    results = asyncio.run(bench(args))
    results["environment"] = environment
    text = table(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".md").write_text(text, encoding="utf-8")
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
