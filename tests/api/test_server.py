"""serve_gateway and `bon-gateway serve` as processes: one line per phase, SIGTERM
drains in-flight requests (one, then 16 under load), refuses new connections and
exits 0."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import BEST, QUESTION, REWARDS, TEXTS
from tests.fakes import FakeUpstream, unused_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import asyncio, logging, sys
from bon_gateway.api.server import serve_gateway
from bon_gateway.engine.engine import Engine
from bon_gateway.generation.upstream import UpstreamClient
from bon_gateway.metrics import Metrics
from tests.fakes import FakeScorer, gateway_config

logging.basicConfig(level="INFO", stream=sys.stderr, format="%(name)s %(message)s")

async def main():
    grace = {"shutdown_grace_s": float(sys.argv[2])} if len(sys.argv) > 2 else {}
    config = gateway_config(sys.argv[1], log_level="INFO", **grace)
    metrics = Metrics()
    engine = Engine(config, UpstreamClient(config.generator, metrics), FakeScorer(REWARDS), metrics)
    def started(http_port, grpc_port):
        print(f"PORTS {http_port} {grpc_port}", flush=True)
    await serve_gateway(config, engine, metrics, on_started=started)
    await engine.aclose()
    print("CLEAN EXIT", flush=True)

asyncio.run(main())
"""


@pytest.fixture
def slow_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(TEXTS, delay_s=1.0) as server:
        yield server


def test_sigterm_finishes_in_flight_requests_and_exits_zero(slow_upstream: FakeUpstream) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = f"REWARDS = {REWARDS!r}\n{SCRIPT}"
    process = subprocess.Popen(
        [sys.executable, "-c", script, slow_upstream.url],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("PORTS "), line + (process.stderr.read() if process.poll() is not None else "")
        http_port = int(line.split()[1])
        base = f"http://127.0.0.1:{http_port}"
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200

        replies: list[httpx.Response] = []
        body = {"messages": QUESTION, "best_of": 4}
        request = threading.Thread(
            target=lambda: replies.append(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30))
        )
        request.start()
        # Wait until the request is in the upstream's hands, then ask the gateway to stop.
        deadline = time.monotonic() + 10
        while len(slow_upstream.requests) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        request.join(30)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert replies and replies[0].status_code == 200, stderr
    assert replies[0].json()["choices"][0]["message"]["content"] == BEST
    assert process.returncode == 0, stderr
    assert "CLEAN EXIT" in stdout
    for phase in ("phase=grpc_listening", "phase=http_listening", "phase=shutdown", "phase=stopped"):
        assert phase in stderr, phase


def test_sigterm_grace_bounds_the_drain() -> None:
    """A request still running when server.shutdown_grace_s runs out does not hold the exit."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = f"REWARDS = {REWARDS!r}\n{SCRIPT}"
    with FakeUpstream(TEXTS, delay_s=60.0) as hung:
        process = subprocess.Popen(
            [sys.executable, "-c", script, hung.url, "1"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line.startswith("PORTS "), line
            base = f"http://127.0.0.1:{int(line.split()[1])}"

            def post() -> None:
                with contextlib.suppress(httpx.HTTPError):  # cut at the end of the grace
                    httpx.post(f"{base}/v1/chat/completions", json={"messages": QUESTION}, timeout=90)

            request = threading.Thread(target=post, daemon=True)
            request.start()
            deadline = time.monotonic() + 10
            while len(hung.requests) < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
            drained_s = time.monotonic() - signalled
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 0, stderr
    assert "phase=shutdown grace_s=1" in stderr
    # 1 s of grace, then the in-flight request is cut; far from the upstream's 60 s.
    assert drained_s < 10, drained_s


@pytest.mark.slow
def test_serve_sigterm_under_load_answers_every_request(
    tiny_llama_rm: Path, reference_outcome_reward: Any, tmp_path: Path
) -> None:
    """`bon-gateway serve` (real tiny reward worker) with 16 requests in flight on a slow
    upstream: SIGTERM refuses new connections, answers all 16 with the right best
    candidate and exits 0."""
    expected = {t: reference_outcome_reward(tiny_llama_rm, QUESTION, t) for t in TEXTS}
    best = max(TEXTS, key=lambda t: expected[t])
    log = tmp_path / "gateway.log"
    http_port = unused_port()
    with FakeUpstream(TEXTS, delay_s=2.0) as upstream, log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bon_gateway",
                "serve",
                "--generator-url",
                upstream.url,
                "--generator-model",
                "fake-generator",
                "--reward-model",
                f"tiny={tiny_llama_rm}",
                "--device",
                "cpu",
                "--workers",
                "1",
                "--host",
                "127.0.0.1",
                "--http-port",
                str(http_port),
                "--grpc-port",
                str(unused_port()),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{http_port}"
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and process.poll() is None:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{base}/ready", timeout=2).status_code == 200:
                        break
                time.sleep(0.1)
            else:
                pytest.fail("gateway not ready:\n" + log.read_text(errors="replace")[-4000:])

            replies: list[httpx.Response | BaseException] = []

            def ask() -> None:
                try:
                    replies.append(
                        httpx.post(
                            f"{base}/v1/chat/completions",
                            json={"messages": QUESTION, "best_of": 4},
                            timeout=60,
                        )
                    )
                except BaseException as err:  # recorded: a dropped request must fail the test
                    replies.append(err)

            threads = [threading.Thread(target=ask) for _ in range(16)]
            for thread in threads:
                thread.start()
            # All 16 requests x 4 candidates are in the upstream's hands (2 s each).
            deadline = time.monotonic() + 10
            while len(upstream.requests) < 64 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(upstream.requests) == 64
            process.send_signal(signal.SIGTERM)
            # While draining: the listener is closed, new connections are refused.
            deadline = time.monotonic() + 5
            while b"phase=shutdown" not in log.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.01)
            refused = False
            deadline = time.monotonic() + 1.0
            while not refused and time.monotonic() < deadline:
                try:
                    httpx.get(f"{base}/health", timeout=1)
                    time.sleep(0.02)
                except httpx.ConnectError:
                    refused = True
            assert refused, "a new connection was accepted after SIGTERM"
            assert len(replies) < 16, "the requests finished before the drain was observed"
            for thread in threads:
                thread.join(60)
            code = process.wait(60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    text = log.read_text(errors="replace")
    assert len(replies) == 16
    for reply in replies:
        assert isinstance(reply, httpx.Response), f"{reply!r}\n{text[-3000:]}"
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == best
    assert code == 0, text[-3000:]
    for phase in ("phase=shutdown", "phase=stopped", "phase=closed"):
        assert phase in text, phase
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/health", timeout=2)
