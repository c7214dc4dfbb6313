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
    # before/after in one run: each tree's gateway, measured alternately against the same direct client
    python bench/gateway_overhead.py --gateway-src before=/path/to/old/tree --gateway-src after=.

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
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from bon_gateway.generation.transport import UpstreamHttp

# The driver imports bon_gateway from this checkout; each gateway child from its
# own --gateway-src tree (main() puts the right one first on sys.path).
ROOT = Path(__file__).resolve().parent.parent
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


def _sse_reply(text: str) -> bytes:
    """The same completion streamed as vLLM sends it: role, content, finish, usage, [DONE]."""
    base = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "bench"}
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**base, "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}},
    ]
    body = b"".join(b"data: " + json.dumps(c, separators=(",", ":")).encode() + b"\n\n" for c in chunks)
    body += b"data: [DONE]\n\n"
    head = f"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


_STREAM = re.compile(rb'"stream":\s*true')


class _UpstreamProtocol(asyncio.Protocol):
    """Keep-alive HTTP/1.1, one canned chat completion per request (text chosen by seed),
    streamed (SSE) when the request asks for it, as the gateway's calls do."""

    replies = [_reply(w) for w in ("alpha", "beta", "gamma", "delta")]
    streamed = [_sse_reply(w) for w in ("alpha", "beta", "gamma", "delta")]
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
            replies = self.streamed if _STREAM.search(body) else self.replies
            reply = replies[seed % len(replies)]
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

        def on_readiness_change(self, listener: Any) -> None:
            pass

        async def score(self, model: str, messages: Any, candidates: Any, **_: Any) -> ScoreBatchResult:
            # **_: any tree's scorer protocol (deadline, steps, activation, request_id).
            return ScoreBatchResult(model, [CandidateScore(0.0) for _ in candidates])

        def open_group(self, model: str, messages: Any, **_: Any) -> Any:
            return NoopGroup(model)

        async def aclose(self) -> None:
            pass

    class NoopGroup:
        """The streaming engine's scoring group: nothing kept, 0 for everything."""

        prompt_tokens = 0

        def __init__(self, model: str) -> None:
            self.model = model

        async def opened(self) -> None:
            pass

        async def score(self, candidates: Any, **_: Any) -> ScoreBatchResult:
            return ScoreBatchResult(self.model, [CandidateScore(0.0) for _ in candidates])

        async def close(self) -> None:
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

    import bon_gateway

    # The driver checks that this child runs the tree it was asked for.
    package_dir = Path(bon_gateway.__file__).resolve().parent

    async def main() -> None:
        metrics = Metrics()
        engine = Engine(config, UpstreamClient(config.generator, metrics), NoopScorer(), metrics)
        await serve_gateway(
            config, engine, metrics, on_started=lambda h, g: print(f"ready {package_dir}", flush=True)
        )
        await engine.aclose()

    asyncio.run(main())


