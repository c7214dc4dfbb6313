"""The HTTP front through the official openai SDK and plain HTTP, against the
real served gateway (uvicorn on loopback) and a real fake upstream."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import httpx
import openai
import pytest

from tests.api.conftest import BEST, QUESTION, RANKED, REWARDS, TEXTS
from tests.fakes import FakeScorer, FakeUpstream, ServedGateway

pytestmark = pytest.mark.integration


@pytest.fixture
def client(gateway: ServedGateway) -> openai.OpenAI:
    # No retries: a retried 5xx would hide what the gateway answered first.
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=30)


def test_chat_returns_the_highest_reward_candidate_first(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="fake-generator", messages=QUESTION, seed=0, extra_body={"best_of": 4}
    )
    assert reply.object == "chat.completion"
    assert len(reply.choices) == 1
    best = reply.choices[0]
    assert best.message.content == BEST
    assert best.message.role == "assistant"
    assert best.finish_reason == "stop"
    assert best.model_extra is not None and best.model_extra["reward"] == REWARDS[BEST]
    assert reply.model_extra is not None
    assert reply.model_extra["reward_model"] == "fake-rm"
    assert reply.model_extra["candidates_dropped"] == 0
    assert "candidates" not in reply.model_extra
    assert reply.usage is not None and reply.usage.model_extra is not None
    assert reply.usage.model_extra["candidates_generated"] == 4
    # Usage sums every candidate's completion tokens (the fake counts words).
    assert reply.usage.completion_tokens == sum(len(t.split()) for t in TEXTS)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_n_choices_ranked_and_every_candidate_returned(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="fake-generator",
        messages=QUESTION,
        n=3,
        seed=0,
        extra_body={"best_of": 4, "return_candidates": True},
    )
    assert [c.message.content for c in reply.choices] == list(RANKED[:3])
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.model_extra["reward"] for c in reply.choices] == [REWARDS[t] for t in RANKED[:3]]  # type: ignore[index]
    # The PRM-style per-step rewards ride along only where the scorer gave some.
    assert reply.choices[0].model_extra["step_rewards"] == [0.5, 3.0]  # type: ignore[index]
    assert "step_rewards" not in reply.choices[1].model_extra  # type: ignore[operator]
    candidates = reply.model_extra["candidates"]  # type: ignore[index]
    assert [c["text"] for c in candidates] == list(RANKED)
    assert [c["rank"] for c in candidates] == [1, 2, 3, 4]
    # With seed 0, candidate i is TEXTS[i]: indices are generation order.
    assert all(TEXTS[c["index"]] == c["text"] for c in candidates)
    assert all(c["reward"] == REWARDS[c["text"]] for c in candidates)


def test_sampling_parameters_reach_the_upstream(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    before = len(upstream.requests)
    client.chat.completions.create(
        model="fake-generator",
        messages=QUESTION,
        seed=100,
        temperature=0.7,
        top_p=0.9,
        max_tokens=32,
        stop=["\n\n"],
        presence_penalty=0.5,
        extra_body={"best_of": 3, "top_k": 20},
    )
    calls = upstream.requests[before:]
    assert len(calls) == 3
    # One call per candidate with distinct seeds: upstreams ignore n.
    assert sorted(c["seed"] for c in calls) == [100, 101, 102]
    for call in calls:
        assert call["n"] == 1
        assert call["temperature"] == 0.7 and call["top_p"] == 0.9 and call["max_tokens"] == 32
        assert call["stop"] == ["\n\n"] and call["presence_penalty"] == 0.5 and call["top_k"] == 20
        assert call["messages"] == QUESTION


def test_best_of_defaults_to_the_configured_value(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    before = len(upstream.requests)
    reply = client.chat.completions.create(model="fake-generator", messages=QUESTION)
    assert len(upstream.requests) - before == 4  # server.default_best_of
    assert reply.usage is not None and reply.usage.model_extra["candidates_generated"] == 4  # type: ignore[index]


def test_streaming_through_the_sdk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fake-generator",
        messages=QUESTION,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"best_of": 4},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == BEST
    closing = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(closing) == 1 and closing[0].finish_reason == "stop"
    assert closing[0].model_extra["reward"] == REWARDS[BEST]  # type: ignore[index]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_streaming_ends_with_done(gateway: ServedGateway) -> None:
    body = {"messages": QUESTION, "stream": True, "n": 2, "best_of": 4}
    with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    # SSE comments (": ...") keep the connection alive while candidates are generated.
    assert all(line.startswith(("data: ", ": ")) for line in lines)
    assert lines[0].startswith(": ")


def test_completions_on_a_plain_prompt(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    before = len(upstream.requests)
    reply = client.completions.create(
        model="fake-generator", prompt="The capital of France is", seed=0, extra_body={"best_of": 4}
    )
    assert reply.object == "text_completion"
    assert reply.choices[0].text == BEST
    assert reply.choices[0].model_extra["reward"] == REWARDS[BEST]  # type: ignore[index]
    assert all(c["prompt"] == "The capital of France is" for c in upstream.requests[before:])


def test_models_lists_generator_and_reward_models(client: openai.OpenAI) -> None:
    models = {m.id: m.model_extra["kind"] for m in client.models.list()}  # type: ignore[index]
    assert models == {"fake-generator": "generator", "fake-rm": "reward"}


def test_rewards_in_input_order(gateway: ServedGateway, scorer: FakeScorer) -> None:
    # Eight answers of very different lengths, two unknown to the table (reward 0.0).
    candidates = [*TEXTS, "x" * 2000, "", "word " * 300, TEXTS[1] + " Indeed."]
    body = {"messages": QUESTION, "candidates": candidates}
    response = httpx.post(f"{gateway.base_url}/rewards", json=body, timeout=30)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["model"] == "fake-rm"
    assert [d["index"] for d in reply["data"]] == list(range(8))
    assert [d["reward"] for d in reply["data"]] == [REWARDS.get(c, 0.0) for c in candidates]
    assert reply["selected_index"] == 1
    assert reply["usage"]["prompt_tokens"] > 0
    assert reply["usage"]["total_tokens"] >= reply["usage"]["prompt_tokens"]
    assert scorer.calls[-1].candidates == tuple(candidates)


def test_rewards_with_activation_and_named_model(gateway: ServedGateway) -> None:
    body = {"model": "fake-rm", "messages": QUESTION, "candidates": [TEXTS[2]], "activation": "sigmoid"}
    reply = httpx.post(f"{gateway.base_url}/rewards", json=body, timeout=30).json()
    assert reply["data"][0]["reward"] == pytest.approx(1 / (1 + 2.718281828459045**2))


def test_health_and_readiness(gateway: ServedGateway, scorer: FakeScorer) -> None:
    assert httpx.get(f"{gateway.http_url}/health").status_code == 200
    assert httpx.get(f"{gateway.http_url}/ready").status_code == 200
    scorer.is_ready = False
    try:
        assert httpx.get(f"{gateway.http_url}/ready").status_code == 503
        assert httpx.get(f"{gateway.http_url}/health").status_code == 200
    finally:
        scorer.is_ready = True
    assert httpx.get(f"{gateway.http_url}/ready").status_code == 200


def _promtool() -> str:
    path = shutil.which("promtool") or ("/usr/bin/promtool" if os.path.exists("/usr/bin/promtool") else None)
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("promtool is required in CI (Debian package `prometheus`)")
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    return path


def test_metrics_pass_promtool_after_traffic(gateway: ServedGateway, client: openai.OpenAI) -> None:
    promtool = _promtool()
    client.chat.completions.create(model="fake-generator", messages=QUESTION, extra_body={"best_of": 2})
    httpx.post(f"{gateway.base_url}/chat/completions", json={"messages": []})
    # A request is counted once its response is sent: poll rather than race it.
    deadline = time.monotonic() + 5
    while True:
        response = httpx.get(f"{gateway.http_url}/metrics")
        if 'status="400"' in response.text or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    for needle in (
        'bon_requests_total{api="chat_completions",status="200"}',
        'bon_requests_total{api="chat_completions",status="400"}',
        'bon_request_duration_seconds_count{api="chat_completions"}',
        'bon_requests_in_flight{api="chat_completions"} 0.0',
        'bon_phase_duration_seconds_count{phase="generate"}',
        'bon_candidates_total{outcome="generated"}',
        "bon_upstream_requests_total{",
    ):
        assert needle in text, needle
    check = subprocess.run(
        [promtool, "check", "metrics"], input=response.content, capture_output=True, timeout=60
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_request_duration_is_recorded(gateway: ServedGateway, client: openai.OpenAI) -> None:
    histogram = gateway.metrics.request_duration.labels("models")
    before = histogram._sum.get()
    started = time.perf_counter()
    client.models.list()
    elapsed = time.perf_counter() - started
    # Recorded once the response is sent, which may be just after the client has it.
    deadline = time.monotonic() + 5
    while histogram._sum.get() == before:
        assert time.monotonic() < deadline, "no duration recorded"
        time.sleep(0.01)
    assert 0 < histogram._sum.get() - before < elapsed + 1.0
