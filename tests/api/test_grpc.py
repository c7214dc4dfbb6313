"""The gRPC front over a real channel: BestOfN, health, reflection, errors."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from bon_gateway.errors import WorkerError
from bon_gateway.v1 import best_of_n_pb2 as pb
from bon_gateway.v1 import best_of_n_pb2_grpc as pb_grpc
from tests.api.conftest import BEST, RANKED, REWARDS, TEXTS
from tests.fakes import FakeScorer, FakeUpstream, ServedGateway, gateway_config, unused_port

pytestmark = pytest.mark.integration

QUESTION = [pb.ChatMessage(role="user", content="What is the capital of France?")]


@pytest.fixture(scope="module")
def channel(gateway: ServedGateway) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway.grpc_target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.BestOfNStub:
    return pb_grpc.BestOfNStub(channel)


def _generate_request(**fields: object) -> pb.GenerateRequest:
    fields.setdefault("messages", QUESTION)
    fields.setdefault("best_of", 4)
    fields.setdefault("sampling", pb.SamplingParams(seed=0))
    return pb.GenerateRequest(**fields)  # type: ignore[arg-type]


def test_generate_returns_the_best_candidate(stub: pb_grpc.BestOfNStub) -> None:
    reply = stub.Generate(_generate_request(), timeout=30)
    assert [c.text for c in reply.candidates] == [BEST]
    best = reply.candidates[0]
    assert best.rank == 1 and best.reward == REWARDS[BEST] and best.index == TEXTS.index(BEST)
    assert list(best.step_rewards) == [0.5, 3.0]
    assert reply.reward_model == "fake-rm" and reply.model == "fake-generator"
    assert reply.usage.candidates_generated == 4
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.timings.total_seconds >= reply.timings.generate_seconds > 0
    assert reply.candidates_dropped == 0 and reply.id


def test_generate_n_and_return_candidates(stub: pb_grpc.BestOfNStub) -> None:
    reply = stub.Generate(_generate_request(n=2), timeout=30)
    assert [c.text for c in reply.candidates] == list(RANKED[:2])
    reply = stub.Generate(_generate_request(n=2, return_candidates=True), timeout=30)
    assert [c.text for c in reply.candidates] == list(RANKED)
    assert [c.rank for c in reply.candidates] == [1, 2, 3, 4]
    assert [c.reward for c in reply.candidates] == [REWARDS[t] for t in RANKED]


def test_generate_on_a_plain_prompt(stub: pb_grpc.BestOfNStub, upstream: FakeUpstream) -> None:
    before = len(upstream.requests)
    reply = stub.Generate(_generate_request(messages=[], prompt="The capital of France is"), timeout=30)
    assert reply.candidates[0].text == BEST
    assert all(r["prompt"] == "The capital of France is" for r in upstream.requests[before:])


def test_generate_stream_events_then_result(stub: pb_grpc.BestOfNStub) -> None:
    events = list(stub.GenerateStream(_generate_request(), timeout=30))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("generated") == 4 and kinds.count("scored") == 4
    assert kinds[-1] == "result" and kinds.count("result") == 1
    # Candidates are scored as they finish: each one's scored event follows its generated one.
    generated_at = {e.generated.index: i for i, e in enumerate(events) if e.HasField("generated")}
    scored_at = {e.scored.index: i for i, e in enumerate(events) if e.HasField("scored")}
    assert all(scored_at[index] > generated_at[index] for index in generated_at)
    assert sorted(e.generated.text for e in events if e.HasField("generated")) == sorted(TEXTS)
    scored = {e.scored.index: e.scored.reward for e in events if e.HasField("scored")}
    assert scored == {i: REWARDS[t] for i, t in enumerate(TEXTS)}
    assert events[-1].result.candidates[0].text == BEST


def test_score_in_input_order(stub: pb_grpc.BestOfNStub) -> None:
    candidates = [*reversed(TEXTS), "unknown answer"]
    reply = stub.Score(pb.ScoreRequest(messages=QUESTION, candidates=candidates), timeout=30)
    assert reply.reward_model == "fake-rm"
    assert [d.index for d in reply.data] == list(range(5))
    assert [d.reward for d in reply.data] == [REWARDS.get(c, 0.0) for c in candidates]
    assert candidates[reply.selected_index] == BEST
    assert reply.usage.prompt_tokens > 0


def test_list_models(stub: pb_grpc.BestOfNStub) -> None:
    reply = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert {(m.name, m.kind) for m in reply.models} == {
        ("fake-generator", "generator"),
        ("fake-rm", "reward"),
    }


BAD_REQUESTS: list[tuple[str, pb.GenerateRequest, str]] = [
    ("empty-messages", pb.GenerateRequest(best_of=2), "messages"),
    ("message-without-role", _generate_request(messages=[pb.ChatMessage(content="hi")]), "messages[0].role"),
    (
        "unknown-role",
        _generate_request(messages=[pb.ChatMessage(role="x", content="hi")]),
        "messages[0].role",
    ),
    ("best-of-negative", _generate_request(best_of=-1), "best_of"),
    ("best-of-above-max", _generate_request(best_of=17), "best_of"),
    ("n-above-best-of", _generate_request(best_of=2, n=3), "n"),
    ("unknown-reward-model", _generate_request(reward_model="nope"), "reward_model"),
    ("unknown-selection", _generate_request(selection="best"), "selection"),
    ("unknown-aggregation", _generate_request(aggregation="max"), "aggregation"),
    ("messages-and-prompt", _generate_request(prompt="also"), "prompt"),
    (
        "negative-temperature",
        _generate_request(sampling=pb.SamplingParams(temperature=-0.5)),
        "sampling.temperature",
    ),
    ("zero-max-tokens", _generate_request(sampling=pb.SamplingParams(max_tokens=0)), "sampling.max_tokens"),
]


@pytest.mark.parametrize(
    ("request_", "param"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_input_is_invalid_argument_naming_the_field(
    stub: pb_grpc.BestOfNStub, request_: pb.GenerateRequest, param: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Generate(request_, timeout=30)
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert error.details().startswith(param)  # type: ignore[attr-defined]
    assert ("bon-error-param", param) in tuple(error.trailing_metadata())  # type: ignore[attr-defined]
    assert stub.Generate(_generate_request(), timeout=30).candidates[0].text == BEST


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (pb.ScoreRequest(messages=QUESTION), "candidates"),
        (pb.ScoreRequest(candidates=["a"]), "messages"),
        (pb.ScoreRequest(messages=QUESTION, candidates=["a"], reward_model="nope"), "reward_model"),
        (pb.ScoreRequest(messages=QUESTION, candidates=["a"], activation="relu"), "activation"),
    ],
    ids=["no-candidates", "no-messages", "unknown-model", "unknown-activation"],
)
def test_bad_score_input_is_invalid_argument(
    stub: pb_grpc.BestOfNStub, request_: pb.ScoreRequest, param: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Score(request_, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert caught.value.details().startswith(param)  # type: ignore[attr-defined]


def test_worker_failure_is_unavailable_on_the_stream(stub: pb_grpc.BestOfNStub, scorer: FakeScorer) -> None:
    scorer.error = WorkerError("all reward workers are down")
    try:
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.GenerateStream(_generate_request(), timeout=30))
    finally:
        scorer.error = None
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "workers are down" in caught.value.details()  # type: ignore[attr-defined]


def test_unexpected_error_is_internal_without_details(stub: pb_grpc.BestOfNStub, scorer: FakeScorer) -> None:
    scorer.crash = RuntimeError("secret detail")
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(_generate_request(), timeout=30)
    finally:
        scorer.crash = None
    assert caught.value.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
    assert "secret" not in caught.value.details()  # type: ignore[attr-defined]


def test_client_deadline_is_respected(stub: pb_grpc.BestOfNStub, upstream: FakeUpstream) -> None:
    # The upstream would answer after 60 s; with the client's 0.3 s deadline the
    # gateway gives its upstream calls up, and the upstream sees each one close.
    upstream.delay_s = 60.0
    mark = upstream.mark()
    try:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Generate(_generate_request(), timeout=0.3)
        assert upstream.wait_until(lambda: upstream.all_hung_up_since(mark), timeout_s=30), (
            "the gateway kept its upstream calls after the client's deadline"
        )
    finally:
        upstream.delay_s = 0.0
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    assert stub.Generate(_generate_request(), timeout=30).candidates[0].text == BEST


def test_upstream_down_is_unavailable() -> None:
    config = gateway_config(f"http://127.0.0.1:{unused_port()}/v1")
    with (
        ServedGateway(config, FakeScorer(REWARDS)) as gateway,
        grpc.insecure_channel(gateway.grpc_target) as ch,
    ):
        with pytest.raises(grpc.RpcError) as caught:
            pb_grpc.BestOfNStub(ch).Generate(_generate_request(), timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "connect_error" in caught.value.details()  # type: ignore[attr-defined]


def _health(channel: grpc.Channel, service: str) -> int:
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return int(reply.status)


def test_health_is_not_serving_until_ready(upstream: FakeUpstream) -> None:
    scorer = FakeScorer(REWARDS, ready=False)
    with (
        ServedGateway(gateway_config(upstream.url), scorer) as gateway,
        grpc.insecure_channel(gateway.grpc_target) as ch,
    ):
        for service in ("", "bon_gateway.v1.BestOfN"):
            assert _health(ch, service) == health_pb2.HealthCheckResponse.NOT_SERVING
        scorer.is_ready = True
        deadline = time.monotonic() + 5
        while _health(ch, "bon_gateway.v1.BestOfN") != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health never turned SERVING"
            time.sleep(0.05)
        assert _health(ch, "") == health_pb2.HealthCheckResponse.SERVING
        # And back when the workers go away.
        scorer.is_ready = False
        deadline = time.monotonic() + 5
        while _health(ch, "") != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health never turned NOT_SERVING"
            time.sleep(0.05)


def test_reflection_lists_the_services(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {
        "bon_gateway.v1.BestOfN",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="bon_gateway.v1.BestOfN")
    reply = next(iter(stub.ServerReflectionInfo(iter([request]), timeout=5)))
    assert reply.file_descriptor_response.file_descriptor_proto


def test_grpc_metrics_are_recorded(gateway: ServedGateway, stub: pb_grpc.BestOfNStub) -> None:
    stub.ListModels(pb.ListModelsRequest(), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Generate(_generate_request(best_of=-1), timeout=30)
    requests = gateway.metrics.requests
    assert requests.labels("grpc_list_models", "OK")._value.get() >= 1
    assert requests.labels("grpc_generate", "INVALID_ARGUMENT")._value.get() >= 1
