"""Hostile JSON and protobuf (issue 13, finding 7): lone surrogates, JSON nested ~1,000
deep, NaN / Infinity, invalid UTF-8 over gRPC. Each is a 400 / INVALID_ARGUMENT naming
the field (or the body) before any upstream call: never a 500, never forwarded."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx
import pytest

from bon_gateway.v1 import best_of_n_pb2 as pb
from tests.fakes import FakeScorer, FakeUpstream, ServedGateway

pytestmark = pytest.mark.integration

CHAT = b'{"messages":[{"role":"user","content":"hi"}],"best_of":2'
DEEP = b"[" * 1000 + b"]" * 1000


@pytest.fixture
def calls(upstream: FakeUpstream, scorer: FakeScorer) -> Iterator[None]:
    """Every test here: nothing reaches the upstream or the scorer."""
    upstream_before, scorer_before = len(upstream.requests), len(scorer.calls)
    yield
    assert len(upstream.requests) == upstream_before, "a bad request reached the upstream"
    assert len(scorer.calls) == scorer_before, "a bad request was scored"


def _post(gateway: ServedGateway, path: str, body: bytes, encoding: str = "utf-8") -> httpx.Response:
    content = body if encoding == "utf-8" else body.decode().encode(encoding)
    return httpx.post(
        f"{gateway.base_url}/{path}",
        content=content,
        headers={"content-type": "application/json"},
        timeout=30,
    )


@pytest.mark.usefixtures("calls")
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "chat/completions",
            b'{"messages":[{"role":"user","content":"a\\ud800"}],"best_of":2}',
            "messages[0].content",
        ),
        ("completions", b'{"prompt":"\\udfff","best_of":2}', "prompt"),
        ("completions", b'{"prompt":["\\ud83d"],"best_of":2}', "prompt"),
        ("chat/completions", CHAT + b',"stop":["\\ud800"]}', "stop[0]"),
        ("chat/completions", CHAT + b',"tools":[{"type":"function","x":"\\ud800"}]}', "tools[0].x"),
        (
            "rewards",
            b'{"messages":[{"role":"user","content":"q"}],"candidates":["\\ud800"]}',
            "candidates[0]",
        ),
    ],
)
def test_a_lone_surrogate_is_a_400_naming_the_field(
    gateway: ServedGateway, path: str, body: bytes, param: str
) -> None:
    reply = _post(gateway, path, body)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


@pytest.mark.usefixtures("calls")
@pytest.mark.parametrize("path", ["chat/completions", "completions", "rewards"])
@pytest.mark.parametrize("encoding", ["utf-8", "utf-16"])  # utf-16: Python's json decodes it
@pytest.mark.parametrize("where", ["response_format", "unknown_field"])
def test_json_nested_a_thousand_deep_is_a_400(
    gateway: ServedGateway, path: str, encoding: str, where: str
) -> None:
    body = b'{"messages":[],"prompt":"p","' + where.encode() + b'":' + DEEP + b"}"
    reply = _post(gateway, path, body, encoding)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.usefixtures("calls")
def test_json_nested_past_the_passthrough_bound_is_a_400_naming_the_field(gateway: ServedGateway) -> None:
    # 100 deep: within what the JSON parsers take, past admission's bound on passthrough values.
    body = CHAT + b',"response_format":{"a":' + b"[" * 100 + b"]" * 100 + b"}}"
    reply = _post(gateway, "chat/completions", body, "utf-16")
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"].startswith("response_format.a")


@pytest.mark.usefixtures("calls")
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        (b'"presence_penalty":NaN', "presence_penalty"),
        (b'"frequency_penalty":-Infinity', "frequency_penalty"),
        (b'"temperature":NaN', "temperature"),
        (b'"top_p":Infinity', "top_p"),
        (b'"logit_bias":{"1":Infinity}', "logit_bias"),
        (b'"response_format":{"type":"json_schema","x":NaN}', "response_format.x"),
        (
            b'"tools":[{"type":"function","function":{"name":"f","parameters":{"min":-Infinity}}}]',
            "tools[0].function.parameters.min",
        ),
    ],
)
def test_nan_and_infinity_are_a_400_never_forwarded(gateway: ServedGateway, extra: bytes, param: str) -> None:
    reply = _post(gateway, "chat/completions", CHAT + b"," + extra + b"}")
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"].startswith(param)


# -- gRPC -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raw_channel(gateway: ServedGateway) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        yield channel


def _raw_call(channel: grpc.Channel, method: str, payload: bytes) -> grpc.RpcError:
    """Send bytes as they are (no client-side serialization, which would refuse bad UTF-8)."""
    call = channel.unary_unary(f"/bon_gateway.v1.BestOfN/{method}")
    with pytest.raises(grpc.RpcError) as caught:
        call(payload, timeout=30)
    return caught.value


def _corrupt(message: pb.GenerateRequest | pb.ScoreRequest, marker: str) -> bytes:
    """`message` serialized, with the text `marker` replaced by bytes that are not UTF-8."""
    raw = message.SerializeToString()
    assert marker.encode() in raw
    return raw.replace(marker.encode(), b"\xff\xfe\xc3(")


@pytest.mark.usefixtures("calls")
@pytest.mark.parametrize(
    ("method", "message", "param"),
    [
        (
            "Generate",
            pb.GenerateRequest(
                messages=[
                    pb.ChatMessage(role="user", content="fine"),
                    pb.ChatMessage(role="user", content="MARK"),
                ],
                best_of=2,
            ),
            "messages[1].content",
        ),
        ("Generate", pb.GenerateRequest(prompt="MARK", best_of=2), "prompt"),
        (
            "GenerateStream",
            pb.GenerateRequest(
                messages=[pb.ChatMessage(role="user", content="q")],
                sampling=pb.SamplingParams(stop=["ok", "MARK"]),
            ),
            "sampling.stop[1]",
        ),
        (
            "Score",
            pb.ScoreRequest(messages=[pb.ChatMessage(role="user", content="q")], candidates=["a", "MARK"]),
            "candidates[1]",
        ),
        (
            "Score",
            pb.ScoreRequest(
                messages=[pb.ChatMessage(role="user", content="q")], reward_model="MARK", candidates=["a"]
            ),
            "reward_model",
        ),
    ],
)
def test_invalid_utf8_over_grpc_is_invalid_argument_naming_the_field(
    raw_channel: grpc.Channel, method: str, message: pb.GenerateRequest | pb.ScoreRequest, param: str
) -> None:
    payload = _corrupt(message, "MARK")
    if method == "GenerateStream":
        call = raw_channel.unary_stream(f"/bon_gateway.v1.BestOfN/{method}")
        with pytest.raises(grpc.RpcError) as caught:
            list(call(payload, timeout=30))
        error = caught.value
    else:
        error = _raw_call(raw_channel, method, payload)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()  # type: ignore[attr-defined]
    assert param in error.details()  # type: ignore[attr-defined]
    trailing = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    assert trailing.get("bon-error-param") == param


@pytest.mark.usefixtures("calls")
def test_a_message_that_is_not_protobuf_is_invalid_argument(raw_channel: grpc.Channel) -> None:
    error = _raw_call(raw_channel, "Generate", b"\x0a\xff\xff\xff")  # a length past the end
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
