"""/ready and gRPC health follow the upstreams too: NOT_SERVING while every upstream is ejected."""

from __future__ import annotations

import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.api.conftest import QUESTION, REWARDS, TEXTS
from tests.fakes import FakeScorer, FakeUpstream, ServedGateway, gateway_config

pytestmark = pytest.mark.integration


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


def test_ready_turns_off_while_the_only_upstream_is_ejected_and_back_after_cooldown() -> None:
    with FakeUpstream(TEXTS) as upstream:
        base = gateway_config(upstream.url)
        generator = base.generator.model_copy(
            update={"retries": 0, "eject_after_failures": 2, "eject_cooldown_s": 1.5}
        )
        config = base.model_copy(update={"generator": generator})
        with ServedGateway(config, FakeScorer(REWARDS)) as gateway:
            assert httpx.get(f"{gateway.http_url}/ready", timeout=5).status_code == 200
            upstream.fail_status = 500
            body = {"messages": QUESTION, "best_of": 2}
            reply = httpx.post(f"{gateway.http_url}/v1/chat/completions", json=body, timeout=10)
            assert reply.status_code == 503
            # One request's failures count once: the upstream is not ejected for them alone.
            assert httpx.get(f"{gateway.http_url}/ready", timeout=5).status_code == 200
            reply = httpx.post(f"{gateway.http_url}/v1/chat/completions", json=body, timeout=10)
            assert reply.status_code == 503
            # Two failed requests ejected the only upstream: not ready, on both fronts.
            assert httpx.get(f"{gateway.http_url}/ready", timeout=5).status_code == 503
            deadline = time.monotonic() + 5
            while _health(gateway.grpc_target) != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "gRPC health never turned NOT_SERVING"
                time.sleep(0.05)
            # The cooldown ends: the upstream is tried again and readiness comes back.
            upstream.fail_status = None
            deadline = time.monotonic() + 5
            while httpx.get(f"{gateway.http_url}/ready", timeout=5).status_code != 200:
                assert time.monotonic() < deadline, "/ready never came back after the cooldown"
                time.sleep(0.05)
            # gRPC health too, with no request in between: the cooldown's end wakes it
            # (health is not polled; nothing else happens that could).
            while _health(gateway.grpc_target) != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "gRPC health never came back after the cooldown"
                time.sleep(0.05)
            reply = httpx.post(f"{gateway.http_url}/v1/chat/completions", json=body, timeout=10)
            assert reply.status_code == 200
