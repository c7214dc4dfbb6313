"""A client's own mistake is the client's 4xx and never counts against an upstream's health;
an upstream that sheds load (429) makes the client's answer a 429 with Retry-After."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bon_gateway.config import GatewayConfig
from tests.fakes import FakeScorer, ServedGateway
from tests.fakes.fault_upstream import FaultUpstream, Reply

pytestmark = pytest.mark.integration

TEXTS = ("alpha", "beta", "gamma", "delta")
QUESTION = [{"role": "user", "content": "Say a word."}]
# What llama-cpp-python's server answered for `top_k: -5` (measured on the real server,
# path shortened): a 500 carrying pydantic's validation error and a server file path.
LLAMA_CPP_VALIDATION = (
    "1 validation error:\n  {'type': 'greater_than_equal', 'loc': ('body', 'top_k'), "
    "'msg': 'Input should be greater than or equal to 0', 'input': -5}\n\n"
    '  File "/opt/venv/lib/python3.11/site-packages/llama_cpp/server/app.py", line 376, in create\n'
)


def config(url: str) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            # A short deadline: a Retry-After longer than it is not waited for.
            "server": {
                "host": "127.0.0.1",
                "http_port": 0,
                "grpc_port": 0,
                "log_level": "WARNING",
                "request_timeout_s": 5,
            },
            "generator": {
                "url": url,
                "model": "served-model",
                "retries": 2,
                "backoff_base_s": 0.01,
                # One failure would eject: any client mistake counted against it shows at once.
                "eject_after_failures": 1,
                "eject_cooldown_s": 60,
            },
        }
    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultUpstream]:
    with FaultUpstream(TEXTS) as server:
        yield server


@pytest.fixture
def gateway(upstream: FaultUpstream) -> Iterator[ServedGateway]:
    upstream.reset()
    with ServedGateway(config(upstream.url), FakeScorer()) as served:
        yield served
    upstream.reset()


def post(gateway: ServedGateway, **body: Any) -> httpx.Response:
    payload = {"messages": QUESTION, "best_of": 2, **body}
    return httpx.post(f"{gateway.http_url}/v1/chat/completions", json=payload, timeout=30)


def ready(gateway: ServedGateway) -> bool:
    return httpx.get(f"{gateway.http_url}/ready", timeout=5).status_code == 200


def test_a_model_the_upstream_does_not_serve_is_the_clients_400(
    gateway: ServedGateway, upstream: FaultUpstream
) -> None:
    # vLLM answers 404 for an unknown model.
    missing = {"error": {"message": "The model `nope` does not exist.", "code": 404}}
    upstream.rule = lambda body: Reply(404, missing) if body["model"] == "nope" else None
    reply = post(gateway, model="nope")
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["param"] == "model" and "does not exist" in error["message"]
    # One per candidate: a 404 is not retried. The answer can come back before the fake has
    # recorded the other candidate's call (seen once on a loaded machine): wait for it.
    assert upstream.wait_until(lambda: len(upstream.calls) == 2), upstream.calls
    assert ready(gateway)  # and the upstream is not ejected for the client's mistake
    assert post(gateway).status_code == 200


def test_llama_cpp_validation_500s_are_400s_with_a_clean_message(
    gateway: ServedGateway, upstream: FaultUpstream
) -> None:
    upstream.rule = lambda body: Reply(500, {"error": {"message": LLAMA_CPP_VALIDATION}})
    reply = post(gateway, top_k=-5)
    assert reply.status_code == 400
    message = reply.json()["error"]["message"]
    assert "top_k" in message and "validation error" in message
    assert "File" not in message and "/site-packages/" not in message and "\n" not in message
    assert len(upstream.calls) == 2  # not retried: the same body fails the same way
    assert ready(gateway)


def test_one_requests_5xx_and_retries_count_once_towards_ejection(upstream: FaultUpstream) -> None:
    # With eject_after_failures = 2, one request's 2 candidates x 3 attempts of 500s
    # are ONE failing request; a second request failing ejects.
    upstream.reset()
    upstream.rule = lambda body: Reply(500, {"error": {"message": "boom"}})
    base = config(upstream.url)
    generator = base.generator.model_copy(update={"eject_after_failures": 2})
    with ServedGateway(base.model_copy(update={"generator": generator}), FakeScorer()) as two:
        assert post(two).status_code == 503
        assert len(upstream.calls) == 6
        assert ready(two)
        assert post(two).status_code == 503  # a second request failing: now it is the upstream's
        assert not ready(two)


def test_an_upstream_429_is_the_clients_429_with_retry_after(
    gateway: ServedGateway, upstream: FaultUpstream
) -> None:
    upstream.rule = lambda body: Reply(
        429, {"error": {"message": "slow down"}}, headers=(("Retry-After", "7"),)
    )
    started = len(upstream.calls)
    reply = post(gateway)
    assert reply.status_code == 429
    assert reply.headers["retry-after"] == "7"
    assert "rate_limited" in json.dumps(reply.json())
    assert ready(gateway)  # load is not sickness
    assert len(upstream.calls) > started
