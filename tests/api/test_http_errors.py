"""Bad input is a 400 naming the field, failures map to their statuses, and
the gateway keeps serving afterwards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from bon_gateway.errors import Overloaded, WorkerError
from tests.api.conftest import BEST, QUESTION, REWARDS, TEXTS
from tests.fakes import FakeScorer, FakeUpstream, ServedGateway, gateway_config, unused_port

pytestmark = pytest.mark.integration

GOOD = {"messages": QUESTION, "best_of": 4}
USER = {"role": "user", "content": "hi"}


def _post(gateway: ServedGateway, path: str, body: Any) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{gateway.base_url}{path}", content=content, headers={"content-type": "application/json"}, timeout=30
    )


def _assert_good_request_works(gateway: ServedGateway) -> None:
    response = _post(gateway, "/chat/completions", GOOD)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == BEST


BAD_INPUTS: list[tuple[str, str, Any, str | None]] = [
    ("malformed-json", "/chat/completions", b'{"messages": [', None),
    ("not-an-object", "/chat/completions", [1, 2], None),
    ("empty-body", "/chat/completions", b"", None),
    ("no-messages", "/chat/completions", {"best_of": 2}, "messages"),
    ("empty-messages", "/chat/completions", {"messages": []}, "messages"),
    ("messages-not-a-list", "/chat/completions", {"messages": "hello"}, "messages"),
    ("message-without-role", "/chat/completions", {"messages": [{"content": "hi"}]}, "messages[0].role"),
    (
        "message-without-content",
        "/chat/completions",
        {"messages": [USER, {"role": "user"}]},
        "messages[1].content",
    ),
    (
        "unknown-role",
        "/chat/completions",
        {"messages": [{"role": "wizard", "content": "hi"}]},
        "messages[0].role",
    ),
    (
        "content-wrong-type",
        "/chat/completions",
        {"messages": [{"role": "user", "content": 5}]},
        "messages[0].content",
    ),
    ("best-of-zero", "/chat/completions", {"messages": [USER], "best_of": 0}, "best_of"),
    ("best-of-negative", "/chat/completions", {"messages": [USER], "best_of": -3}, "best_of"),
    ("best-of-above-max", "/chat/completions", {"messages": [USER], "best_of": 17}, "best_of"),
    ("best-of-string", "/chat/completions", {"messages": [USER], "best_of": "four"}, "best_of"),
    ("best-of-float", "/chat/completions", {"messages": [USER], "best_of": 2.5}, "best_of"),
    ("n-above-best-of", "/chat/completions", {"messages": [USER], "best_of": 2, "n": 3}, "n"),
    ("n-zero", "/chat/completions", {"messages": [USER], "n": 0}, "n"),
    (
        "min-candidates-above-best-of",
        "/chat/completions",
        {"messages": [USER], "best_of": 2, "min_candidates": 3},
        "min_candidates",
    ),
    (
        "unknown-reward-model",
        "/chat/completions",
        {"messages": [USER], "reward_model": "nope"},
        "reward_model",
    ),
    ("unknown-selection", "/chat/completions", {"messages": [USER], "selection": "best"}, "selection"),
    (
        "temperature-wrong-type",
        "/chat/completions",
        {"messages": [USER], "temperature": "hot"},
        "temperature",
    ),
    ("temperature-negative", "/chat/completions", {"messages": [USER], "temperature": -1}, "temperature"),
    ("top-p-above-one", "/chat/completions", {"messages": [USER], "top_p": 1.5}, "top_p"),
    ("max-tokens-zero", "/completions", {"prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("stream-wrong-type", "/chat/completions", {"messages": [USER], "stream": "yes"}, "stream"),
    ("completions-no-prompt", "/completions", {"best_of": 2}, "prompt"),
    ("completions-two-prompts", "/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("completions-best-of-zero", "/completions", {"prompt": "a", "best_of": 0}, "best_of"),
    ("rewards-no-candidates", "/rewards", {"messages": [USER]}, "candidates"),
    ("rewards-empty-candidates", "/rewards", {"messages": [USER], "candidates": []}, "candidates"),
    (
        "rewards-candidate-wrong-type",
        "/rewards",
        {"messages": [USER], "candidates": ["a", 2]},
        "candidates[1]",
    ),
    ("rewards-empty-messages", "/rewards", {"messages": [], "candidates": ["a"]}, "messages"),
    (
        "rewards-unknown-model",
        "/rewards",
        {"model": "nope", "messages": [USER], "candidates": ["a"]},
        "model",
    ),
    (
        "rewards-unknown-activation",
        "/rewards",
        {"messages": [USER], "candidates": ["a"], "activation": "relu"},
        "activation",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "param"), [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_input_is_a_400_naming_the_field(
    gateway: ServedGateway, path: str, body: Any, param: str | None
) -> None:
    response = _post(gateway, path, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    if param is not None:
        assert param.split("[")[0] in error["message"]
    _assert_good_request_works(gateway)


def test_malformed_json_says_so(gateway: ServedGateway) -> None:
    error = _post(gateway, "/chat/completions", b"{nope").json()["error"]
    assert "malformed JSON" in error["message"] and error["code"] == "invalid_json"


def test_the_sdk_sees_a_bad_request_error(gateway: ServedGateway) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="m", messages=QUESTION, extra_body={"best_of": 1000})
    assert caught.value.status_code == 400
    assert caught.value.param == "best_of"  # type: ignore[attr-defined]


def test_unknown_route_is_a_404_in_openai_shape(gateway: ServedGateway) -> None:
    response = httpx.get(f"{gateway.base_url}/nowhere")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


@pytest.fixture
def scorer_fault(scorer: FakeScorer) -> Iterator[FakeScorer]:
    yield scorer
    scorer.error = None
    scorer.crash = None


def test_worker_failure_is_a_503(gateway: ServedGateway, scorer_fault: FakeScorer) -> None:
    scorer_fault.error = WorkerError("all reward workers are down")
    response = _post(gateway, "/chat/completions", GOOD)
    assert response.status_code == 503
    assert response.json()["error"]["message"] == "all reward workers are down"
    scorer_fault.error = None
    _assert_good_request_works(gateway)


def test_overload_is_a_429_with_retry_after(gateway: ServedGateway, scorer_fault: FakeScorer) -> None:
    scorer_fault.error = Overloaded("scoring queue full", retry_after_s=2.5)
    response = _post(gateway, "/rewards", {"messages": QUESTION, "candidates": ["a"]})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.json()["error"]["type"] == "overloaded"


def test_unexpected_error_is_a_bare_500(gateway: ServedGateway, scorer_fault: FakeScorer) -> None:
    scorer_fault.crash = RuntimeError("secret detail /srv/models/key.txt")
    response = _post(gateway, "/chat/completions", GOOD)
    assert response.status_code == 500
    assert "secret" not in response.text and "Traceback" not in response.text
    assert response.json()["error"]["message"] == "internal server error"
    scorer_fault.crash = None
    _assert_good_request_works(gateway)
    metrics = httpx.get(f"{gateway.http_url}/metrics").text
    assert 'bon_requests_total{api="chat_completions",status="500"}' in metrics


def test_failing_upstream_is_a_503_with_the_reason(gateway: ServedGateway, upstream: FakeUpstream) -> None:
    upstream.fail_status = 500
    try:
        response = _post(gateway, "/chat/completions", GOOD)
    finally:
        upstream.fail_status = None
    assert response.status_code == 503
    assert "upstream_error" in response.json()["error"]["message"]
    _assert_good_request_works(gateway)


def test_min_candidates_tolerates_failed_candidates(gateway: ServedGateway, upstream: FakeUpstream) -> None:
    upstream.fail_seeds = {1}  # the best answer (seed 1 = TEXTS[1]) never arrives
    try:
        body = {"messages": QUESTION, "best_of": 4, "seed": 0, "min_candidates": 3, "return_candidates": True}
        response = _post(gateway, "/chat/completions", body)
    finally:
        upstream.fail_seeds = set()
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["candidates_dropped"] == 1
    assert reply["choices"][0]["message"]["content"] == TEXTS[0]
    assert reply["choices"][0]["reward"] == REWARDS[TEXTS[0]]
    assert len(reply["candidates"]) == 3


def test_upstream_down_is_a_503_and_unavailable() -> None:
    port = unused_port()
    scorer = FakeScorer(REWARDS)
    with ServedGateway(gateway_config(f"http://127.0.0.1:{port}/v1"), scorer) as gateway:
        response = _post(gateway, "/chat/completions", GOOD)
        assert response.status_code == 503
        error = response.json()["error"]
        assert "connect_error" in error["message"]
        assert error["type"] == "unavailable"
        # Scoring does not need the upstream.
        assert _post(gateway, "/rewards", {"messages": QUESTION, "candidates": ["a"]}).status_code == 200


def test_slow_upstream_is_a_504(upstream: FakeUpstream) -> None:
    with ServedGateway(gateway_config(upstream.url, request_timeout_s=0.3), FakeScorer(REWARDS)) as gateway:
        upstream.delay_s = 2.0
        try:
            response = _post(gateway, "/chat/completions", GOOD)
        finally:
            upstream.delay_s = 0.0
        assert response.status_code == 504
        assert response.json()["error"]["type"] == "deadline_exceeded"
        _assert_good_request_works(gateway)


def test_client_hang_up_cancels_the_request(gateway: ServedGateway, upstream: FakeUpstream) -> None:
    gone = gateway.metrics.requests.labels("chat_completions", "499")
    before = gone._value.get()
    upstream.delay_s = 60.0
    mark = upstream.mark()
    try:
        with pytest.raises(httpx.ReadTimeout):
            _post_with_timeout(gateway, GOOD, timeout_s=0.3)
        # The gateway notices the hang-up and drops the work: it counts a 499 and closes
        # its upstream calls, which the upstream would answer only after 60 s.
        assert upstream.wait_until(lambda: gone._value.get() > before, timeout_s=30), "no 499 counted"
        assert upstream.wait_until(lambda: upstream.all_hung_up_since(mark), timeout_s=30), (
            "the gateway kept working for a client that left"
        )
    finally:
        upstream.delay_s = 0.0
    assert gateway.metrics.requests_in_flight.labels("chat_completions")._value.get() == 0
    _assert_good_request_works(gateway)


def _post_with_timeout(gateway: ServedGateway, body: Any, timeout_s: float) -> httpx.Response:
    return httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=timeout_s)
