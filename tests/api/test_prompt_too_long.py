"""A prompt too long for the reward model (issue 13, finding 8), with a real worker: the
scoring group's OpenGroup finds it before anything is generated, and both fronts answer
400 / INVALID_ARGUMENT naming the prompt's field; the upstream gets no call at all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from bon_gateway.config import GatewayConfig
from bon_gateway.engine.engine import RewardScorer
from bon_gateway.metrics import Metrics
from bon_gateway.v1 import best_of_n_pb2 as pb
from bon_gateway.v1 import best_of_n_pb2_grpc as pb_grpc
from tests.api.conftest import TEXTS
from tests.fakes import FakeUpstream, ServedGateway, gateway_config

pytestmark = pytest.mark.integration

MAX_LENGTH = 64  # the reward model's tokens; the long prompt has ~10 times that
LONG = " ".join(f"word{i}" for i in range(300))
SHORT = "What is the capital of France?"


def _pool(config: GatewayConfig, metrics: Metrics) -> RewardScorer:
    from bon_gateway.scoring.pool import WorkerPool

    return WorkerPool(config, metrics)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(TEXTS) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream, tiny_llama_rm: Path) -> Iterator[ServedGateway]:
    reward_models = [{"name": "tiny", "path": str(tiny_llama_rm), "max_length": MAX_LENGTH}]
    config = gateway_config(upstream.url, reward_models=reward_models)
    with ServedGateway(config, scorer_factory=_pool) as served:
        yield served


@pytest.fixture
def no_upstream_call(upstream: FakeUpstream) -> Iterator[None]:
    before = len(upstream.requests)
    yield
    assert upstream.requests[before:] == [], "the upstream was called for a prompt the reward model refuses"


def test_a_short_prompt_is_served(gateway: ServedGateway) -> None:
    # The control: the same gateway generates and scores a prompt that fits.
    body = {"messages": [{"role": "user", "content": SHORT}], "best_of": 2}
    reply = httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text


@pytest.mark.usefixtures("no_upstream_call")
@pytest.mark.parametrize("stream", [False, True])
def test_http_chat_is_a_400_naming_messages(gateway: ServedGateway, stream: bool) -> None:
    body = {"messages": [{"role": "user", "content": LONG}], "best_of": 4, "stream": stream}
    reply = httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=120)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "messages"
    assert "max_length" in error["message"]


@pytest.mark.usefixtures("no_upstream_call")
def test_http_completions_is_a_400_naming_prompt(gateway: ServedGateway) -> None:
    reply = httpx.post(f"{gateway.base_url}/completions", json={"prompt": LONG, "best_of": 4}, timeout=120)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == "prompt"


@pytest.mark.usefixtures("no_upstream_call")
@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_grpc_is_invalid_argument_naming_messages(gateway: ServedGateway, method: str) -> None:
    request = pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content=LONG)], best_of=4)
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        stub = pb_grpc.BestOfNStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            if method == "Generate":
                stub.Generate(request, timeout=120)
            else:
                list(stub.GenerateStream(request, timeout=120))
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()  # type: ignore[attr-defined]
    assert dict(error.trailing_metadata() or ()).get("bon-error-param") == "messages"  # type: ignore[attr-defined]
