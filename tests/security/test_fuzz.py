"""Fuzzing: hypothesis over the HTTP request models and the gRPC messages, and
schemathesis over the app's own OpenAPI schema, all against the real served
gateway (FakeScorer, fake upstream on loopback). Nothing may come back 5xx
(INTERNAL / UNKNOWN on gRPC) and the server must keep serving.

Bounded: BON_FUZZ_EXAMPLES (default 150) examples per test. Run with `-s` to
see the number of inputs tried.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any, get_args

import grpc
import httpx
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import Message as ProtoMessage
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bon_gateway.types import Activation, Aggregation, Selection
from bon_gateway.v1 import best_of_n_pb2 as pb
from tests.fakes import FakeScorer, FakeUpstream, ServedGateway, gateway_config
from tests.security.conftest import REWARDS

pytestmark = pytest.mark.integration

SELECTIONS: tuple[str, ...] = get_args(Selection)
AGGREGATIONS: tuple[str, ...] = get_args(Aggregation)
ACTIVATIONS: tuple[str, ...] = get_args(Activation)
EXAMPLES = int(os.environ.get("BON_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Every input sent and every server error seen, per test; printed at the end.
TRIED: Counter[str] = Counter()
SERVER_ERRORS: list[str] = []
STATUSES: Counter[str] = Counter()  # how far inputs got: 200s reached the engine


@pytest.fixture(scope="module")
def served(upstream: FakeUpstream) -> Iterator[ServedGateway]:
    # Small bounds so generated values cross them often (and the fake fan-out stays cheap).
    config = gateway_config(
        upstream.url,
        max_best_of=8,
        limits={"max_body_bytes": 65536, "max_messages": 16, "max_prompt_chars": 4000},
        request_timeout_s=20,
    )
    with ServedGateway(config, FakeScorer(REWARDS)) as gateway:
        yield gateway
    print(f"\nfuzz inputs tried: {dict(TRIED)} total={sum(TRIED.values())} 5xx={len(SERVER_ERRORS)}")
    print(f"fuzz statuses: {dict(STATUSES)}")


@pytest.fixture(scope="module")
def http(served: ServedGateway) -> Iterator[httpx.Client]:
    # A fresh connection per input: a keep-alive connection the server closes
    # while idle (uvicorn's 5 s) races with the next request and reads as a
    # dropped connection, which would hide a real one.
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=served.http_url, timeout=30, limits=no_reuse) as client:
        yield client


def _record(test: str, status: int, detail: str) -> None:
    TRIED[test] += 1
    STATUSES[str(status)] += 1
    if status >= 500:
        SERVER_ERRORS.append(f"{test}: {status} {detail[:300]}")


# -- HTTP: JSON bodies shaped like the request models ------------------------------
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-3, 70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
any_json = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)


def mostly(valid: st.SearchStrategy[Any], wild: st.SearchStrategy[Any] = any_json) -> st.SearchStrategy[Any]:
    """`valid` 9 times in 10, else `wild`: most bodies reach the engine, some break one field."""
    return st.integers(0, 9).flatmap(lambda i: wild if i == 0 else valid)


text_part = st.fixed_dictionaries(
    {
        "type": mostly(st.just("text"), st.sampled_from(["image_url", ""]) | any_json),
        "text": st.text(max_size=60),
    }
)
message = mostly(
    st.fixed_dictionaries(
        {
            "role": mostly(st.sampled_from(["system", "user", "assistant", "tool", ""])),
            "content": mostly(st.text(max_size=200) | st.lists(text_part, max_size=3)),
        },
        optional={"name": mostly(st.text(max_size=10))},
    ),
    st.fixed_dictionaries({}, optional={"role": any_json, "content": any_json, "name": any_json}),
)
generate_fields = {
    "model": mostly(st.text(max_size=20)),
    "best_of": mostly(st.integers(1, 8), st.integers(-3, 100) | any_json),
    "n": mostly(st.integers(1, 2), st.integers(-3, 100) | any_json),
    "reward_model": mostly(st.just("fake-rm"), st.just("nope") | any_json),
    "selection": mostly(st.sampled_from(SELECTIONS), st.text(max_size=10) | any_json),
    "aggregation": mostly(st.sampled_from(AGGREGATIONS), st.text(max_size=10) | any_json),
    "return_candidates": mostly(st.booleans()),
    "min_candidates": mostly(st.integers(1, 2), st.integers(-3, 100) | any_json),
    "temperature": mostly(st.floats(0, 2), st.floats(-1, 3) | any_json),
    "top_p": mostly(st.floats(0.1, 1), st.floats(-1, 2) | any_json),
    "max_tokens": mostly(st.integers(1, 64), st.integers(-1, 100_000) | any_json),
    "seed": mostly(st.integers(0, 2**31), st.integers(-(2**70), 2**70) | any_json),
    "stop": mostly(st.text(max_size=10) | st.lists(st.text(max_size=10), max_size=3)),
    "stream": mostly(st.booleans()),
    "stream_options": mostly(st.fixed_dictionaries({}, optional={"include_usage": mostly(st.booleans())})),
    "logit_bias": mostly(st.dictionaries(st.text(max_size=5), st.floats(-100, 100), max_size=3)),
    "response_format": mostly(st.just({"type": "text"})),
}
chat_body = st.fixed_dictionaries(
    {
        "messages": mostly(
            st.lists(message, min_size=1, max_size=4), st.lists(message, max_size=20) | any_json
        )
    },
    optional={**generate_fields, "max_completion_tokens": mostly(st.integers(-1, 100_000))},
)
completion_body = st.fixed_dictionaries(
    {"prompt": mostly(st.text(max_size=300) | st.lists(st.text(max_size=50), max_size=3))},
    optional=generate_fields,
)
rewards_body = st.fixed_dictionaries(
    {"messages": mostly(st.lists(message, min_size=1, max_size=5))},
    optional={
        "model": mostly(st.just("fake-rm"), st.just("nope") | any_json),
        "candidates": mostly(st.lists(st.text(max_size=40), max_size=6)),
        "steps": mostly(st.lists(st.lists(st.text(max_size=20), max_size=3), max_size=3)),
        "activation": mostly(st.sampled_from(ACTIVATIONS), st.text(max_size=10) | any_json),
        "aggregation": mostly(st.sampled_from(AGGREGATIONS), st.text(max_size=10) | any_json),
        "selection": mostly(st.sampled_from(SELECTIONS), st.text(max_size=10) | any_json),
    },
)


def _post_json(http: httpx.Client, test: str, path: str, body: Any) -> None:
    content = json.dumps(body)
    try:
        response = http.post(path, content=content, headers={"Content-Type": "application/json"})
    except httpx.TransportError as err:  # a dropped connection is a crash too: say which body did it
        SERVER_ERRORS.append(f"{test}: {err!r} <- {content[:300]}")
        raise AssertionError(f"{path}: {err!r} for body {content[:2000]}") from err
    _record(test, response.status_code, f"{path} {response.text} <- {json.dumps(body)[:300]}")
    assert response.status_code < 500, response.text


@FUZZ
@given(body=chat_body)
def test_fuzz_chat_completions(http: httpx.Client, body: dict[str, Any]) -> None:
    _post_json(http, "http_chat", "/v1/chat/completions", body)


@FUZZ
@given(body=completion_body)
def test_fuzz_completions(http: httpx.Client, body: dict[str, Any]) -> None:
    _post_json(http, "http_completions", "/v1/completions", body)


@FUZZ
@given(body=rewards_body)
def test_fuzz_rewards(http: httpx.Client, body: dict[str, Any]) -> None:
    _post_json(http, "http_rewards", "/v1/rewards", body)


@FUZZ
@given(
    path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/rewards"]),
    raw=st.binary(max_size=300) | any_json.map(lambda v: json.dumps(v).encode()),
    content_type=st.sampled_from(["application/json", "text/plain", "", "application/json; charset=latin-1"]),
)
def test_fuzz_raw_bodies(http: httpx.Client, path: str, raw: bytes, content_type: str) -> None:
    response = http.post(path, content=raw, headers={"Content-Type": content_type})
    _record("http_raw", response.status_code, f"{path} {response.text}")
    assert response.status_code < 500, response.text


# -- gRPC: every field of the request messages, from the descriptors ---------------
_INT_RANGES = {
    pb_descriptor.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    pb_descriptor.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    pb_descriptor.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    pb_descriptor.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    pb_descriptor.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    pb_descriptor.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}


# Values that pass validation, by field name, so most messages reach the engine.
_LIKELY = {
    "role": st.sampled_from(["user", "system", "assistant"]),
    "content": st.text(max_size=80),
    "prompt": st.just(""),
    "best_of": st.integers(0, 8),
    "n": st.integers(0, 3),
    "min_candidates": st.integers(0, 3),
    "reward_model": st.sampled_from(["", "fake-rm"]),
    "model": st.sampled_from(["", "fake-rm"]),
    "selection": st.sampled_from(("", *SELECTIONS)),
    "aggregation": st.sampled_from(("", *AGGREGATIONS)),
    "activation": st.sampled_from(("", *ACTIVATIONS)),
    "temperature": st.floats(0, 2, width=32),
    "top_p": st.floats(0.125, 1, width=32),
    "max_tokens": st.integers(1, 64),
    "steps": st.just([]),
    "messages": st.lists(
        st.builds(pb.ChatMessage, role=st.sampled_from(["user", "system"]), content=st.text(max_size=80)),
        min_size=1,
        max_size=3,
    ),
    "candidates": st.lists(st.text(max_size=40), min_size=1, max_size=4),
    "seed": st.integers(0, 2**31),
}


def _scalar(field: pb_descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    wild = _wild(field, depth)
    likely = _LIKELY.get(field.name)
    return wild if likely is None else mostly(likely, wild)


def _wild(field: pb_descriptor.FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INT_RANGES:
        low, high = _INT_RANGES[t]
        return st.integers(max(low, -3), min(high, 70)) | st.integers(low, high)
    if t == pb_descriptor.FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if t == pb_descriptor.FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if t == pb_descriptor.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == pb_descriptor.FieldDescriptor.TYPE_STRING:
        names = ["", "fake-rm", "argmax", "majority", "last", "min", "sigmoid", "user", "assistant"]
        return st.sampled_from(names) | st.text(max_size=60)
    if t == pb_descriptor.FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=40)
    if t == pb_descriptor.FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    if t == pb_descriptor.FieldDescriptor.TYPE_MESSAGE:
        return proto_messages(field.message_type, depth + 1)
    raise AssertionError(f"unhandled field type {t}")


def proto_messages(descriptor: pb_descriptor.Descriptor, depth: int = 0) -> st.SearchStrategy[ProtoMessage]:
    """Any instance of the message: every field optional, any value its type allows."""
    cls = GetMessageClass(descriptor)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.type == pb_descriptor.FieldDescriptor.TYPE_MESSAGE and depth >= 3:
            continue
        repeated = getattr(field, "is_repeated", None)
        if repeated if repeated is not None else field.label == field.LABEL_REPEATED:
            value = st.lists(_wild(field, depth), max_size=6)
            if field.name in _LIKELY:
                value = mostly(_LIKELY[field.name], value)
        else:
            value = _scalar(field, depth)
        fields[field.name] = value
    return st.fixed_dictionaries({}, optional=fields).map(lambda kwargs: cls(**kwargs))


SERVICE = pb.DESCRIPTOR.services_by_name["BestOfN"]
ALLOWED_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


@pytest.fixture(scope="module")
def channel(served: ServedGateway) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served.grpc_target) as chan:
        yield chan


@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
def test_fuzz_grpc_methods(channel: grpc.Channel, method_name: str) -> None:
    method = SERVICE.methods_by_name[method_name]
    response_cls = GetMessageClass(method.output_type)
    path = f"/{SERVICE.full_name}/{method.name}"
    kwargs = {
        "request_serializer": lambda m: m.SerializeToString(),
        "response_deserializer": response_cls.FromString,
    }

    @FUZZ
    @given(request=proto_messages(method.input_type))
    def run(request: ProtoMessage) -> None:
        code = grpc.StatusCode.OK
        details = ""
        try:
            if method.server_streaming:
                list(channel.unary_stream(path, **kwargs)(request, timeout=20))
            else:
                channel.unary_unary(path, **kwargs)(request, timeout=20)
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
        TRIED[f"grpc_{method.name}"] += 1
        STATUSES[code.name] += 1
        if code not in ALLOWED_CODES:
            SERVER_ERRORS.append(f"grpc {method.name}: {code.name} {details}")
        assert code in ALLOWED_CODES, (code, details, str(request)[:300])

    run()


# -- schemathesis: the OpenAPI schema the app itself publishes ----------------------
@pytest.mark.slow
def test_fuzz_openapi_schema_with_schemathesis(served: ServedGateway) -> None:
    import schemathesis

    schema_doc = httpx.get(served.http_url + "/openapi.json", timeout=10).json()
    schema = schemathesis.openapi.from_dict(schema_doc)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/rewards"}
    seen: list[str] = []
    per_operation = max(10, EXAMPLES // 2)
    with httpx.Client(timeout=30) as client:
        for operation in operations:
            strategy = operation.as_strategy()

            @settings(
                max_examples=per_operation,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=strategy)
            def run(case: Any) -> None:
                kwargs = case.as_transport_kwargs(base_url=served.http_url)
                response = client.request(**{k: v for k, v in kwargs.items() if k in _HTTPX_KWARGS})
                _record("schemathesis", response.status_code, f"{case.method} {case.path} {response.text}")
                seen.append(f"{case.method} {case.path}")
                assert response.status_code < 500, (case.method, case.path, case.body, response.text)

            run()
    assert len(seen) >= len(operations)


_HTTPX_KWARGS = {"method", "url", "headers", "params", "json", "content", "data", "cookies", "files"}
