"""The served gateway (HTTP and gRPC fronts) over a fault-injecting upstream:
what clients see, and what the upstream sees when clients give up."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import openai
import pytest

from bon_gateway.config import GatewayConfig
from bon_gateway.v1 import best_of_n_pb2 as pb
from bon_gateway.v1 import best_of_n_pb2_grpc as pb_grpc
from tests.fakes import FakeScorer, ServedGateway
from tests.fakes.fault_upstream import FaultUpstream, Hang, Reply

pytestmark = pytest.mark.integration

TEXTS = ("alpha", "beta", "gamma", "delta")
REWARDS = {"alpha": 1.0, "beta": 4.0, "gamma": 2.0, "delta": 3.0}
QUESTION = [{"role": "user", "content": "Say a word."}]
CONTEXT_ERROR = "Requested tokens (5000) exceed context window of 2048"


def config(*urls: str, **generator: Any) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "server": {
                "host": "127.0.0.1",
                "http_port": 0,
                "grpc_port": 0,
                "log_level": "WARNING",
                "request_timeout_s": 1.0,
            },
            "generator": {
                "urls": list(urls),
                "model": "fault",
                "timeout_s": 10,
                "backoff_base_s": 0.01,
                "retries": 1,
                **generator,
            },
        }
    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[FaultUpstream]:
    with FaultUpstream(TEXTS) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: FaultUpstream) -> Iterator[ServedGateway]:
    with ServedGateway(config(upstream.url, mode="auto"), FakeScorer(REWARDS)) as served:
        yield served


@pytest.fixture(autouse=True)
def clean(upstream: FaultUpstream) -> Iterator[None]:
    upstream.reset()
    yield
    upstream.reset()


@pytest.fixture
def client(gateway: ServedGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=30)


@pytest.fixture
def stub(gateway: ServedGateway) -> Iterator[pb_grpc.BestOfNStub]:
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        yield pb_grpc.BestOfNStub(channel)


def _all_closed(upstream: FaultUpstream, count: int) -> bool:
    return upstream.wait_until(
        lambda: len(upstream.calls) >= count and all(c.closed_by_client is not None for c in upstream.calls)
    )


def test_chat_and_completions_rank_the_candidates(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="fault",
        messages=QUESTION,
        seed=0,  # type: ignore[arg-type]
        extra_body={"best_of": 4},
    )
    assert chat.choices[0].message.content == "beta"
    assert chat.usage is not None and chat.usage.model_extra["candidates_generated"] == 4  # type: ignore[index]
    assert chat.usage.completion_tokens == 4
    text = client.completions.create(model="fault", prompt="A word:", seed=0, extra_body={"best_of": 4})
    assert text.choices[0].text == "beta"


def test_dropped_candidates_are_reported(client: openai.OpenAI, upstream: FaultUpstream) -> None:
    upstream.rule = lambda body: Reply(500, {"error": {"message": "oom"}}) if body["seed"] == 1 else None
    reply = client.chat.completions.create(
        model="fault",
        messages=QUESTION,
        seed=0,  # type: ignore[arg-type]
        extra_body={"best_of": 4, "min_candidates": 2},
    )
    extra = reply.model_extra or {}
    assert extra["candidates_dropped"] == 1
    assert extra["drop_reasons"] == ["upstream_error: HTTP 500: oom"]
    assert reply.choices[0].message.content == "delta"  # the best ("beta") never arrived


def test_below_min_candidates_is_a_503(client: openai.OpenAI, upstream: FaultUpstream) -> None:
    upstream.rule = lambda body: Reply(503) if body["seed"] != 0 else None
    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(
            model="fault",
            messages=QUESTION,
            seed=0,  # type: ignore[arg-type]
            extra_body={"best_of": 4, "min_candidates": 2},
        )
    assert caught.value.status_code == 503
    assert "only 1 of 4" in caught.value.message


def test_context_length_error_is_a_400_with_the_upstream_message(
    client: openai.OpenAI, upstream: FaultUpstream
) -> None:
    upstream.rule = lambda body: Reply(
        400, {"error": {"message": CONTEXT_ERROR, "type": "invalid_request_error"}}
    )
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="fault",
            messages=QUESTION,  # type: ignore[arg-type]
            extra_body={"best_of": 4},
        )
    assert CONTEXT_ERROR in caught.value.message


def test_grpc_context_length_error_is_invalid_argument(
    stub: pb_grpc.BestOfNStub, upstream: FaultUpstream
) -> None:
    upstream.rule = lambda body: Reply(400, {"error": {"message": CONTEXT_ERROR}})
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(
            pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")], best_of=2), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert CONTEXT_ERROR in (caught.value.details() or "")


def test_http_deadline_cancels_the_upstream_calls(gateway: ServedGateway, upstream: FaultUpstream) -> None:
    upstream.rule = lambda body: Hang()
    started = time.monotonic()
    response = httpx.post(
        f"{gateway.base_url}/chat/completions", json={"messages": QUESTION, "best_of": 3}, timeout=10
    )
    assert response.status_code == 504
    # A time bound: the 504 comes at the 1 s request deadline, while the upstream hangs
    # forever (generous for a loaded machine; the client gives up after 10 s).
    assert time.monotonic() - started < 6.0
    assert _all_closed(upstream, 1), [c.closed_by_client for c in upstream.calls]


def test_http_hang_up_cancels_the_upstream_calls(gateway: ServedGateway, upstream: FaultUpstream) -> None:
    upstream.rule = lambda body: Hang()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{gateway.base_url}/chat/completions", json={"messages": QUESTION, "best_of": 3}, timeout=0.3
        )
    assert _all_closed(upstream, 1)
    # Closed because the client left, well before the 1 s request deadline.
    assert max(c.closed_by_client or 0 for c in upstream.calls) - upstream.calls[0].arrived < 0.9


def test_grpc_deadline_cancels_the_upstream_calls(stub: pb_grpc.BestOfNStub, upstream: FaultUpstream) -> None:
    upstream.rule = lambda body: Hang()
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(
            pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="x")], best_of=3), timeout=0.3
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _all_closed(upstream, 1)
    assert max(c.closed_by_client or 0 for c in upstream.calls) - upstream.calls[0].arrived < 0.9


def test_streaming_hang_up_cancels_the_upstream_calls(
    gateway: ServedGateway, upstream: FaultUpstream
) -> None:
    upstream.rule = lambda body: Hang()
    body = {"messages": QUESTION, "best_of": 3, "stream": True}
    with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body, timeout=10) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: a dropped iterator closes the response
        first = next(lines)
        assert first.startswith(":")  # sent at once, before any candidate exists
        # One n=3 probe or three parallel calls, depending on what auto mode knows by now.
        assert upstream.wait_until(lambda: len(upstream.calls) >= 1)
    assert _all_closed(upstream, 1)


def test_streaming_error_reaches_the_sdk(client: openai.OpenAI, upstream: FaultUpstream) -> None:
    upstream.rule = lambda body: Reply(500)
    stream = client.chat.completions.create(
        model="fault",
        messages=QUESTION,
        stream=True,  # type: ignore[arg-type]
        extra_body={"best_of": 2},
    )
    with pytest.raises(openai.APIError) as caught:
        list(stream)
    assert "upstream_error" in caught.value.message


def test_streaming_bad_input_is_still_a_400(gateway: ServedGateway) -> None:
    body = {"messages": QUESTION, "best_of": 2, "n": 3, "stream": True}
    response = httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_streaming_completions_through_the_sdk(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="fault",
        prompt="A word:",
        seed=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"best_of": 4},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "beta"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_grpc_stream_events_with_n_top_up(stub: pb_grpc.BestOfNStub, upstream: FaultUpstream) -> None:
    request = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="x")], best_of=4, sampling=pb.SamplingParams(seed=0)
    )
    events = list(stub.GenerateStream(request, timeout=10))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("generated") == 4 and kinds.count("scored") == 4 and kinds[-1] == "result"
    assert {e.scored.index: e.scored.reward for e in events if e.HasField("scored")} == {
        i: REWARDS[t] for i, t in enumerate(TEXTS)
    }
    result = events[-1].result
    assert result.candidates[0].text == "beta" and result.usage.completion_tokens == 4


def test_grpc_reports_drop_reasons(stub: pb_grpc.BestOfNStub, upstream: FaultUpstream) -> None:
    upstream.rule = lambda body: Reply(502) if body["seed"] == 2 else None
    request = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="x")],
        best_of=4,
        min_candidates=3,
        sampling=pb.SamplingParams(seed=0),
    )
    reply = stub.Generate(request, timeout=10)
    assert reply.candidates_dropped == 1 and reply.drop_reasons[0].startswith("upstream_error: HTTP 502")
