"""Pure policy: retry waits, Retry-After parsing, payloads, balancing and ejection."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from bon_gateway.balancer import Balancer
from bon_gateway.generation.payload import BadResponse, build_payload, error_message, parse_choices
from bon_gateway.generation.retry import client_fault, parse_retry_after, retryable_status, validation_failure
from bon_gateway.retry import RetryPolicy
from bon_gateway.types import BonRequest, Message, SamplingParams


def test_backoff_is_exponential_with_full_jitter_and_capped() -> None:
    policy = RetryPolicy(retries=5, base_s=0.1, max_s=0.5)
    rng = random.Random(1)
    for attempt, cap in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.5), (5, 0.5)]:
        waits = [policy.delay(attempt, rng=rng) for _ in range(200)]
        assert 0 <= min(waits) and max(waits) <= cap
        assert max(waits) > cap * 0.8  # jitter spans the range


def test_retry_after_is_a_floor() -> None:
    policy = RetryPolicy(base_s=0.01, max_s=0.02)
    assert policy.delay(1, retry_after_s=1.5) == 1.5


def test_parse_retry_after() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = datetime(2026, 1, 1, tzinfo=UTC)
    later = format_datetime(now + timedelta(seconds=30), usegmt=True)
    assert parse_retry_after(later, now=now.timestamp()) == pytest.approx(30)


def test_status_classes() -> None:
    assert all(retryable_status(s) for s in (429, 500, 502, 503, 504, 408))
    assert not any(retryable_status(s) for s in (400, 401, 404, 422))
    assert client_fault(400) and client_fault(404) and client_fault(413) and client_fault(422)
    assert not client_fault(401) and not client_fault(403) and not client_fault(429)


def test_llama_cpp_validation_500s_are_the_clients_fault() -> None:
    # What llama-cpp-python answers for top_k = -5 (seen on the real server).
    message = "1 validation error:\n  {'type': 'greater_than_equal', 'loc': ('body', 'top_k')}"
    assert validation_failure(500, message)
    assert validation_failure(500, "7 validation errors:\n ...")
    assert not validation_failure(500, "CUDA out of memory")
    assert not validation_failure(503, message)


def test_payload_chat_and_completion() -> None:
    chat = BonRequest(
        messages=(Message("user", "hi"),), sampling=SamplingParams(temperature=0.5, stop=("x",))
    )
    path, body = build_payload(chat, "m", 7, 4)
    assert path == "/chat/completions"
    assert body["n"] == 4 and body["seed"] == 7 and body["stop"] == ["x"] and body["temperature"] == 0.5
    path, body = build_payload(BonRequest(messages=(), prompt="p"), "m", 1)
    assert path == "/completions" and body["prompt"] == "p" and body["n"] == 1


def test_parse_choices_orders_by_index_and_books_usage_once() -> None:
    data = {
        "choices": [{"index": 1, "text": "b"}, {"index": 0, "text": "a", "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 10},
    }
    gens = parse_choices(data, 2, 4)
    assert [(g.index, g.text) for g in gens] == [(2, "a"), (3, "b")]
    assert gens[0].finish_reason == "length"
    assert sum(g.completion_tokens for g in gens) == 10
    assert len(parse_choices(data, 0, 1)) == 1
    with pytest.raises(BadResponse):
        parse_choices({"choices": []}, 0, 1)
    with pytest.raises(BadResponse):
        parse_choices({"nope": 1}, 0, 1)


def test_error_message_shapes() -> None:
    assert error_message(b'{"error": {"message": "too long"}}') == "too long"
    assert error_message(b'{"error": "tgi says no"}') == "tgi says no"
    assert error_message(b'{"detail": "fastapi says no"}') == "fastapi says no"
    assert error_message(b"plain") == "plain"
    assert len(error_message(b"x" * 5000)) == 300


def test_error_messages_reach_clients_without_tracebacks_or_server_paths() -> None:
    raw = (
        "1 validation error:\n  {'loc': ('body', 'top_p'), 'msg': 'Input should be <= 1'}\n\n"
        '  File "/opt/server/.venv/lib/python3.11/site-packages/llama_cpp/server/app.py", line 376, in f\n'
        "    raise\n"
    )
    cleaned = error_message(json.dumps({"error": {"message": raw}}).encode())
    assert cleaned == "1 validation error: {'loc': ('body', 'top_p'), 'msg': 'Input should be <= 1'}"
    assert error_message(b"crashed in /srv/app/model.py") == "crashed in <path>"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_least_outstanding_requests() -> None:
    balancer = Balancer(["http://a:1/v1", "http://b:2/v1"], clock=Clock())
    a, b = balancer.endpoints
    assert (a.label, b.label) == ("a:1", "b:2")
    balancer.started(a)
    assert balancer.pick() is b
    balancer.started(b)
    balancer.started(b)
    assert balancer.pick() is a
    # Ties rotate instead of always landing on the first endpoint.
    balancer.finished(b, True)
    balancer.finished(b, True)
    balancer.finished(a, True)
    assert {balancer.pick().label for _ in range(4)} == {"a:1", "b:2"}


def test_ejection_cooldown_and_recovery() -> None:
    clock = Clock()
    balancer = Balancer(
        ["http://a:1/v1", "http://b:2/v1"], eject_after_failures=2, eject_cooldown_s=5, clock=clock
    )
    a, b = balancer.endpoints
    for _ in range(2):
        balancer.started(a)
        balancer.finished(a, False)
    assert not balancer.available(a)
    assert balancer.any_available()
    assert all(balancer.pick() is b for _ in range(5))
    # Everything ejected: still pick the one whose cooldown ends first.
    for _ in range(2):
        balancer.started(b)
        balancer.finished(b, False)
    assert balancer.pick() is a
    assert not balancer.any_available()  # the gateway reports not ready meanwhile
    clock.now += 5.1
    assert balancer.available(a) and balancer.available(b)
    assert balancer.any_available()
    balancer.started(a)
    balancer.finished(a, True)
    assert a.consecutive_failures == 0
    # A cancelled call says nothing about the upstream.
    balancer.started(a)
    balancer.finished(a, None)
    assert a.outstanding == 0 and a.consecutive_failures == 0


def test_pick_avoids_the_endpoint_that_just_failed() -> None:
    balancer = Balancer(["http://a:1/v1", "http://b:2/v1"], clock=Clock())
    a, b = balancer.endpoints
    assert all(balancer.pick(avoid=[a]) is b for _ in range(4))
    assert balancer.pick(avoid=[a, b]) in (a, b)
