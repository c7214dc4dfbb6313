"""One request pipeline: request metrics, the catch-all (once), the guard, then
FastAPI's router and one set of routes, for every request, streamed or not,
valid or not. The body is read once, by the route, and decoded as JSON the way
FastAPI decoded it."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import httpx
import pytest

from bon_gateway.api.guard import GuardMiddleware
from bon_gateway.api.http_app import RequestMetricsMiddleware, build_app
from bon_gateway.api.http_errors import CatchAllMiddleware
from bon_gateway.engine.engine import Engine
from bon_gateway.generation.upstream import UpstreamClient
from bon_gateway.metrics import Metrics
from tests.api.conftest import BEST, QUESTION, REWARDS
from tests.fakes import FakeScorer, ServedGateway, gateway_config

CHAT = {"messages": QUESTION, "best_of": 4, "seed": 0}


def _layers(app: Any) -> list[type]:
    """The ASGI layers a request goes through, outermost first, down to the router."""
    layers: list[type] = []
    stack = app.build_middleware_stack()
    while stack is not None and stack is not app.router:
        layers.append(type(stack))
        stack = getattr(stack, "app", None)
    return layers


def test_every_request_takes_one_pipeline_with_the_catch_all_once() -> None:
    # The old app had a hand-built fast path for two routes beside FastAPI, and a
    # second CatchAllMiddleware inside FastAPI's stack.
    config = gateway_config("http://127.0.0.1:9/v1")
    metrics = Metrics()
    engine = Engine(config, UpstreamClient(config.generator, metrics), FakeScorer(REWARDS), metrics)
    layers = _layers(build_app(engine, metrics))
    ours = [layer for layer in layers if layer.__module__.startswith("bon_gateway.")]
    assert ours == [RequestMetricsMiddleware, CatchAllMiddleware, GuardMiddleware]
    assert layers[:3] == ours  # in front of everything FastAPI builds
    # Starlette's ServerErrorMiddleware would answer a plain-text 500 before the catch-all.
    assert "ServerErrorMiddleware" not in {layer.__name__ for layer in layers}


def _post(gateway: ServedGateway, path: str, content: bytes, content_type: str | None) -> httpx.Response:
    headers = {} if content_type is None else {"content-type": content_type}
    return httpx.post(f"{gateway.base_url}{path}", content=content, headers=headers, timeout=30)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/completions", CHAT),
        ("/chat/completions", {**CHAT, "stream": True}),
        ("/rewards", {"messages": QUESTION, "candidates": ["a", "b"]}),
    ],
    ids=["chat", "chat-streamed", "rewards"],
)
def test_a_body_without_content_type_is_read_as_json_on_every_route(
    gateway: ServedGateway, path: str, body: dict[str, Any]
) -> None:
    # Before, only the non-streamed generate requests were (the fast path); the rest were 400s.
    response = _post(gateway, path, json.dumps(body).encode(), None)
    assert response.status_code == 200, response.text


@pytest.mark.integration
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_json_is_a_400_naming_the_content_type(
    gateway: ServedGateway, content_type: str
) -> None:
    response = _post(gateway, "/chat/completions", json.dumps(CHAT).encode(), content_type)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert "Content-Type" in error["message"] and content_type in error["message"]


@pytest.mark.integration
@pytest.mark.parametrize(
    ("content_type", "content"),
    [
        ("application/json; charset=utf-8", json.dumps(CHAT).encode()),
        ("APPLICATION/JSON", json.dumps(CHAT).encode()),
        ("application/vnd.bon+json", json.dumps(CHAT).encode()),
        ("application/json", json.dumps(CHAT).encode("utf-16")),  # Python's json reads UTF-16/32
        ("application/json", b"\xef\xbb\xbf" + json.dumps(CHAT).encode()),  # and a UTF-8 BOM
    ],
    ids=["charset", "upper-case", "plus-json", "utf-16", "utf-8-bom"],
)
def test_json_bodies_fastapi_read_are_still_read(
    gateway: ServedGateway, content_type: str, content: bytes
) -> None:
    response = _post(gateway, "/chat/completions", content, content_type)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == BEST


@pytest.mark.integration
@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "empty"),
        (b'{"messages": [', "malformed JSON body"),
        (b'{"messages": [{"role": "user", "content": "\xff"}]}', "not valid UTF-8"),
        (b"[1, 2]", "object"),
    ],
    ids=["empty", "truncated", "bad-utf-8", "not-an-object"],
)
def test_unreadable_bodies_are_a_400_saying_why(gateway: ServedGateway, content: bytes, words: str) -> None:
    response = _post(gateway, "/chat/completions", content, "application/json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None
    assert words in error["message"]


@pytest.mark.integration
def test_a_client_leaving_mid_body_is_a_499_and_gives_its_slot_back(gateway: ServedGateway) -> None:
    # Before, FastAPI read the half body as "There was an error parsing the body" (400).
    gone = gateway.metrics.requests.labels("chat_completions", "499")
    before = gone._value.get()
    with socket.create_connection(("127.0.0.1", gateway.http_port), timeout=10) as sock:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        sock.sendall(head + b"content-length: 1000\r\n\r\n" + b'{"messages": [')
        time.sleep(0.1)  # let the route start reading before the client goes
    deadline = time.monotonic() + 10
    while gone._value.get() == before:
        assert time.monotonic() < deadline, "the gateway did not record the client leaving"
        time.sleep(0.02)
    assert gateway.metrics.requests_in_flight.labels("chat_completions")._value.get() == 0
    assert (
        _post(gateway, "/chat/completions", json.dumps(CHAT).encode(), "application/json").status_code == 200
    )


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


@pytest.mark.integration
def test_openapi_documents_each_request_body_and_every_reference_resolves(gateway: ServedGateway) -> None:
    schema = httpx.get(f"{gateway.http_url}/openapi.json", timeout=10).json()
    components = schema["components"]["schemas"]
    required = {
        "/v1/chat/completions": ("ChatCompletionRequest", "messages"),
        "/v1/completions": ("CompletionRequest", "prompt"),
        "/v1/rewards": ("RewardsRequest", "messages"),
    }
    for path, (model, field) in required.items():
        body = schema["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert field in components[model]["required"]
        assert "400" in schema["paths"][path]["post"]["responses"]
    assert "ChatMessageIn" in components and "TextPart" in components  # nested models too
    for ref in _refs(schema):
        assert ref.removeprefix("#/components/schemas/") in components, ref
