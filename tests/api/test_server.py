"""serve_gateway as a process: one line per phase, SIGTERM drains in-flight
requests and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import BEST, QUESTION, REWARDS, TEXTS
from tests.fakes import FakeUpstream

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
    config = gateway_config(sys.argv[1], log_level="INFO")
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
