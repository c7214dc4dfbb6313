"""Soak: a bounded run of Best-of-N requests against `bon-gateway serve` with
faults everywhere, checking every reply.

- upstream: bench/fault_upstream.py, a real HTTP server where --fault-rate of
  the calls fail (500s, stalls past the gateway's generator timeout, TCP resets);
- gateway: `python -m bon_gateway serve` in its own process, API keys on, a
  real WorkerPool of --workers reward-worker processes on a tiny reward model;
- chaos: one worker killed with SIGKILL every --kill-every requests;
- load: --requests requests, --concurrency at a time, over HTTP and (a
  --grpc-share of them) gRPC, each with return_candidates so it can be checked.

A reply is right when every returned candidate is the text the upstream gives
for its seed, with the reward /v1/rewards gave that text before the soak, the
chosen answer has the highest reward, and returned + dropped == best_of.
lost = no reply inside --deadline-s, a dropped connection, or a wrong reply.
Prints a table and writes it to --out (with the figures as JSON).

    python bench/soak.py                        # 10,000 requests, concurrency 64
    python bench/soak.py --requests 2000 --kill-every 500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fault_upstream import TEXTS  # noqa: E402
from bon_gateway.config import GeneratorConfig, LimitsConfig, ProbeConfig  # noqa: E402
from bon_gateway.v1 import best_of_n_pb2 as pb  # noqa: E402
from bon_gateway.v1 import best_of_n_pb2_grpc as pb_grpc  # noqa: E402

PROMPTS = (
    "What is the capital of France?",
    "Name the French capital.",
    "Which city is the seat of the French government?",
    "Where does the President of France live?",
    "Capital of France, one word.",
    "Tell me about Paris.",
)
REWARD_TOLERANCE = 1e-3  # batched vs single scoring differ by ~1e-6; a swapped text by far more


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def rss_mib(pid: int) -> float:
    """Resident set size of a process, MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def worker_pids(gateway_pid: int) -> list[int]:
    """The reward-worker processes the gateway spawned."""
    pids: list[int] = []
    for task in Path(f"/proc/{gateway_pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                if b"bon_gateway.scoring.worker" in cmdline:
                    pids.append(int(child))
    return sorted(set(pids))


def tiny_reward_model() -> Path:
    """The tests' tiny Llama reward model (built and cached on first use; needs the dev extra)."""
    from tests.fixtures.checkpoints import tiny_llama_rm

    return tiny_llama_rm()


@dataclass
class Tally:
    sent: int = 0
    done: int = 0
    ok: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    lost_reasons: Counter[str] = field(default_factory=Counter)
    lost_examples: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    kills: int = 0
    rss: list[tuple[int, float, float]] = field(default_factory=list)  # (done, gateway, workers)


# The transport limits against hostile clients (issue 13), written out so the soak runs
# with them on and says which values it ran with: the defaults unless given.
TRANSPORT_LIMITS = ("max_header_bytes", "header_timeout_s", "body_timeout_s", "max_connections")


def transport_limits(args: argparse.Namespace) -> dict[str, float]:
    defaults = LimitsConfig()
    return {
        key: getattr(args, key) if getattr(args, key) is not None else getattr(defaults, key)
        for key in TRANSPORT_LIMITS
    }


def _config_toml(args: argparse.Namespace, upstream_port: int, model: Path, http: int, grpc_port: int) -> str:
    limits = "\n".join(f"{key} = {value}" for key, value in transport_limits(args).items())
    return f"""
[server]
host = "127.0.0.1"
http_port = {http}
grpc_port = {grpc_port}
max_best_of = 16
request_timeout_s = {args.deadline_s - 5}
log_level = "WARNING"

[server.limits]
max_in_flight = {max(256, args.concurrency * 2)}
{limits}

[generator]
url = "http://127.0.0.1:{upstream_port}/v1"
model = "soak"
timeout_s = {args.generator_timeout_s}

[[reward_models]]
name = "tiny"
path = "{model}"
workers = {args.workers}
max_wait_ms = 2.0
"""


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.key = secrets.token_hex(16)
        self.tally = Tally()
        self.rng = random.Random(args.seed)
        self.reference: dict[int, dict[str, float]] = {}
        self.gateway: subprocess.Popen[bytes] | None = None
        self.gateway_crashed = False

    # -- checks --------------------------------------------------------------------
    def _check(
        self, prompt: int, seed: int, chosen: str, candidates: list[tuple[int, str, float]], dropped: int
    ) -> str | None:
        """Why the reply is wrong, or None."""
        if len(candidates) + dropped != self.args.best_of:
            return "count"
        best = max((reward for _, _, reward in candidates), default=None)
        for index, text, reward in candidates:
            if text != TEXTS[(seed + index) % len(TEXTS)]:
                return "text"
            if abs(reward - self.reference[prompt][text]) > REWARD_TOLERANCE:
                return "reward"
        winners = {text for _, text, reward in candidates if best is not None and reward >= best - 1e-9}
        return None if chosen in winners else "selection"

    # -- one request ---------------------------------------------------------------
    async def _http(self, client: httpx.AsyncClient, prompt: int, seed: int) -> tuple[str, str | None]:
        body = {
            "messages": [{"role": "user", "content": PROMPTS[prompt]}],
            "best_of": self.args.best_of,
            "min_candidates": self.args.min_candidates,
            "seed": seed,
            "max_tokens": 32,
            "return_candidates": True,
        }
        response = await client.post("/v1/chat/completions", json=body)
        code = f"http_{response.status_code}"
        if response.status_code != 200:
            return code, None
        data = response.json()
        candidates = [(c["index"], c["text"], c["reward"]) for c in data["candidates"]]
        chosen = data["choices"][0]["message"]["content"]
        return code, self._check(prompt, seed, chosen, candidates, data["candidates_dropped"])

    async def _grpc(self, stub: pb_grpc.BestOfNStub, prompt: int, seed: int) -> tuple[str, str | None]:
        request = pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content=PROMPTS[prompt])],
            best_of=self.args.best_of,
            min_candidates=self.args.min_candidates,
            sampling=pb.SamplingParams(seed=seed, max_tokens=32),
            return_candidates=True,
        )
        try:
            reply = await stub.Generate(
                request, metadata=(("authorization", f"Bearer {self.key}"),), timeout=self.args.deadline_s
            )
        except grpc.aio.AioRpcError as err:
            # The client's own deadline passing is "no reply"; the gateway's
            # DEADLINE_EXCEEDED (its request_timeout_s, shorter) is a reply.
            from_gateway = "bon-error-code" in dict(err.trailing_metadata() or ())
            if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and not from_gateway:
                raise TimeoutError from None
            return f"grpc_{err.code().name}", None
        candidates = [(c.index, c.text, c.reward) for c in reply.candidates]
        chosen = reply.candidates[0].text if reply.candidates else ""
        return "grpc_OK", self._check(prompt, seed, chosen, candidates, reply.candidates_dropped)

    async def _one(self, client: httpx.AsyncClient, stub: pb_grpc.BestOfNStub) -> None:
        prompt = self.rng.randrange(len(PROMPTS))
        seed = self.rng.randrange(10**6)
        use_grpc = self.rng.random() < self.args.grpc_share
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.args.deadline_s):
                if use_grpc:
                    code, wrong = await self._grpc(stub, prompt, seed)
                else:
                    code, wrong = await self._http(client, prompt, seed)
        except (TimeoutError, httpx.TimeoutException):
            self._lose("no_reply_in_deadline", use_grpc, started)
            return
        except (httpx.TransportError, grpc.aio.AioRpcError, OSError) as err:
            self._lose(f"connection:{type(err).__name__}", use_grpc, started)
            return
        self.tally.codes[code] += 1
        if wrong is not None:
            self._lose(f"wrong_reply:{wrong}", use_grpc, started)
        elif code in ("http_200", "grpc_OK"):
            self.tally.ok += 1
            self.tally.latencies.append(time.perf_counter() - started)

    def _lose(self, reason: str, use_grpc: bool, started: float) -> None:
        self.tally.lost += 1
        self.tally.lost_reasons[reason] += 1
        if len(self.tally.lost_examples) < 20:
            front = "grpc" if use_grpc else "http"
            self.tally.lost_examples.append(
                f"{reason} via {front} after {time.perf_counter() - started:.1f}s at done={self.tally.done}"
            )

    # -- the run -------------------------------------------------------------------
    async def _client_loop(self, client: httpx.AsyncClient, stub: pb_grpc.BestOfNStub) -> None:
        args, tally = self.args, self.tally
        while tally.sent < args.requests:
            tally.sent += 1
            await self._one(client, stub)
            tally.done += 1
            if tally.done % args.kill_every == 0:
                self._on_milestone()

    def _on_milestone(self) -> None:
        assert self.gateway is not None
        tally = self.tally
        pids = worker_pids(self.gateway.pid)
        tally.rss.append((tally.done, rss_mib(self.gateway.pid), sum(rss_mib(p) for p in pids)))
        if self.gateway.poll() is not None:
            self.gateway_crashed = True
        print(
            f"  {tally.done:>6} done  ok={tally.ok} lost={tally.lost} kills={tally.kills} "
            f"gateway_rss={tally.rss[-1][1]:.0f}MiB",
            flush=True,
        )

    async def _killer(self, client: httpx.AsyncClient) -> None:
        """SIGKILL one worker each time --kill-every more requests are done.

        Only when every worker is up: killing one that is still restarting (a
        restart takes ~20 s on two busy cores) would test start-up, not serving.
        """
        assert self.gateway is not None
        next_kill = self.args.kill_every
        while self.tally.done < self.args.requests:
            await asyncio.sleep(0.2)
            if self.tally.done < next_kill:
                continue
            with contextlib.suppress(httpx.HTTPError):
                up = metric_sum((await client.get("/metrics")).text, "bon_workers_up")
                pids = worker_pids(self.gateway.pid)
                if up >= self.args.workers and len(pids) >= self.args.workers:
                    os.kill(self.rng.choice(pids), signal.SIGKILL)
                    self.tally.kills += 1
                    next_kill += self.args.kill_every

    async def run(self) -> dict[str, Any]:
        args = self.args
        work = Path(tempfile.mkdtemp(prefix="bon-soak-"))
        upstream_port, http_port, grpc_port = free_port(), free_port(), free_port()
        model = Path(args.model) if args.model else tiny_reward_model()
        upstream = _spawn(
            [
                sys.executable,
                str(REPO / "bench" / "fault_upstream.py"),
                "--port",
                str(upstream_port),
                "--fault-rate",
                str(args.fault_rate),
                "--stall-s",
                str(args.stall_s),
                "--seed",
                str(args.seed),
            ],
        )
        config = work / "gateway.toml"
        config.write_text(_config_toml(args, upstream_port, model, http_port, grpc_port))
        log_path = work / "gateway.log"
        env = {**os.environ, "BON_API_KEYS": self.key}
        with log_path.open("wb") as log:
            self.gateway = _spawn(
                [sys.executable, "-m", "bon_gateway", "serve", "--config", str(config)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        headers = {"Authorization": f"Bearer {self.key}"}
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        try:
            async with (
                httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{http_port}",
                    headers=headers,
                    timeout=args.deadline_s,
                    limits=limits,
                ) as client,
                grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
            ):
                url, wanted, keyed = str(client.base_url), self.args.workers, dict(client.headers)
                await asyncio.to_thread(wait_workers_up, self.gateway, url, wanted, keyed)
                await self._reference(client)
                gw_pid = self.gateway.pid
                rss_start = rss_mib(gw_pid)
                workers_start = sum(rss_mib(p) for p in worker_pids(gw_pid))
                print(
                    f"soak: {args.requests} requests, concurrency {args.concurrency}, "
                    f"gateway pid {gw_pid} rss {rss_start:.0f} MiB; limits on: {_limits_text(args)}",
                    flush=True,
                )
                stub = pb_grpc.BestOfNStub(channel)
                started = time.perf_counter()
                killer = asyncio.create_task(self._killer(client))
                await asyncio.gather(*(self._client_loop(client, stub) for _ in range(args.concurrency)))
                killer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await killer
                elapsed = time.perf_counter() - started
                rss_end = rss_mib(gw_pid)
                workers_end = sum(rss_mib(p) for p in worker_pids(gw_pid))
                metrics_text = (await client.get("/metrics")).text
                faults = (await client.get(f"http://127.0.0.1:{upstream_port}/stats")).json()
            if self.gateway.poll() is not None:
                self.gateway_crashed = True
            exit_code = stop_gateway(self.gateway)
        finally:
            if self.gateway.poll() is None:
                self.gateway.kill()
            upstream.terminate()
            upstream.wait(10)
        tracebacks = log_path.read_text(errors="replace").count("Traceback")
        restarts = metric_sum(metrics_text, "bon_worker_restarts_total")
        tally = self.tally
        lat = sorted(tally.latencies)
        return {
            "requests": tally.done,
            "concurrency": args.concurrency,
            "seconds": round(elapsed, 1),
            "requests_per_s": round(tally.done / elapsed, 1),
            "upstream_calls": faults.get("calls", 0),
            "faults_injected": {k: faults.get(k, 0) for k in ("error", "timeout", "reset")},
            "workers_killed": tally.kills,
            "worker_restarts": int(restarts),
            "ok": tally.ok,
            "codes": dict(sorted(tally.codes.items())),
            "lost": tally.lost,
            "lost_reasons": dict(tally.lost_reasons),
            "lost_examples": tally.lost_examples,
            "crashes": int(self.gateway_crashed) + max(0, int(restarts) - tally.kills),
            "gateway_exit_code_on_sigterm": exit_code,
            "tracebacks_in_gateway_log": tracebacks,
            "p50_s": round(_quantile(lat, 0.50), 3),
            "p99_s": round(_quantile(lat, 0.99), 3),
            "gateway_rss_mib_start": round(rss_start, 1),
            "gateway_rss_mib_end": round(rss_end, 1),
            "workers_rss_mib_start": round(workers_start, 1),
            "workers_rss_mib_end": round(workers_end, 1),
            "rss_samples": [(d, round(g, 1), round(w, 1)) for d, g, w in tally.rss],
            "gateway_log": str(log_path),
        }

    async def _reference(self, client: httpx.AsyncClient) -> None:
        """Every (prompt, text) reward, scored before any fault or kill."""
        for index, prompt in enumerate(PROMPTS):
            body = {"messages": [{"role": "user", "content": prompt}], "candidates": list(TEXTS)}
            response = await client.post("/v1/rewards", json=body)
            response.raise_for_status()
            self.reference[index] = {TEXTS[d["index"]]: d["reward"] for d in response.json()["data"]}


def wait_workers_up(
    gateway: subprocess.Popen[bytes], http_url: str, workers: int, headers: dict[str, str] | None = None
) -> None:
    """Until the gateway reports `workers` reward workers up (/ready turns 200 with the first;
    a soak or fuzz run starts with all of them: a worker killed while the pool starts stops
    the gateway)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if gateway.poll() is not None:
            raise RuntimeError(f"gateway exited with {gateway.returncode} before it was ready")
        with contextlib.suppress(httpx.HTTPError):
            scrape = httpx.get(http_url.rstrip("/") + "/metrics", headers=headers, timeout=5).text
            if metric_sum(scrape, "bon_workers_up") >= workers:
                return
        time.sleep(0.5)
    raise RuntimeError("gateway not ready after 300 s")


def stop_gateway(gateway: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, then its exit code (None if it did not exit within 60 s)."""
    if gateway.poll() is not None:
        return gateway.returncode
    gateway.send_signal(signal.SIGTERM)
    try:
        return gateway.wait(60)
    except subprocess.TimeoutExpired:
        return None


def _spawn(argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    # Popen returns at once (fork + exec); nothing here waits on the child.
    return subprocess.Popen(argv, **kwargs)


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, math.ceil(q * len(values)) - 1)]


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _limits_text(args: argparse.Namespace) -> str:
    # Also on, at their defaults: the upstream reply cap and the worker probe (issue 13).
    generator, probe = GeneratorConfig(), ProbeConfig()
    return (
        ", ".join(f"{key} = {value}" for key, value in transport_limits(args).items())
        + f"; generator.max_response_bytes = {generator.max_response_bytes}"
        + f"; worker probe every {probe.interval_s} s, timeout {probe.timeout_s} s, "
        f"restart after {probe.restart_after_s} s"
    )


