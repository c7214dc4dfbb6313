"""Input limits (body, messages, prompt characters, max_tokens, best_of,
candidates) and load bounds (in-flight requests, scoring queue): refused at
once with a status that names the limit, never queued."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import httpx
import pytest

from bon_gateway.config import GatewayConfig
from bon_gateway.errors import Overloaded
from bon_gateway.metrics import Metrics
from bon_gateway.scoring.pool import WorkerPool
from bon_gateway.types import Deadline, Message
from bon_gateway.v1 import best_of_n_pb2 as pb
from bon_gateway.v1 import best_of_n_pb2_grpc as pb_grpc
from tests.fakes import FakeScorer, FakeUpstream, ServedGateway, gateway_config
from tests.security.conftest import REWARDS, TEXTS

LIMITS = {
    "max_body_bytes": 4096,
    "max_messages": 3,
    "max_prompt_chars": 200,
    "max_tokens": 64,
    "max_candidates": 4,
}
USER = {"role": "user", "content": "Capital of France?"}


@pytest.fixture(scope="module")
def limited(upstream: FakeUpstream) -> Iterator[ServedGateway]:
    config = gateway_config(upstream.url, max_best_of=8, limits=LIMITS)
    with ServedGateway(config, FakeScorer(REWARDS)) as served:
        yield served


def _error(response: httpx.Response) -> dict[str, str]:
    error: dict[str, str] = response.json()["error"]
    return error


@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "body", "param", "limit"),
    [
        ("/v1/chat/completions", {"messages": [USER] * 4}, "messages", "max_messages"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x" * 300}]},
            "messages",
            "max_prompt_chars",
        ),
        ("/v1/completions", {"prompt": "y" * 300}, "prompt", "max_prompt_chars"),
        ("/v1/chat/completions", {"messages": [USER], "max_tokens": 65}, "max_tokens", "max_tokens"),
        (
            "/v1/chat/completions",
            {"messages": [USER], "max_completion_tokens": 1000},
            "max_tokens",
            "max_tokens",
        ),
        ("/v1/completions", {"prompt": "hi", "best_of": 9}, "best_of", "between 1 and 8"),
        ("/v1/rewards", {"messages": [USER], "candidates": ["a"] * 5}, "candidates", "max_candidates"),
    ],
)
def test_requests_over_a_limit_are_400_naming_it(
    limited: ServedGateway, path: str, body: dict[str, object], param: str, limit: str
) -> None:
    response = httpx.post(limited.http_url + path, json=body, timeout=10)
    assert response.status_code == 400, response.text
    error = _error(response)
    assert error["param"] == param
    assert limit in error["message"]


@pytest.mark.integration
def test_bodies_over_max_body_bytes_are_413_declared_or_chunked(limited: ServedGateway) -> None:
    big = {"messages": [{"role": "user", "content": "z" * 5000}]}
    with httpx.Client(base_url=limited.http_url, timeout=10) as client:
        declared = client.post("/v1/chat/completions", json=big)
        assert declared.status_code == 413
        assert "server.limits.max_body_bytes" in _error(declared)["message"]
        assert _error(declared)["code"] == "request_too_large"

        def chunks() -> Iterator[bytes]:  # no Content-Length: the bound is counted as it arrives
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(100):
                yield b"z" * 100
            yield b'"}]}'

        chunked = client.post(
            "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}
        )
        assert chunked.status_code == 413
        # Under the bound, the same route works.
        small = client.post("/v1/chat/completions", json={"messages": [USER], "best_of": 4, "seed": 0})
        assert small.status_code == 200, small.text


@pytest.mark.integration
def test_grpc_applies_the_same_limits(limited: ServedGateway) -> None:
    with grpc.insecure_channel(limited.grpc_target) as channel:
        stub = pb_grpc.BestOfNStub(channel)
        cases = [
            pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="q")] * 4),
            pb.GenerateRequest(prompt="p" * 300),
            pb.GenerateRequest(prompt="p", sampling=pb.SamplingParams(max_tokens=65)),
        ]
        for request in cases:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "server.limits." in (refused.value.details() or "")
        with pytest.raises(grpc.RpcError) as too_many:
            stub.Score(
                pb.ScoreRequest(messages=[pb.ChatMessage(role="user", content="q")], candidates=["a"] * 5),
                timeout=10,
            )
        assert too_many.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A message over max_body_bytes is refused by gRPC itself before decoding.
        with pytest.raises(grpc.RpcError) as huge:
            stub.Generate(pb.GenerateRequest(prompt="p" * 10_000), timeout=10)
        assert huge.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.integration
async def test_requests_over_max_in_flight_are_shed_at_once_on_both_fronts() -> None:
    with FakeUpstream(TEXTS, delay_s=5.0) as slow:
        config = gateway_config(slow.url, limits={"max_in_flight": 2, "retry_after_s": 3})
        with ServedGateway(config, FakeScorer(REWARDS)) as served:
            body = {"messages": [USER], "best_of": 2, "seed": 0}
            async with httpx.AsyncClient(base_url=served.http_url, timeout=30) as client:

                async def post() -> httpx.Response:
                    return await client.post("/v1/chat/completions", json=body)

                holders = [asyncio.create_task(post()) for _ in range(2)]
                # Both hold their slot once their 2 x 2 upstream calls are waiting.
                while len(slow.requests) < 4:  # noqa: ASYNC110 - the upstream runs in another thread
                    await asyncio.sleep(0.01)
                extra = await asyncio.gather(*(post() for _ in range(6)))
                # Monitoring is never shed.
                assert (await client.get("/health")).status_code == 200
                assert (await client.get("/metrics")).status_code == 200
                with grpc.insecure_channel(served.grpc_target) as channel:
                    with pytest.raises(grpc.RpcError) as shed_rpc:
                        pb_grpc.BestOfNStub(channel).Generate(pb.GenerateRequest(prompt="p"), timeout=10)
                # Shed at once, not queued for a slot: every refusal came back while the
                # holders' upstream calls were still waiting (none answered yet).
                assert slow.answered == []
                held = await asyncio.gather(*holders)
            for response in extra:
                assert response.status_code == 429
                assert response.headers["retry-after"] == "3"
                assert "server.limits.max_in_flight" in _error(response)["message"]
            assert shed_rpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(shed_rpc.value.trailing_metadata() or ())["retry-after"] == "3"
            assert [response.status_code for response in held] == [200, 200]
            # Slots are given back: the next request is served.
            async with httpx.AsyncClient(base_url=served.http_url, timeout=30) as client:
                after = await client.post("/v1/chat/completions", json=body)
            assert after.status_code == 200
            text = served.metrics.render().decode()
            assert 'bon_requests_total{api="chat_completions",status="429"} 6.0' in text
            assert 'bon_requests_total{api="grpc_generate",status="RESOURCE_EXHAUSTED"} 1.0' in text


async def test_scoring_queue_is_bounded_per_model() -> None:
    config = GatewayConfig.model_validate(
        {
            "server": {"limits": {"max_queued_groups": 1, "retry_after_s": 2}},
            "reward_models": [{"name": "rm", "path": "/nonexistent"}],
        }
    )
    metrics = Metrics()
    pool = WorkerPool(config, metrics, start_timeout_s=30)
    # No worker is up: the first group waits for one; the second finds the queue full.
    pool._workers["rm"] = []
    waiting = asyncio.create_task(
        pool.score("rm", [Message("user", "q")], ["a"], deadline=Deadline.after(60))
    )
    while 'bon_score_queue_depth{model="rm"} 1.0' not in metrics.render().decode():  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    with pytest.raises(Overloaded) as shed:
        await pool.score("rm", [Message("user", "q")], ["b"], deadline=Deadline.after(60))
    # Refused at once, not queued behind the first (which waits up to its 60 s deadline).
    assert not waiting.done()
    assert shed.value.retry_after_s == 2
    assert "max_queued_groups" in shed.value.message
    assert 'bon_score_queue_depth{model="rm"} 1.0' in metrics.render().decode()
    assert 'bon_score_queue_capacity{model="rm"} 1.0' in metrics.render().decode()
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)
    assert 'bon_score_queue_depth{model="rm"} 0.0' in metrics.render().decode()
