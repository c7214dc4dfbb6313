"""API keys on both fronts: every HTTP route and every RPC is enumerated, so an
endpoint added without the guard fails here. Per-key rate limits, /metrics and
/ready policy, and keys kept out of the logs."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from starlette.routing import Route

from bon_gateway.api.auth import AccessPolicy, KeyStore, RateLimiter, bearer_token, load_api_keys
from bon_gateway.api.guard import Guard
from bon_gateway.api.http_app import build_app
from bon_gateway.config import AuthConfig, ConfigError
from bon_gateway.errors import Overloaded, Unauthenticated
from bon_gateway.metrics import Metrics
from bon_gateway.v1 import best_of_n_pb2 as pb
from tests.fakes import FakeScorer, FakeUpstream, ServedGateway, gateway_config
from tests.security.conftest import KEYS, NO_ENV, REWARDS, auth_config

WRONG = "key-wrong-SECRET-0000"
BEST_OF_N = pb.DESCRIPTOR.services_by_name["BestOfN"]
REFLECTION = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]


# -- units ---------------------------------------------------------------------
def test_keys_come_from_the_environment_and_the_file(keys_file: Path) -> None:
    auth = AuthConfig(api_keys_env="MY_KEYS", api_keys_file=str(keys_file))
    keys = load_api_keys(auth, {"MY_KEYS": f" env-key-1 ,,{KEYS[0]}"})
    assert keys == ("env-key-1", KEYS[0], KEYS[1])  # file comments and blanks skipped, no duplicates
    assert load_api_keys(AuthConfig(api_keys_env="MY_KEYS"), {}) == ()


def test_unreadable_keys_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="api_keys_file"):
        load_api_keys(AuthConfig(api_keys_env=NO_ENV, api_keys_file=str(tmp_path / "missing")), {})


def test_bearer_parsing_and_constant_time_match() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("abc") is None
    assert bearer_token(None) is None and bearer_token("Bearer ") is None
    store = KeyStore(KEYS)
    assert store.match(KEYS[1]) == 1
    assert store.match(KEYS[0][:-1]) is None
    assert store.match("") is None and store.match(None) is None
    assert not KeyStore(()).enabled


def test_token_bucket_refills_at_the_configured_rate() -> None:
    now = [100.0]
    limiter = RateLimiter(2.0, 3, clock=lambda: now[0])
    assert [limiter.acquire(0) for _ in range(3)] == [None, None, None]  # the burst
    wait = limiter.acquire(0)
    assert wait is not None and wait == pytest.approx(0.5)
    assert limiter.acquire(1) is None  # buckets are per key
    now[0] += 0.5
    assert limiter.acquire(0) is None
    assert limiter.acquire(0) is not None
    assert RateLimiter(0.0, 0).acquire(0) is None  # rate 0: unlimited


def test_access_policy_raises_the_mapped_errors() -> None:
    policy = AccessPolicy(KeyStore(KEYS), RateLimiter(1.0, 1))
    with pytest.raises(Unauthenticated):
        policy.check(None)
    with pytest.raises(Unauthenticated):
        policy.check(f"Bearer {WRONG}")
    policy.check(f"Bearer {KEYS[0]}")
    with pytest.raises(Overloaded) as shed:
        policy.check(f"Bearer {KEYS[0]}")
    assert 0 < shed.value.retry_after_s <= 1.0
    AccessPolicy(KeyStore(()), RateLimiter(0, 0)).check(None)  # no keys: open


# -- the served gateway ------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(upstream: FakeUpstream, keys_file: Path) -> Iterator[ServedGateway]:
    config = gateway_config(upstream.url, max_best_of=8, auth=auth_config(keys_file))
    with ServedGateway(config, FakeScorer(REWARDS)) as served:
        yield served


def _http_routes(served: ServedGateway) -> list[tuple[str, str]]:
    """(method, path) of every route the app builder registers."""
    assert served.engine is not None
    app = build_app(served.engine, Metrics(), Guard.from_config(served.config.server, {}))
    found = []
    for route in app.routes:
        assert isinstance(route, Route), f"unexpected route type {route!r}"
        for method in sorted(route.methods or {"GET"}):
            found.append((method, route.path))
    return found


def _headers(key: str | None) -> dict[str, str]:
    return {} if key is None else {"Authorization": f"Bearer {key}"}


@pytest.mark.integration
def test_every_http_route_but_health_refuses_missing_or_wrong_keys(keyed: ServedGateway) -> None:
    routes = _http_routes(keyed)
    paths = {path for _, path in routes}
    # The enumeration really covers the API (a sanity check on the test itself).
    assert {"/v1/chat/completions", "/v1/completions", "/v1/rewards", "/v1/models", "/metrics"} <= paths
    assert {"/classify", "/pooling", "/score", "/rerank", "/get_reward"} <= paths  # the RLHF routes
    with httpx.Client(base_url=keyed.http_url, timeout=10) as client:
        for method, path in routes:
            for key in (None, WRONG, KEYS[0][:-1], KEYS[0] + "x"):
                response = client.request(method, path, headers=_headers(key), json={})
                if path == "/health":
                    assert response.status_code == 200, (method, path)
                    continue
                assert response.status_code == 401, (method, path, key, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
                if method != "HEAD":
                    assert response.json()["error"]["code"] == "unauthenticated"
            response = client.request(method, path, headers=_headers(KEYS[1]), json={})
            assert response.status_code != 401, (method, path)
        # Paths nobody registered are refused too: no probing the surface without a key.
        assert client.get("/v1/nothing-here").status_code == 401
        assert client.get("/v1/nothing-here", headers=_headers(KEYS[0])).status_code == 404


def _call(
    channel: grpc.Channel,
    service: pb_descriptor.ServiceDescriptor,
    method: pb_descriptor.MethodDescriptor,
    key: str | None,
) -> grpc.StatusCode:
    request_cls = GetMessageClass(method.input_type)
    response_cls = GetMessageClass(method.output_type)
    path = f"/{service.full_name}/{method.name}"
    kwargs = {
        "request_serializer": request_cls.SerializeToString,
        "response_deserializer": response_cls.FromString,
    }
    metadata = () if key is None else (("authorization", f"Bearer {key}"),)
    request = request_cls()
    try:
        if method.client_streaming and method.server_streaming:
            list(channel.stream_stream(path, **kwargs)(iter([request]), metadata=metadata, timeout=10))
        elif method.server_streaming:
            list(channel.unary_stream(path, **kwargs)(request, metadata=metadata, timeout=10))
        elif method.client_streaming:
            channel.stream_unary(path, **kwargs)(iter([request]), metadata=metadata, timeout=10)
        else:
            channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def _methods(
    services: Sequence[pb_descriptor.ServiceDescriptor],
) -> Iterator[tuple[pb_descriptor.ServiceDescriptor, pb_descriptor.MethodDescriptor]]:
    for service in services:
        for method in service.methods:
            yield service, method


@pytest.mark.integration
def test_every_rpc_but_health_refuses_missing_or_wrong_keys(keyed: ServedGateway) -> None:
    assert len(BEST_OF_N.methods) >= 4  # Generate, GenerateStream, Score, ListModels (at least)
    with grpc.insecure_channel(keyed.grpc_target) as channel:
        for service, method in _methods([BEST_OF_N, REFLECTION]):
            for key in (None, WRONG):
                assert _call(channel, service, method, key) == grpc.StatusCode.UNAUTHENTICATED, (
                    service.name,
                    method.name,
                    key,
                )
            assert _call(channel, service, method, KEYS[0]) != grpc.StatusCode.UNAUTHENTICATED
        # Health stays open for kubelet gRPC probes and load balancers.
        for service, method in _methods([HEALTH]):
            if not method.server_streaming:  # Watch never ends
                assert _call(channel, service, method, None) != grpc.StatusCode.UNAUTHENTICATED
        assert _call(channel, HEALTH, HEALTH.methods_by_name["Check"], None) == grpc.StatusCode.OK
        assert _call(channel, BEST_OF_N, BEST_OF_N.methods_by_name["ListModels"], KEYS[1]) == (
            grpc.StatusCode.OK
        )


@pytest.mark.integration
@pytest.mark.parametrize("open_monitoring", [False, True])
def test_metrics_and_ready_protection_is_configurable(
    upstream: FakeUpstream, keys_file: Path, open_monitoring: bool
) -> None:
    auth = auth_config(
        keys_file, metrics_require_key=not open_monitoring, ready_requires_key=not open_monitoring
    )
    config = gateway_config(upstream.url, auth=auth)
    with (
        ServedGateway(config, FakeScorer(REWARDS)) as served,
        httpx.Client(base_url=served.http_url) as client,
    ):
        expected = 200 if open_monitoring else 401
        assert client.get("/metrics").status_code == expected
        assert client.get("/ready").status_code == expected
        assert client.get("/metrics", headers=_headers(KEYS[0])).status_code == 200
        assert client.get("/health").status_code == 200
        # Opening monitoring opens nothing else.
        assert client.get("/v1/models").status_code == 401


@pytest.mark.integration
def test_per_key_rate_limit_on_both_fronts(upstream: FakeUpstream, keys_file: Path) -> None:
    auth = auth_config(keys_file, rate_limit_per_s=0.1, rate_limit_burst=2)
    config = gateway_config(upstream.url, auth=auth)
    with (
        ServedGateway(config, FakeScorer(REWARDS)) as served,
        httpx.Client(base_url=served.http_url) as client,
    ):
        assert [client.get("/v1/models", headers=_headers(KEYS[0])).status_code for _ in range(2)] == [
            200,
            200,
        ]
        shed = client.get("/v1/models", headers=_headers(KEYS[0]))
        assert shed.status_code == 429
        assert int(shed.headers["retry-after"]) >= 1
        assert "rate limit" in shed.json()["error"]["message"]
        # Another key has its own bucket.
        assert client.get("/v1/models", headers=_headers(KEYS[1])).status_code == 200
        # The bucket is shared with gRPC: the same key is shed there too.
        with grpc.insecure_channel(served.grpc_target) as channel:
            stub = channel.unary_unary(
                f"/{BEST_OF_N.full_name}/ListModels",
                request_serializer=pb.ListModelsRequest.SerializeToString,
                response_deserializer=pb.ListModelsResponse.FromString,
            )
            with pytest.raises(grpc.RpcError) as refused:
                stub(pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {KEYS[0]}"),), timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            trailing = dict(refused.value.trailing_metadata() or ())
            assert int(trailing["retry-after"]) >= 1


@pytest.mark.integration
def test_keys_never_reach_the_logs(keyed: ServedGateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with httpx.Client(base_url=keyed.http_url, timeout=10) as client:
        client.get("/v1/models", headers=_headers(WRONG))
        client.get("/v1/models", headers=_headers(KEYS[0]))
        client.post("/v1/chat/completions", headers=_headers(KEYS[0]), json={"messages": []})
    with grpc.insecure_channel(keyed.grpc_target) as channel:
        _call(channel, BEST_OF_N, BEST_OF_N.methods_by_name["ListModels"], WRONG)
    # A fresh policy logs its start-up line: the count, never the keys.
    AccessPolicy.from_config(AuthConfig(api_keys_env="K"), {"K": f"{KEYS[0]},{KEYS[1]}"})
    text = caplog.text
    assert "phase=auth keys=2" in text
    for secret in (*KEYS, WRONG):
        assert secret not in text
