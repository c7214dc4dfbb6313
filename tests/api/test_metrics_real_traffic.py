"""One scrape after real traffic (real reward workers, a failing upstream call, a
killed worker) shows every metric of the gateway, moving, and passes promtool."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bon_gateway.config import GatewayConfig
from bon_gateway.engine.engine import RewardScorer
from bon_gateway.metrics import Metrics
from tests.api.conftest import QUESTION
from tests.api.test_http_openai import _promtool
from tests.fakes import FakeUpstream, ServedGateway, gateway_config

pytestmark = pytest.mark.integration

# Gauges that are legitimately 0 between requests: present is enough.
# Longer than the rejection checkpoint below, so a rejected candidate avoids tokens.
TEXTS = tuple(f"Answer {i}: " + "one two three four five six seven eight." for i in range(4))
AT_REST_ZERO = {"bon_requests_in_flight", "bon_score_queue_depth", "bon_score_padding_ratio"}
# Series per vLLM / SGLang server: none on a gateway whose models score on its own workers
# (tests/scoring/test_sglang_backend.py scrapes them with backend servers).
BACKEND_SERVERS_ONLY = {
    "bon_backend_server_up",
    "bon_backend_server_in_flight",
    "bon_backend_server_request_duration_seconds",
    "bon_backend_server_errors",
}


def _pool(config: GatewayConfig, metrics: Metrics) -> RewardScorer:
    from bon_gateway.scoring.pool import WorkerPool

    return WorkerPool(config, metrics)


def _families(text: str) -> dict[str, float]:
    """Family name -> the largest sample value (histograms: their _count)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.type == "histogram" and not sample.name.endswith("_count"):
                continue
            values[family.name] = max(values.get(family.name, 0.0), sample.value)
    return values


@pytest.mark.slow
def test_every_metric_present_and_moving_after_real_traffic(tiny_llama_rm: Path) -> None:
    promtool = _promtool()
    # An Info family is exposed as a gauge named NAME_info.
    expected = {f.name + "_info" if f.type == "info" else f.name for f in Metrics().registry.collect()}
    expected -= BACKEND_SERVERS_ONLY
    with FakeUpstream(TEXTS) as upstream:
        config = gateway_config(upstream.url, reward_models=[{"name": "tiny", "path": str(tiny_llama_rm)}])
        generator = config.generator.model_copy(update={"retries": 0})
        config = config.model_copy(update={"generator": generator})
        with ServedGateway(config, scorer_factory=_pool) as gateway:
            url = f"{gateway.http_url}/v1/chat/completions"
            ok = {"messages": QUESTION, "best_of": 4, "seed": 0}
            assert httpx.post(url, json=ok, timeout=120).status_code == 200
            # Speculative rejection cancels half the candidates at their second token
            # (tokens 20 ms apart: the candidates are still running at the checkpoint).
            rejection = {**ok, "strategy": "speculative_rejection", "checkpoints": [2]}
            upstream.token_delay_s = 0.02
            rejected = httpx.post(url, json={**rejection, "return_candidates": True}, timeout=120)
            upstream.token_delay_s = 0.0
            assert rejected.status_code == 200, rejected.text
            reasons = [c["finish_reason"] for c in rejected.json()["candidates"]]
            assert reasons.count("rejected") == 2, reasons
            # One candidate's upstream call fails: an upstream error and a dropped candidate.
            upstream.fail_seeds = {3}
            dropped = httpx.post(url, json={**ok, "min_candidates": 2}, timeout=120)
            assert dropped.status_code == 200 and dropped.json()["candidates_dropped"] == 1
            upstream.fail_seeds = set()
            # A killed worker is restarted: the restart counter moves.
            pool = gateway.engine.scorer
            [pid] = pool.worker_pids()  # type: ignore[attr-defined]
            os.kill(pid, signal.SIGKILL)
            restarts = gateway.metrics.worker_restarts.labels("tiny")
            deadline = time.monotonic() + 60
            while restarts._value.get() < 1 or not pool.ready():  # type: ignore[attr-defined]
                assert time.monotonic() < deadline, "the worker was not restarted"
                time.sleep(0.05)
            after_kill = httpx.post(url, json=ok, timeout=120)
            assert after_kill.status_code == 200, after_kill.text
            # A head over max_header_bytes: the HTTP front closes its connection (431).
            with socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10) as raw:
                raw.sendall(b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * (65 << 10) + b"\r\n\r\n")
                assert raw.recv(100).startswith(b"HTTP/1.1 431 ")
            deadline = time.monotonic() + 5
            while True:  # requests are counted once their response is sent
                scrape = httpx.get(f"{gateway.http_url}/metrics", timeout=10).text
                values = _families(scrape)
                if values.get("bon_requests", 0) >= 4 or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
    missing = sorted(expected - set(values))
    assert not missing, f"absent from the scrape: {missing}"
    still = sorted(n for n in expected - AT_REST_ZERO if values[n] <= 0)
    assert not still, f"never moved: {still}"
    check = subprocess.run(
        [promtool, "check", "metrics"], input=scrape.encode(), capture_output=True, timeout=60
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
