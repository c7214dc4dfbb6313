"""Fuzzing at scale: the fuzzers of tests/security/test_fuzz.py (their generators,
tests/security/fuzz_inputs.py) run to --inputs inputs against a live gateway.

- gateway: `python -m bon_gateway serve` in its own process on free loopback ports,
  one real reward-worker process on the tests' tiny Llama reward model (named
  `fake-rm`, as the generators expect), small input bounds so generated values
  cross them often (as the short run's);
- upstream: the tests' FakeUpstream (fixed answers, SSE streaming) in a process
  of its own;
- inputs, by kind: JSON bodies on /v1/chat/completions, /v1/completions,
  /v1/rewards and the RLHF routes (/classify, /pooling, /score, /rerank,
  /get_reward), raw bytes on every one of those, every BestOfN RPC with generated
  messages and with malformed wire bytes, and schemathesis cases over the app's own
  OpenAPI schema.

Every reply is checked: no HTTP 5xx, no server-side error event inside a 200
stream, no gRPC code other than OK / INVALID_ARGUMENT / RESOURCE_EXHAUSTED, no
dropped connection. Every --check-every inputs (and at the end) the gateway and its
worker must be alive, /health 200 and bon_workers_up 1; RSS is sampled then.
Prints a progress line per check, then a table, also written to --out.

    python bench/fuzz_at_scale.py                      # 100,000 inputs
    python bench/fuzz_at_scale.py --inputs 5000 --seed 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.soak import (  # noqa: E402
    free_port,
    metric_sum,
    rss_mib,
    stop_gateway,
    tiny_reward_model,
    wait_workers_up,
    worker_pids,
)
from tests.security import fuzz_inputs as fz  # noqa: E402

# Error types of the gateway's own failures (errors.py codes of 5xx statuses): inside
# a streamed 200 they are what a 5xx would have been.
SERVER_SIDE_ERRORS = {"internal_error", "unavailable", "upstream_error", "worker_error", "deadline_exceeded"}
RLHF_ROUTES = tuple(fz.RLHF_BODIES)
HTTP_ROUTES = fz.GENERATE_ROUTES + RLHF_ROUTES
# Share of the inputs per kind (normalised); a kind whose input space runs out early
# (hypothesis stops when every distinct input was tried) leaves its rest to the others.
WEIGHTS: dict[str, float] = {
    "http_chat": 17,
    "http_completions": 10,
    "http_rewards": 10,
    **{f"http{route.replace('/', '_')}": 5 for route in RLHF_ROUTES},
    "http_raw": 8,
    "grpc_Generate": 7,
    "grpc_GenerateStream": 6,
    "grpc_Score": 6,
    "grpc_ListModels": 1,
    **{f"grpc_malformed_{m.name}": 1 for m in fz.SERVICE.methods},
    "schemathesis": 6,
}

UPSTREAM_MAIN = """
import sys, time
sys.path.insert(0, {repo!r})
from tests.fakes import FakeUpstream
from tests.security.conftest import TEXTS
server = FakeUpstream(TEXTS).start()
print(server.port, flush=True)
while True:  # the fake keeps every body it got, for tests; a long run must not
    time.sleep(2)
    for records in (server.requests, server.answered, server.hung_up, server.streams):
        records.clear()
"""


def _config_toml(model: Path, upstream_port: int, http_port: int, grpc_port: int, workers: int) -> str:
    # The short run's bounds (tests/security/test_fuzz.py `served`).
    return f"""
[server]
host = "127.0.0.1"
http_port = {http_port}
grpc_port = {grpc_port}
max_best_of = 8
request_timeout_s = 20
log_level = "WARNING"

[server.limits]
max_body_bytes = 65536
max_messages = 16
max_prompt_chars = 4000

[generator]
url = "http://127.0.0.1:{upstream_port}/v1"
model = "fake-generator"
timeout_s = 10