def render(figures: dict[str, Any], args: argparse.Namespace) -> str:
    rows = [
        ("limits on", _limits_text(args)),
        (
            "requests",
            f"{figures['requests']} at concurrency {figures['concurrency']} "
            f"({figures['seconds']} s, {figures['requests_per_s']} req/s)",
        ),
        ("upstream calls", figures["upstream_calls"]),
        ("faults injected", ", ".join(f"{k} {v}" for k, v in figures["faults_injected"].items())),
        (
            "workers killed (SIGKILL) / restarted",
            f"{figures['workers_killed']} / {figures['worker_restarts']}",
        ),
        ("replies by code", ", ".join(f"{k} {v}" for k, v in figures["codes"].items())),
        ("ok (checked right)", figures["ok"]),
        ("lost", f"{figures['lost']} {figures['lost_reasons'] or ''}".strip()),
        ("crashes", figures["crashes"]),
        ("gateway exit code on SIGTERM", figures["gateway_exit_code_on_sigterm"]),
        ("tracebacks in the gateway log", figures["tracebacks_in_gateway_log"]),
        ("latency p50 / p99 (ok replies)", f"{figures['p50_s']} s / {figures['p99_s']} s"),
        (
            "gateway RSS start / end",
            f"{figures['gateway_rss_mib_start']} / {figures['gateway_rss_mib_end']} MiB",
        ),
        (
            "workers RSS start / end (sum)",
            f"{figures['workers_rss_mib_start']} / {figures['workers_rss_mib_end']} MiB",
        ),
    ]
    lines = [
        "# Soak",
        "",
        f"`python bench/soak.py --requests {args.requests} --concurrency {args.concurrency} "
        f"--fault-rate {args.fault_rate} --kill-every {args.kill_every} --workers {args.workers} "
        f"--best-of {args.best_of} --min-candidates {args.min_candidates} --grpc-share {args.grpc_share}`",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        "Gateway / workers RSS (MiB) every --kill-every requests: "
        + ", ".join(f"{d}: {g}/{w}" for d, g, w in figures["rss_samples"]),
        "",
        "```json",
        json.dumps({k: v for k, v in figures.items() if k != "gateway_log"}, indent=1),
        "```",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--fault-rate", type=float, default=0.10, help="share of upstream calls that fail")
    parser.add_argument("--stall-s", type=float, default=3.0, help="how long a 'timeout' fault stalls")
    parser.add_argument("--generator-timeout-s", type=float, default=1.0)
    parser.add_argument("--kill-every", type=int, default=1000, help="SIGKILL a worker every N requests")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--best-of", type=int, default=4)
    parser.add_argument("--min-candidates", type=int, default=2)
    parser.add_argument("--grpc-share", type=float, default=0.25, help="share of requests sent over gRPC")
    parser.add_argument("--deadline-s", type=float, default=30.0, help="client deadline per request")
    parser.add_argument("--model", help="reward model directory (default: the tests' tiny Llama RM)")
    parser.add_argument("--seed", type=int, default=1)
    for key in TRANSPORT_LIMITS:
        kind = int if key.startswith("max_") else float
        parser.add_argument(
            "--" + key.replace("_", "-"),
            type=kind,
            help=f"[server.limits] {key} (default: the gateway's, {getattr(LimitsConfig(), key)})",
        )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "soak.md")
    args = parser.parse_args()
    figures = asyncio.run(Soak(args).run())
    text = render(figures, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"written to {args.out}; gateway log: {figures['gateway_log']}")
    sys.exit(0 if figures["lost"] == 0 and figures["crashes"] == 0 else 1)


if __name__ == "__main__":
    main()