# -- driver ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class GatewayVersion:
    """A source tree whose gateway is measured: `label` names it in the tables, `src` is
    the gateway process's PYTHONPATH (a checkout or worktree holding bon_gateway/)."""

    label: str
    src: Path

    @classmethod
    def parse(cls, text: str) -> GatewayVersion:
        """`LABEL=DIR` or `DIR` (labelled by its folder name)."""
        label, sep, path = text.partition("=")
        if not sep:
            label, path = "", text
        src = Path(path).resolve()
        if not (src / "bon_gateway" / "__init__.py").is_file():
            raise argparse.ArgumentTypeError(f"{src} holds no bon_gateway package")
        return cls(label or src.name, src)

    def commit(self) -> str:
        """The tree's commit, "+changes" when its bon_gateway/ differs from it (so a table says
        what it measured)."""
        try:
            head = subprocess.run(
                ["git", "-C", str(self.src), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            changes = subprocess.run(
                ["git", "-C", str(self.src), "status", "--porcelain", "--", "bon_gateway"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"
        return f"{head}+changes" if changes else head


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def child(*args: str, src: Path = ROOT) -> Iterator[tuple[str, int]]:
    """This script in a child process (`_upstream` or `_gateway`); yields the rest of its
    "ready" line and its pid. `src` goes first on the child's PYTHONPATH: the gateway imports
    bon_gateway from there."""
    path = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    process = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().decode().strip()
        if not line.startswith("ready"):
            raise RuntimeError(f"{args[0]} did not start")
        yield line.removeprefix("ready").strip(), process.pid
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


async def call_once(client: UpstreamHttp, target: str, url: str, seed: int) -> None:
    """One request's worth of work: "direct" fans out itself, any other target is a gateway."""
    if target == "direct":
        await direct_once(client, url, seed)
    else:
        await gateway_once(client, url, seed)


@contextlib.asynccontextmanager
async def _client() -> AsyncIterator[UpstreamHttp]:
    from bon_gateway.generation.transport import UpstreamHttp

    pool = UpstreamHttp(max_connections=1024)
    try:
        yield pool
    finally:
        await pool.aclose()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def rotated(names: Sequence[str], by: int) -> list[str]:
    """`names` starting at position `by`: each target goes first equally often, so drift and
    the cost of going first after an idle spell hit every target alike."""
    k = by % len(names)
    return [*names[k:], *names[:k]]


async def latency(targets: dict[str, str], requests: int) -> dict[str, dict[str, float]]:
    """(a): one client in a loop; the targets take turns request by request."""
    times: dict[str, list[float]] = {name: [] for name in targets}
    async with _client() as client:
        for warm in range(50):
            for name, url in targets.items():
                await call_once(client, name, url, warm * N)
        for i in range(requests):
            seed = 1000 + i * N
            for name in rotated(list(targets), i):
                started = time.perf_counter()
                await call_once(client, name, targets[name], seed)
                times[name].append(time.perf_counter() - started)
    return {
        name: {"p50_ms": 1000 * pct(values, 50), "p99_ms": 1000 * pct(values, 99)}
        for name, values in times.items()
    }


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) a process has used so far; None off Linux or without a pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text() if pid is not None else ""
    except OSError:
        return None
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _throughput_run(
    target: str, url: str, clients: int, seconds: float, pid: int | None
) -> tuple[int, float, float | None]:
    """`clients` concurrent loops for `seconds` after a 1 s warm-up: (requests done, seconds,
    CPU seconds process `pid` used meanwhile)."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def loop(worker: int, client: UpstreamHttp) -> None:
        nonlocal done
        seed = worker * 1_000_000
        while time.perf_counter() < stop_at:
            await call_once(client, target, url, seed)
            seed += N
            done += 1

    async with _client() as client:
        stop_at = time.perf_counter() + 1.0  # warm-up: open the connections
        await asyncio.gather(*(loop(w, client) for w in range(clients)))
        done = 0
        cpu_before = cpu_seconds(pid)
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(loop(w, client) for w in range(clients)))
        elapsed = time.perf_counter() - started
        cpu_after = cpu_seconds(pid)
    cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    return done, elapsed, cpu


async def throughput(
    targets: dict[str, str], pids: dict[str, int], clients: int, seconds: float, rounds: int
) -> dict[str, dict[str, Any]]:
    """(b): candidates/s = N x requests/s; `seconds` per target in all, split into `rounds`
    that visit the targets in turn (A B C, then C B A, ...). For a gateway (its pid in
    `pids`), also the CPU time its process used per request: the figure that says what a
    request costs the gateway's event loop, however busy the machine is."""
    done = dict.fromkeys(targets, 0)
    elapsed = dict.fromkeys(targets, 0.0)
    cpu: dict[str, float | None] = dict.fromkeys(targets, 0.0)
    per_round: dict[str, list[float]] = {name: [] for name in targets}
    names = list(targets)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            count, took, used = await _throughput_run(
                name, targets[name], clients, seconds / rounds, pids.get(name)
            )
            done[name] += count
            elapsed[name] += took
            so_far = cpu[name]
            cpu[name] = so_far + used if so_far is not None and used is not None else None
            per_round[name].append(N * count / took)
    out: dict[str, dict[str, Any]] = {}
    for name in targets:
        used_s = cpu[name]
        out[name] = {
            "requests_per_s": done[name] / elapsed[name],
            "candidates_per_s": N * done[name] / elapsed[name],
            "rounds_candidates_per_s": per_round[name],
            "cpu_ms_per_request": 1000 * used_s / done[name] if used_s is not None and name in pids else None,
        }
    return out


async def slow_upstream(
    targets: dict[str, str], requests: int, concurrency: int
) -> dict[str, dict[str, float]]:
    """(c): end-to-end / slowest candidate, per request (the scorer adds ~0)."""
    ratios: dict[str, list[float]] = {name: [] for name in targets}
    counter = iter(range(requests))

    async def loop(client: UpstreamHttp) -> None:
        for i in counter:
            seed = 5000 + i * N
            slowest = max(slow_delay(seed + k) for k in range(N))
            for name in rotated(list(targets), i):
                started = time.perf_counter()
                await call_once(client, name, targets[name], seed)
                ratios[name].append((time.perf_counter() - started) / slowest)

    async with _client() as client:
        # Warm-up, not measured: connections, and the gateways' first-request costs.
        for name, url in targets.items():
            await asyncio.gather(*(call_once(client, name, url, 90_000 + i * N) for i in range(concurrency)))
        await asyncio.gather(*(loop(client) for _ in range(concurrency)))
    return {
        name: {"ratio_p50": statistics.median(values), "ratio_p95": pct(values, 95), "ratio_max": max(values)}
        for name, values in ratios.items()
    }


def version_figures(results: dict[str, Any], label: str) -> dict[str, Any]:
    """One gateway's figures next to the direct client's, in the shape `table` reads."""
    lat, thr, slow = results["latency"], results["throughput"], results["slow"]
    gateway, direct = lat[label], lat["direct"]
    return {
        "latency": {
            "gateway_p50_ms": gateway["p50_ms"],
            "gateway_p99_ms": gateway["p99_ms"],
            "direct_p50_ms": direct["p50_ms"],
            "direct_p99_ms": direct["p99_ms"],
            "added_p50_ms": gateway["p50_ms"] - direct["p50_ms"],
            "added_p99_ms": gateway["p99_ms"] - direct["p99_ms"],
            "requests": results["latency_requests"],
        },
        "throughput": {"gateway": thr[label], "direct": thr["direct"]},
        "slow": {
            **{f"gateway_{k}": v for k, v in slow[label].items()},
            **{f"direct_{k}": v for k, v in slow["direct"].items()},
            "requests": results["slow_requests"],
        },
    }


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f} ms"


def table(figures: dict[str, Any], results: dict[str, Any], title: str) -> str:
    a, b, c = figures["latency"], figures["throughput"], figures["slow"]
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
            f"direct client {b['direct']['candidates_per_s']:.0f}/s; rounds "
            + " / ".join(f"{x:.0f}" for x in b["gateway"]["rounds_candidates_per_s"]),
        ),
        (
            "(b) gateway process CPU per request, 64 clients",
            _ms(b["gateway"]["cpu_ms_per_request"]),
            "-",
            "user + system time of the gateway process / requests it answered",
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
    return "\n".join(
        [
            f"## {title}",
            "",
            "| Figure | Gateway | Target | Next to it |",
            "|---|---|---|---|",
            *[f"| {name} | {value} | {target} | {note} |" for name, value, target, note in rows],
            "",
        ]
    )


def comparison(figures: dict[str, dict[str, Any]]) -> str:
    """Every version's headline figures side by side, each over the first version's."""
    labels = list(figures)
    picks: list[tuple[str, Callable[[dict[str, Any]], float | None], str]] = [
        ("(a) added latency p50 (ms)", lambda f: f["latency"]["added_p50_ms"], "{:.2f}"),
        ("(a) added latency p99 (ms)", lambda f: f["latency"]["added_p99_ms"], "{:.2f}"),
        ("(a) gateway p50 end to end (ms)", lambda f: f["latency"]["gateway_p50_ms"], "{:.2f}"),
        ("(b) candidates/s, 64 clients", lambda f: f["throughput"]["gateway"]["candidates_per_s"], "{:.0f}"),
        (
            "(b) gateway CPU per request (ms)",
            lambda f: f["throughput"]["gateway"]["cpu_ms_per_request"],
            "{:.3f}",
        ),
        ("(c) end-to-end / slowest, max", lambda f: f["slow"]["gateway_ratio_max"], "{:.3f}"),
    ]
    header = " | ".join([*labels, *(f"{label}/{labels[0]}" for label in labels[1:])])
    lines = [
        "## Side by side (same run)",
        "",
        f"| Figure | {header} |",
        "|---|" + "---|" * (2 * len(labels) - 1),
    ]
    for name, pick, fmt in picks:
        maybe = [pick(figures[label]) for label in labels]
        picked = [value for value in maybe if value is not None]
        if len(picked) < len(maybe):
            continue  # no CPU times off Linux
        values = [fmt.format(value) for value in picked]
        ratios = [f"{value / picked[0]:.2f}" if picked[0] else "-" for value in picked[1:]]
        lines.append(f"| {name} | {' | '.join([*values, *ratios])} |")
    return "\n".join([*lines, ""])


def report(results: dict[str, Any]) -> str:
    env = results["environment"]
    labels = [v["label"] for v in results["versions"]]
    figures = {label: version_figures(results, label) for label in labels}
    several = len(labels) > 1
    lines = [
        "# Gateway overhead (bench/gateway_overhead.py)",
        "",
        f"{env['date']} · {env['cpus']} CPUs (shared) · Python {env['python']} · event loop {env['loop']} · "
        f"load average at start {env['load_average']}",
        "",
        *[f"- gateway `{v['label']}`: {v['src']} at {v['commit']}" for v in results["versions"]],
        "",
    ]
    for label in labels:
        lines.append(table(figures[label], results, f"Gateway `{label}`" if several else "Figures"))
    if several:
        lines.append(comparison(figures))
    order = " and ".join(["direct", *labels])
    lines.append(
        f"(a) {results['latency_requests']} requests each, {order} taking turns; (b) "
        f"{results['throughput_seconds']:g} s per side in {results['rounds']} round(s), in turn; "
        f"(c) {results['slow_requests']} requests each, {results['slow_concurrency']} at a time, candidates "
        f"{SLOW_MIN_S * 1000:.0f}-{SLOW_MAX_S * 1000:.0f} ms, no-op scorer."
    )
    return "\n".join(lines) + "\n"


async def bench(args: argparse.Namespace, versions: list[GatewayVersion]) -> dict[str, Any]:
    fast_port, slow_port = free_port(), free_port()
    fast_url, slow_url = f"http://127.0.0.1:{fast_port}/v1", f"http://127.0.0.1:{slow_port}/v1"
    fast: dict[str, str] = {"direct": fast_url}
    slow: dict[str, str] = {"direct": slow_url}
    fast_pids: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(child("_upstream", str(fast_port)))
        stack.enter_context(child("_upstream", str(slow_port), "--slow"))
        for version in versions:
            for targets, upstream in ((fast, fast_url), (slow, slow_url)):
                http_port, grpc_port = free_port(), free_port()
                ready, pid = stack.enter_context(
                    child(
                        "_gateway",
                        str(http_port),
                        str(grpc_port),
                        upstream,
                        str(version.src),
                        src=version.src,
                    )
                )
                if Path(ready) != version.src / "bon_gateway":
                    raise RuntimeError(f"gateway {version.label} imported bon_gateway from {ready}")
                targets[version.label] = f"http://127.0.0.1:{http_port}/v1"
                if targets is fast:
                    fast_pids[version.label] = pid
        print("(a) latency ...", flush=True)
        lat = await latency(fast, args.latency_requests)
        print("(b) throughput ...", flush=True)
        thr = await throughput(fast, fast_pids, 64, args.seconds, args.rounds)
        print("(c) slow upstream ...", flush=True)
        slow_figures = await slow_upstream(slow, args.slow_requests, args.slow_concurrency)
    return {
        "latency": lat,
        "throughput": thr,
        "slow": slow_figures,
        "latency_requests": args.latency_requests,
        "slow_requests": args.slow_requests,
        "throughput_seconds": args.seconds,
        "rounds": args.rounds,
        "slow_concurrency": args.slow_concurrency,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_upstream":
        run_upstream(int(sys.argv[2]), "--slow" in sys.argv)
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_gateway":
        sys.path.insert(0, sys.argv[5])  # the tree under test, ahead of this script's folder
        run_gateway(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    if str(ROOT) not in sys.path:  # run from a checkout: python bench/gateway_overhead.py
        sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests (smoke run)")
    parser.add_argument("--output", type=Path, default=RESULTS / "gateway_overhead")
    parser.add_argument(
        "--gateway-src",
        action="append",
        type=GatewayVersion.parse,
        metavar="[LABEL=]DIR",
        help="measure the gateway of this source tree (repeat to compare trees in one run, "
        "alternately; ratios are over the first); default: this checkout",
    )
    parser.add_argument(
        "--rounds", type=int, help="(b) split into this many rounds (default 2 with several trees, else 1)"
    )
    args = parser.parse_args()
    versions: list[GatewayVersion] = args.gateway_src or [GatewayVersion("checkout", ROOT)]
    labels = [v.label for v in versions]
    if len(set(labels)) != len(labels) or "direct" in labels:
        parser.error(f"--gateway-src labels must be distinct and not 'direct': {labels}")
    args.rounds = args.rounds or (2 if len(versions) > 1 else 1)
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
    results = asyncio.run(bench(args, versions))
    results["environment"] = environment
    results["versions"] = [{"label": v.label, "src": str(v.src), "commit": v.commit()} for v in versions]
    results["figures"] = {v.label: version_figures(results, v.label) for v in versions}
    text = report(results)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".md").write_text(text, encoding="utf-8")
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