[[reward_models]]
name = "{fz.REWARD_MODEL}"
path = "{model}"
workers = {workers}
max_wait_ms = 1.0
"""


@dataclass
class Tally:
    per_kind: Counter[str] = field(default_factory=Counter)
    statuses: dict[str, Counter[str]] = field(default_factory=dict)  # kind -> status -> count
    server_errors: Counter[str] = field(default_factory=Counter)  # kind -> count
    connection_errors: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    checks: int = 0
    failed_checks: list[str] = field(default_factory=list)
    rss: list[tuple[int, float, float]] = field(default_factory=list)  # (inputs, gateway, workers)

    @property
    def total(self) -> int:
        return sum(self.per_kind.values())

    def status(self, kind: str, status: str) -> None:
        self.per_kind[kind] += 1
        self.statuses.setdefault(kind, Counter())[status] += 1

    def server_error(self, kind: str, what: str) -> None:
        self.server_errors[kind] += 1
        if len(self.examples) < 30:
            self.examples.append(f"{kind}: {what[:600]}")


class FuzzRun:
    """Sends the inputs of each kind and checks the gateway between them."""

    def __init__(
        self, args: argparse.Namespace, gateway: subprocess.Popen[bytes], http_url: str, grpc_target: str
    ):
        self.args = args
        self.gateway = gateway
        self.http_url = http_url
        self.tally = Tally()
        self.http = httpx.Client(base_url=http_url, timeout=args.request_timeout_s)
        self.channel = grpc.insecure_channel(grpc_target)
        self.calls = {m.name: fz.rpc_caller(self.channel, m) for m in fz.SERVICE.methods}
        self.started = time.perf_counter()

    def close(self) -> None:
        self.http.close()
        self.channel.close()

    # -- one input ------------------------------------------------------------------
    def post(self, kind: str, path: str, content: bytes, content_type: str) -> None:
        try:
            response = self.http.post(path, content=content, headers={"Content-Type": content_type})
        except httpx.TransportError as err:  # a dropped connection: a crash, or a bug in the transport
            self.tally.status(kind, "connection_error")
            self.tally.connection_errors[kind] += 1
            self.tally.server_error(kind, f"{path} {err!r} <- {content[:300]!r}")
            return self._after_input()
        status = str(response.status_code)
        if response.status_code >= 500:
            self.tally.server_error(kind, f"{path} {status} {response.text[:300]} <- {content[:300]!r}")
        elif response.headers.get("content-type", "").startswith("text/event-stream"):
            for error_type in _stream_errors(response.text):
                status = f"200 stream error {error_type}"
                if error_type in SERVER_SIDE_ERRORS:
                    self.tally.server_error(kind, f"{path} stream {error_type} <- {content[:300]!r}")
        self.tally.status(kind, status)
        self._after_input()

    def post_json(self, kind: str, path: str, body: Any) -> None:
        self.post(kind, path, json.dumps(body).encode(), "application/json")

    def rpc(self, kind: str, method: str, request: Any) -> None:
        code, details = self.calls[method](request, self.args.request_timeout_s)
        self.tally.status(kind, code.name)
        if code not in fz.ALLOWED_GRPC_CODES:
            self.tally.server_error(kind, f"{method} {code.name} {details} <- {str(request)[:300]}")
        self._after_input()

    # -- checks ---------------------------------------------------------------------
    def _after_input(self) -> None:
        if self.tally.total % self.args.check_every == 0:
            self.check()

    def check(self) -> bool:
        """Gateway and worker alive, /health 200, the worker up; RSS sampled; a progress line."""
        tally = self.tally
        tally.checks += 1
        problems: list[str] = []
        if self.gateway.poll() is not None:
            problems.append(f"gateway exited with {self.gateway.returncode}")
        else:
            try:
                health = self.http.get("/health", timeout=10)
                if health.status_code != 200:
                    problems.append(f"/health {health.status_code}")
                up = metric_sum(self.http.get("/metrics", timeout=10).text, "bon_workers_up")
                if up < self.args.workers:
                    problems.append(f"bon_workers_up {up:g}")
            except httpx.HTTPError as err:
                problems.append(f"/health: {err!r}")
        workers = worker_pids(self.gateway.pid)
        tally.rss.append((tally.total, rss_mib(self.gateway.pid), sum(rss_mib(p) for p in workers)))
        if problems:
            tally.failed_checks.append(f"at {tally.total}: " + "; ".join(problems))
        elapsed = time.perf_counter() - self.started
        verdict = "FAILED: " + "; ".join(problems) if problems else "OK"
        print(
            f"  {tally.total:>7}/{self.args.inputs} inputs  {tally.total / elapsed:6.1f}/s  "
            f"5xx={sum(tally.server_errors.values())} gateway_rss={tally.rss[-1][1]:.0f}MiB "
            f"workers_rss={tally.rss[-1][2]:.0f}MiB {verdict}",
            flush=True,
        )
        return not problems

    # -- the kinds ------------------------------------------------------------------
    def senders(
        self, schema_ops: list[Any]
    ) -> dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], None]]]:
        """kind -> (the generator of its inputs, what sends one)."""
        kinds: dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], None]]] = {
            "http_chat": (fz.chat_body, lambda b: self.post_json("http_chat", "/v1/chat/completions", b)),
            "http_completions": (
                fz.completion_body,
                lambda b: self.post_json("http_completions", "/v1/completions", b),
            ),
            "http_rewards": (fz.rewards_body, lambda b: self.post_json("http_rewards", "/v1/rewards", b)),
            "http_raw": (
                st.tuples(st.sampled_from(HTTP_ROUTES), fz.raw_body, st.sampled_from(fz.RAW_CONTENT_TYPES)),
                lambda t: self.post("http_raw", t[0], t[1], t[2]),
            ),
        }
        for route, strategy in fz.RLHF_BODIES.items():
            kind = f"http{route.replace('/', '_')}"
            kinds[kind] = (strategy, lambda b, k=kind, r=route: self.post_json(k, r, b))
        for method in fz.SERVICE.methods:
            name = method.name
            kinds[f"grpc_{name}"] = (
                fz.proto_messages(method.input_type),
                lambda m, n=name: self.rpc(f"grpc_{n}", n, m),
            )
            kinds[f"grpc_malformed_{name}"] = (
                fz.malformed_proto(method.input_type),
                lambda m, n=name: self.rpc(f"grpc_malformed_{n}", n, m),
            )
        cases = st.one_of([op.as_strategy() for op in schema_ops])
        kinds["schemathesis"] = (cases, self._send_case)
        return kinds

    def _send_case(self, case: Any) -> None:
        kwargs = fz.case_request(case, self.http_url)
        try:
            response = self.http.request(**kwargs)
        except httpx.TransportError as err:
            self.tally.status("schemathesis", "connection_error")
            self.tally.connection_errors["schemathesis"] += 1
            self.tally.server_error("schemathesis", f"{case.method} {case.path} {err!r}")
            return self._after_input()
        if response.status_code >= 500:
            self.tally.server_error(
                "schemathesis", f"{case.method} {case.path} {response.status_code} {response.text[:300]}"
            )
        self.tally.status("schemathesis", str(response.status_code))
        self._after_input()

    def run_kind(
        self, strategy: st.SearchStrategy[Any], send: Callable[[Any], None], quota: int, seed: int
    ) -> None:
        """`quota` inputs from `strategy` (fewer if hypothesis runs out of distinct ones); a
        failure is counted, never raised, so nothing stops to shrink."""

        @settings(
            max_examples=quota,
            database=None,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @hypothesis_seed(seed)
        @given(value=strategy)
        def run(value: Any) -> None:
            send(value)

        run()

    def run(self, schema_ops: list[Any]) -> None:
        kinds = self.senders(schema_ops)
        assert set(kinds) == set(WEIGHTS), set(kinds) ^ set(WEIGHTS)
        left_weight = sum(WEIGHTS.values())
        for index, (kind, weight) in enumerate(WEIGHTS.items()):
            left = self.args.inputs - self.tally.total
            quota = max(1, round(left * weight / left_weight))
            left_weight -= weight
            strategy, send = kinds[kind]
            self.run_kind(strategy, send, quota, self.args.seed * 1000 + index)
        # Inputs the exhausted kinds left: more chat bodies, the richest kind.
        while self.tally.total < self.args.inputs:
            strategy, send = kinds["http_chat"]
            self.run_kind(strategy, send, self.args.inputs - self.tally.total, self.args.seed * 1000 + 999)


def _stream_errors(text: str) -> list[str]:
    """The error types of the error events in an SSE body."""
    found: list[str] = []
    for line in text.splitlines():
        if not line.startswith("data: {"):
            continue
        with contextlib.suppress(ValueError):
            error = json.loads(line[6:]).get("error")
            if isinstance(error, dict):
                found.append(str(error.get("type") or error.get("code")))
    return found


def fuzz(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bon-fuzz-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    upstream = subprocess.Popen(
        [sys.executable, "-c", UPSTREAM_MAIN.format(repo=str(REPO))], stdout=subprocess.PIPE, env=env
    )
    assert upstream.stdout is not None
    upstream_port = int(upstream.stdout.readline())
    http_port, grpc_port = free_port(), free_port()
    config = work / "gateway.toml"
    config.write_text(_config_toml(tiny_reward_model(), upstream_port, http_port, grpc_port, args.workers))
    log_path = work / "gateway.log"
    http_url = f"http://127.0.0.1:{http_port}"
    with log_path.open("wb") as log:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "bon_gateway", "serve", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    run: FuzzRun | None = None
    try:
        wait_workers_up(gateway, http_url, args.workers)
        schema_ops = fz.schema_operations(httpx.get(http_url + "/openapi.json", timeout=10).json())
        run = FuzzRun(args, gateway, http_url, f"127.0.0.1:{grpc_port}")
        pids = worker_pids(gateway.pid)
        rss_before = (rss_mib(gateway.pid), sum(rss_mib(p) for p in pids))
        print(
            f"fuzz: {args.inputs} inputs, seed {args.seed}, gateway pid {gateway.pid} "
            f"rss {rss_before[0]:.0f} MiB, worker pids {pids} rss {rss_before[1]:.0f} MiB",
            flush=True,
        )
        run.started = time.perf_counter()
        run.run(schema_ops)
        elapsed = time.perf_counter() - run.started
        healthy_at_end = run.check()
        rss_after = run.tally.rss[-1][1:]
        pids_after = worker_pids(gateway.pid)
        restarts = metric_sum(run.http.get("/metrics").text, "bon_worker_restarts_total")
        gateway_alive = gateway.poll() is None
        exit_code = stop_gateway(gateway)
    finally:
        if run is not None:
            run.close()
        if gateway.poll() is None:
            gateway.kill()
        upstream.terminate()
        upstream.wait(10)
    tally = run.tally
    return {
        "inputs": tally.total,
        "seed": args.seed,
        "seconds": round(elapsed, 1),
        "inputs_per_s": round(tally.total / elapsed, 1),
        "per_kind": dict(tally.per_kind),
        "statuses": {k: dict(sorted(v.items())) for k, v in tally.statuses.items()},
        "server_errors": sum(tally.server_errors.values()),
        "server_errors_by_kind": dict(tally.server_errors),
        "connection_errors": sum(tally.connection_errors.values()),
        "examples": tally.examples,
        "checks": tally.checks,
        "failed_checks": tally.failed_checks,
        "gateway_alive_at_end": gateway_alive,
        "healthy_at_end": healthy_at_end,
        "worker_pids_start_end": [pids, pids_after],
        "worker_restarts": int(restarts),
        "gateway_exit_code_on_sigterm": exit_code,
        "tracebacks_in_gateway_log": log_path.read_text(errors="replace").count("Traceback"),
        "gateway_rss_mib_before_after": [round(rss_before[0], 1), round(rss_after[0], 1)],
        "workers_rss_mib_before_after": [round(rss_before[1], 1), round(rss_after[1], 1)],
        "rss_samples": [(n, round(g, 1), round(w, 1)) for n, g, w in tally.rss],
        "gateway_log": str(log_path),
    }


def crashes(figures: dict[str, Any]) -> int:
    """Gateway gone, a failed health check, or a worker that had to be restarted."""
    return (
        int(not figures["gateway_alive_at_end"])
        + len(figures["failed_checks"])
        + figures["worker_restarts"]
        + int(figures["worker_pids_start_end"][0] != figures["worker_pids_start_end"][1])
    )


def render(figures: dict[str, Any], args: argparse.Namespace) -> str:
    total: Counter[str] = Counter()
    for statuses in figures["statuses"].values():
        total.update(statuses)
    kind_rows = [
        f"| {kind} | {n} | {', '.join(f'{s}: {c}' for s, c in figures['statuses'][kind].items())} "
        f"| {figures['server_errors_by_kind'].get(kind, 0)} |"
        for kind, n in figures["per_kind"].items()
    ]
    g_before, g_after = figures["gateway_rss_mib_before_after"]
    w_before, w_after = figures["workers_rss_mib_before_after"]
    summary = [
        ("inputs", f"{figures['inputs']} in {figures['seconds']} s ({figures['inputs_per_s']} inputs/s)"),
        ("5xx (HTTP 5xx, server errors in streams, gRPC codes not allowed)", figures["server_errors"]),
        ("dropped connections", figures["connection_errors"]),
        ("crashes (gateway gone, failed checks, worker restarts)", crashes(figures)),
        (
            "health checks (alive, /health 200, worker up)",
            f"{figures['checks']}, failed {len(figures['failed_checks'])}",
        ),
        (
            "gateway alive and healthy at the end",
            f"{figures['gateway_alive_at_end']} / {figures['healthy_at_end']}",
        ),
        ("gateway exit code on SIGTERM", figures["gateway_exit_code_on_sigterm"]),
        ("tracebacks in the gateway log", figures["tracebacks_in_gateway_log"]),
        ("gateway RSS before / after", f"{g_before} / {g_after} MiB"),
        ("worker RSS before / after", f"{w_before} / {w_after} MiB"),
    ]
    lines = [
        "# Fuzzing at scale",
        "",
        f"`python bench/fuzz_at_scale.py --inputs {args.inputs} --seed {args.seed} "
        f"--workers {args.workers}`: "
        "a `bon-gateway serve` process with one reward worker (tiny Llama RM) and a fake upstream, "
        "the generators of tests/security/fuzz_inputs.py.",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in summary),
        "",
        "| kind | inputs | statuses | 5xx |",
        "|---|---|---|---|",
        *kind_rows,
        f"| all | {figures['inputs']} | {', '.join(f'{s}: {c}' for s, c in sorted(total.items()))} "
        f"| {figures['server_errors']} |",
        "",
        "Gateway / worker RSS (MiB) at each check: "
        + ", ".join(f"{n}: {g}/{w}" for n, g, w in figures["rss_samples"]),
        "",
    ]
    if figures["examples"] or figures["failed_checks"]:
        lines += ["Failures:", "", *(f"- {e}" for e in figures["failed_checks"] + figures["examples"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--inputs", type=int, default=100_000, help="inputs in total, over every kind")
    parser.add_argument("--seed", type=int, default=1, help="hypothesis seed (same seed, same inputs)")
    parser.add_argument("--workers", type=int, default=1, help="reward-worker processes")
    parser.add_argument("--check-every", type=int, default=2000, help="inputs between health checks")
    parser.add_argument("--request-timeout-s", type=float, default=30.0, help="client timeout per input")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "fuzz_at_scale.md")
    args = parser.parse_args()
    # schemathesis hands cookies per request, which httpx deprecates: noise, not a finding.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    figures = fuzz(args)
    text = render(figures, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"written to {args.out}; gateway log: {figures['gateway_log']}")
    sys.exit(0 if figures["server_errors"] == 0 and crashes(figures) == 0 else 1)


if __name__ == "__main__":
    main()
