"""The fan-out against a real upstream: llama.cpp's OpenAI server
(llama-cpp-python) on SmolLM2-135M-Instruct. It ignores `n` (one choice back)
and serialises requests, so this is where top-up and auto detection must work.
One server for the module; small max_tokens keeps it quick on a CPU."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest

from bon_gateway.config import GatewayConfig
from bon_gateway.generation.upstream import UpstreamClient
from tests.fakes import FakeScorer, ServedGateway

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = [{"role": "user", "content": "Name a colour."}]
MAX_TOKENS = 6


def _config(url: str, mode: str) -> GatewayConfig:
    return GatewayConfig.model_validate(
        {
            "server": {
                "host": "127.0.0.1",
                "http_port": 0,
                "grpc_port": 0,
                "log_level": "WARNING",
                "request_timeout_s": 120,
            },
            "generator": {"url": url, "model": "smollm2", "timeout_s": 60, "mode": mode},
        }
    )


@pytest.fixture(scope="module", params=["parallel", "n", "auto"])
def gateway(request: pytest.FixtureRequest, llama_cpp_url: str) -> Iterator[ServedGateway]:
    with ServedGateway(_config(llama_cpp_url, request.param), FakeScorer(default_reward=0.0)) as served:
        yield served


def _client(gateway: ServedGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=120)


def _upstream_calls(gateway: ServedGateway) -> float:
    return gateway.metrics.registry.get_sample_value("bon_upstream_requests_total", {"status": "200"}) or 0.0


def _upstream(gateway: ServedGateway) -> UpstreamClient:
    assert gateway.engine is not None
    generator = gateway.engine.generator
    assert isinstance(generator, UpstreamClient)
    return generator


def _extra(obj: Any) -> dict[str, Any]:
    return obj.model_extra or {}


def test_chat(gateway: ServedGateway) -> None:
    mode = _upstream(gateway).config.mode
    before = _upstream_calls(gateway)
    reply = _client(gateway).chat.completions.create(
        model="smollm2",
        messages=QUESTION,
        max_tokens=MAX_TOKENS,
        temperature=0.9,
        seed=3,  # type: ignore[arg-type]
        extra_body={"best_of": 3, "return_candidates": True},
    )
    candidates = _extra(reply)["candidates"]
    assert len(candidates) == 3 and _extra(reply)["candidates_dropped"] == 0
    assert any(c["text"].strip() for c in candidates)
    assert reply.usage is not None
    assert _extra(reply.usage)["candidates_generated"] == 3
    # Summed over the three candidates, each at most MAX_TOKENS long.
    assert MAX_TOKENS < reply.usage.completion_tokens <= 3 * MAX_TOKENS
    calls = _upstream_calls(gateway) - before
    # llama.cpp answers one choice whatever n says: "n" and a first "auto" request
    # send one n=3 call and top up with two; parallel (and auto once it knows) send 3.
    assert calls == 3
    if mode == "auto":
        assert _upstream(gateway).endpoints[0].honours_n is False


def test_completions(gateway: ServedGateway) -> None:
    reply = _client(gateway).completions.create(
        model="smollm2",
        prompt="The sky is",
        max_tokens=MAX_TOKENS,
        temperature=0.9,
        seed=5,
        extra_body={"best_of": 2, "return_candidates": True},
    )
    assert len(_extra(reply)["candidates"]) == 2
    assert reply.choices[0].text == _extra(reply)["candidates"][0]["text"]
    assert reply.usage is not None and _extra(reply.usage)["candidates_generated"] == 2


def test_distinct_seeds_give_distinct_candidates(gateway: ServedGateway) -> None:
    reply = _client(gateway).completions.create(
        model="smollm2",
        prompt="My favourite animal is the",
        max_tokens=8,
        temperature=1.0,
        seed=11,
        extra_body={"best_of": 3, "return_candidates": True},
    )
    texts = [c["text"] for c in _extra(reply)["candidates"]]
    assert len(set(texts)) >= 2, texts


def test_streaming_through_the_sdk(gateway: ServedGateway) -> None:
    stream = _client(gateway).chat.completions.create(
        model="smollm2",
        messages=QUESTION,
        max_tokens=MAX_TOKENS,
        temperature=0.9,
        seed=7,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"best_of": 2, "return_candidates": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    summary = chunks[-1]
    assert summary.usage is not None and _extra(summary.usage)["candidates_generated"] == 2
    assert text == _extra(summary)["candidates"][0]["text"]


def test_context_length_is_a_400_with_llamacpp_message(gateway: ServedGateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _client(gateway).completions.create(
            model="smollm2", prompt="hello " * 3000, max_tokens=4, extra_body={"best_of": 2}
        )
    assert "context length" in caught.value.message
