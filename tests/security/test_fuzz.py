"""Fuzzing: hypothesis over the HTTP request models and the gRPC messages, and
schemathesis over the app's own OpenAPI schema, all against the real served
gateway (FakeScorer, fake upstream on loopback). Nothing may come back 5xx
(INTERNAL / UNKNOWN on gRPC) and the server must keep serving.

Bounded: BON_FUZZ_EXAMPLES (default 150) examples per test. Run with `-s` to
see the number of inputs tried. The inputs come from tests/security/fuzz_inputs.py;
bench/fuzz_at_scale.py runs the same generators to 100,000 inputs against a
`bon-gateway serve` process.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf.message import Message as ProtoMessage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes import FakeScorer, FakeUpstream, ServedGateway, gateway_config
from tests.security.conftest import REWARDS
from tests.security.fuzz_inputs import (
    ALLOWED_GRPC_CODES,
    GENERATE_ROUTES,
    RAW_CONTENT_TYPES,
    RLHF_BODIES,
    SERVICE,
    RpcCall,
    case_request,
    chat_body,
    completion_body,
    malformed_proto,
    proto_messages,
    raw_body,
    rewards_body,
    rpc_caller,
    schema_operations,
)

pytestmark = pytest.mark.integration

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
    path=st.sampled_from(GENERATE_ROUTES + tuple(RLHF_BODIES)),
    raw=raw_body,
    content_type=st.sampled_from(RAW_CONTENT_TYPES),
)
def test_fuzz_raw_bodies(http: httpx.Client, path: str, raw: bytes, content_type: str) -> None:
    response = http.post(path, content=raw, headers={"Content-Type": content_type})
    _record("http_raw", response.status_code, f"{path} {response.text}")
    assert response.status_code < 500, response.text


# The RLHF routes and malformed RPCs are a fifth of the short run each (per route / RPC).
SHORT_FUZZ = settings(FUZZ, max_examples=max(10, EXAMPLES // 5))


@pytest.mark.parametrize("path", list(RLHF_BODIES))
def test_fuzz_rlhf_routes(http: httpx.Client, path: str) -> None:
    @SHORT_FUZZ
    @given(body=RLHF_BODIES[path])
    def run(body: dict[str, Any]) -> None:
        _post_json(http, f"http{path.replace('/', '_')}", path, body)

    run()


# -- gRPC: every RPC of the service, messages from the descriptors ----------------
@pytest.fixture(scope="module")
def channel(served: ServedGateway) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(served.grpc_target) as chan:
        yield chan


def _check_rpc(test: str, call: RpcCall, request: ProtoMessage | bytes) -> None:
    code, details = call(request, 20)
    TRIED[test] += 1
    STATUSES[code.name] += 1
    if code not in ALLOWED_GRPC_CODES:
        SERVER_ERRORS.append(f"{test}: {code.name} {details}")
    assert code in ALLOWED_GRPC_CODES, (code, details, str(request)[:300])


@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
def test_fuzz_grpc_methods(channel: grpc.Channel, method_name: str) -> None:
    method = SERVICE.methods_by_name[method_name]
    call = rpc_caller(channel, method)

    @FUZZ
    @given(request=proto_messages(method.input_type))
    def run(request: ProtoMessage) -> None:
        _check_rpc(f"grpc_{method.name}", call, request)

    run()


@pytest.mark.parametrize("method_name", [m.name for m in SERVICE.methods])
def test_fuzz_grpc_malformed_messages(channel: grpc.Channel, method_name: str) -> None:
    """Wire bytes that do not parse as the request: INVALID_ARGUMENT, never UNKNOWN."""
    method = SERVICE.methods_by_name[method_name]
    call = rpc_caller(channel, method)

    @SHORT_FUZZ
    @given(request=malformed_proto(method.input_type))
    def run(request: bytes) -> None:
        _check_rpc(f"grpc_malformed_{method.name}", call, request)

    run()


# -- schemathesis: the OpenAPI schema the app itself publishes ----------------------
@pytest.mark.slow
def test_fuzz_openapi_schema_with_schemathesis(served: ServedGateway) -> None:
    schema_doc = httpx.get(served.http_url + "/openapi.json", timeout=10).json()
    operations = schema_operations(schema_doc)
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
                response = client.request(**case_request(case, served.http_url))
                _record("schemathesis", response.status_code, f"{case.method} {case.path} {response.text}")
                seen.append(f"{case.method} {case.path}")
                assert response.status_code < 500, (case.method, case.path, case.body, response.text)

            run()
    assert len(seen) >= len(operations)
