"""metrics.py: the label values it knows up front, and Metrics.initialise."""

from __future__ import annotations

from bon_gateway.api.grpc_guard import _api_label
from bon_gateway.api.http_app import API_LABELS
from bon_gateway.config import GatewayConfig
from bon_gateway.metrics import (
    CANDIDATE_OUTCOMES,
    GRPC_API_LABELS,
    HTTP_API_LABELS,
    UPSTREAM_ERROR_KINDS,
    Metrics,
)
from bon_gateway.types import BACKEND_ERROR_KINDS, BACKEND_LATENCY_BUCKETS, DROP_REASONS
from bon_gateway.v1 import best_of_n_pb2
from bon_gateway.v1 import reward_worker_pb2 as pb


def test_api_labels_are_the_ones_the_fronts_use() -> None:
    assert set(HTTP_API_LABELS) == set(API_LABELS.values())
    methods = best_of_n_pb2.DESCRIPTOR.services_by_name["BestOfN"].methods
    assert set(GRPC_API_LABELS) == {_api_label(m.name) for m in methods}


def test_candidate_outcomes_cover_every_drop_reason() -> None:
    # "rejected": speculative rejection stopped the candidate (not a drop).
    want = {f"dropped_{r}" for r in DROP_REASONS} | {"generated", "scored", "rejected"}
    assert want == set(CANDIDATE_OUTCOMES)


def _config() -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "generator": {"urls": ["http://gen-a:8000/v1", "http://user:secret@gen-b:8001/v1"]},
            "reward_models": [{"name": "rm", "path": "/m"}, {"name": "prm", "path": "/p"}],
        }
    )


def test_initialise_creates_every_known_series_at_zero() -> None:
    metrics = Metrics()
    get = metrics.registry.get_sample_value
    assert get("bon_worker_restarts_total", {"model": "rm"}) is None  # absent before
    metrics.initialise(_config())
    for model in ("rm", "prm"):
        assert get("bon_worker_restarts_total", {"model": model}) == 0
        assert get("bon_workers_up", {"model": model}) == 0
        assert get("bon_score_queue_wait_seconds_count", {"model": model}) == 0
        assert get("bon_reward_bucket", {"model": model, "le": "+Inf"}) == 0
    for upstream in ("gen-a:8000", "gen-b:8001"):  # host:port, never the credentials
        for kind in UPSTREAM_ERROR_KINDS:
            assert get("bon_upstream_errors_total", {"upstream": upstream, "kind": kind}) == 0
        assert get("bon_upstream_call_duration_seconds_count", {"upstream": upstream}) == 0
    assert "secret" not in metrics.render().decode()
    for outcome in CANDIDATE_OUTCOMES:
        assert get("bon_candidates_total", {"outcome": outcome}) == 0
    assert get("bon_requests_total", {"api": "chat_completions", "status": "503"}) == 0
    assert get("bon_requests_total", {"api": "grpc_generate", "status": "UNAVAILABLE"}) == 0
    assert get("bon_requests_in_flight", {"api": "grpc_score"}) == 0
    assert get("bon_phase_duration_seconds_count", {"phase": "score"}) == 0


def test_initialise_keeps_values_already_recorded() -> None:
    metrics = Metrics()
    metrics.workers_up.labels("rm").set(2)
    metrics.worker_restarts.labels("rm").inc()
    metrics.initialise(_config())
    metrics.initialise(_config())
    get = metrics.registry.get_sample_value
    assert get("bon_workers_up", {"model": "rm"}) == 2
    assert get("bon_worker_restarts_total", {"model": "rm"}) == 1


def _backend_config() -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "reward_models": [
                {"name": "rm", "path": "/m"},
                {
                    "name": "rm-s",
                    "path": "/m",
                    "backend": "sglang",
                    "backend_urls": ["http://s-a:30000", "http://user:secret@s-b:30001"],
                },
            ]
        }
    )


def test_initialise_creates_the_backend_server_series_at_zero() -> None:
    metrics = Metrics()
    get = metrics.registry.get_sample_value
    assert get("bon_backend_server_up", {"model": "rm-s", "server": "s-a:30000"}) is None
    metrics.initialise(_backend_config())
    for server in ("s-a:30000", "s-b:30001"):  # host:port, never the credentials
        labels = {"model": "rm-s", "server": server}
        assert get("bon_backend_server_up", labels) == 0
        assert get("bon_backend_server_in_flight", labels) == 0
        assert get("bon_backend_server_request_duration_seconds_count", labels) == 0
        assert get("bon_backend_server_request_duration_seconds_bucket", {**labels, "le": "+Inf"}) == 0
        for kind in BACKEND_ERROR_KINDS:
            assert get("bon_backend_server_errors_total", {**labels, "kind": kind}) == 0
    assert get("bon_backend_server_up", {"model": "rm", "server": "s-a:30000"}) is None  # workers: none
    assert "secret" not in metrics.render().decode()


def _server(up: bool, calls: int, errors: int, in_flight: int = 0) -> pb.BackendServer:
    counts = [0] * (len(BACKEND_LATENCY_BUCKETS) + 1)
    counts[2] = calls  # 0.025 s bucket
    return pb.BackendServer(
        model="rm-s",
        server="s-a:30000",
        up=up,
        in_flight=in_flight,
        calls=calls,
        latency_counts=counts,
        latency_sum=0.02 * calls,
        errors={"http_5xx": errors},
    )


def test_backend_server_figures_add_over_workers_and_restarts() -> None:
    metrics = Metrics()
    metrics.initialise(_backend_config())
    get = metrics.registry.get_sample_value
    labels = {"model": "rm-s", "server": "s-a:30000"}
    worker_a, worker_b = object(), object()
    metrics.backend_servers.record(worker_a, 100, [_server(True, 5, 1, in_flight=2)])
    metrics.backend_servers.record(worker_b, 200, [_server(False, 3, 2, in_flight=1)])
    assert get("bon_backend_server_up", labels) == 1  # one worker has it in rotation
    assert get("bon_backend_server_in_flight", labels) == 3
    assert get("bon_backend_server_request_duration_seconds_count", labels) == 8
    assert get("bon_backend_server_request_duration_seconds_bucket", {**labels, "le": "0.01"}) == 0
    assert get("bon_backend_server_request_duration_seconds_bucket", {**labels, "le": "0.025"}) == 8
    assert get("bon_backend_server_errors_total", {**labels, "kind": "http_5xx"}) == 3
    # worker a restarts (a new pid counting from 0): what it counted stays
    metrics.backend_servers.record(worker_a, 101, [_server(True, 1, 0)])
    assert get("bon_backend_server_request_duration_seconds_count", labels) == 9
    assert get("bon_backend_server_errors_total", {**labels, "kind": "http_5xx"}) == 3
    # a worker that is down: its view of the server no longer counts as up
    metrics.backend_servers.not_serving(worker_a)
    assert get("bon_backend_server_up", labels) == 0
    assert get("bon_backend_server_in_flight", labels) == 1
