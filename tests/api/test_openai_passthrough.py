"""OpenAI fields through the gateway (issue 13, finding 6): tool calling, logprobs and the
other fields the gateway passes on, with the official openai SDK over real HTTP, a
FakeUpstream whose candidates call tools, FakeScorer rewards on what the reward model
reads (a tool call rendered into the assistant turn). What cannot work is a 400."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.fakes import FakeScorer, FakeUpstream, ServedGateway, gateway_config
from tests.fakes.sse import fake_logprob, tokens_of

pytestmark = pytest.mark.integration

TEXTS = ("Paris.", "CALLS A TOOL", "London.", "I am not sure.")
ARGUMENTS = '{"city": "Paris", "unit": "celsius"}'
# What the reward model reads of candidate 1 (types.scoring_text): the Hermes / Qwen2.5 form.
RENDERED_CALL = (
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}</tool_call>'
)
REWARDS = {"Paris.": 1.0, RENDERED_CALL: 5.0, "London.": -1.0, "I am not sure.": 0.0}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"],
            },
        },
    }
]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(TEXTS) as server:
        server.tool_calls = {1: [("get_weather", ARGUMENTS)]}
        yield server


@pytest.fixture(scope="module")
def scorer() -> FakeScorer:
    return FakeScorer(REWARDS)


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream, scorer: FakeScorer) -> Iterator[ServedGateway]:
    with ServedGateway(gateway_config(upstream.url, max_best_of=16), scorer) as served:
        yield served


@pytest.fixture
def client(gateway: ServedGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=30)


def _calls_since(upstream: FakeUpstream, before: int) -> list[dict[str, Any]]:
    return upstream.requests[before:]


def test_tools_reach_the_upstream_and_the_tool_call_wins(
    client: openai.OpenAI, upstream: FakeUpstream, scorer: FakeScorer
) -> None:
    before = len(upstream.requests)
    tool_choice: Any = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(
        model="fake-generator",
        messages=QUESTION,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice=tool_choice,
        parallel_tool_calls=False,
        seed=0,
        extra_body={"best_of": 4},
    )
    sent = _calls_since(upstream, before)
    assert len(sent) == 4
    for body in sent:
        assert body["tools"] == TOOLS
        assert body["tool_choice"] == tool_choice
        assert body["parallel_tool_calls"] is False
    best = reply.choices[0]
    assert best.finish_reason == "tool_calls"
    assert best.message.content is None
    assert best.message.tool_calls is not None and len(best.message.tool_calls) == 1
    call = best.message.tool_calls[0]
    assert call.type == "function" and call.id == "call_0"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    # The arguments came in two deltas: assembled, byte for byte.
    assert call.function.arguments == ARGUMENTS  # type: ignore[union-attr]
    assert best.model_extra is not None and best.model_extra["reward"] == 5.0
    # Scored as its whole assistant message: the rendered call is what the reward model read.
    assert any(RENDERED_CALL in c.candidates for c in scorer.calls)


def test_the_standard_next_turn_with_tool_calls_and_a_tool_message(
    client: openai.OpenAI, upstream: FakeUpstream, scorer: FakeScorer
) -> None:
    history: list[Any] = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ARGUMENTS},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": '{"temperature": 21}'},
    ]
    before = len(upstream.requests)
    groups = len(scorer.groups)
    reply = client.chat.completions.create(
        model="fake-generator",
        messages=history,
        tools=TOOLS,
        seed=0,
        extra_body={"best_of": 4},  # type: ignore[arg-type]
    )
    assert reply.choices[0].message.tool_calls is not None  # the fake calls again: it still wins
    for body in _calls_since(upstream, before):
        # The history reaches the upstream unchanged: null content, the calls, the call id.
        assert body["messages"] == history
    # The reward model reads the earlier call as the assistant turn's text.
    [group] = scorer.groups[groups:]
    assert [(m.role, m.content) for m in group.messages] == [
        ("user", QUESTION[0]["content"]),
        ("assistant", RENDERED_CALL),
        ("tool", '{"temperature": 21}'),
    ]


def test_streamed_tool_calls_assemble_in_the_sdk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fake-generator",
        messages=QUESTION,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        seed=0,
        stream=True,
        extra_body={"best_of": 4},
    )
    names, arguments, reasons = [], [], []
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or ():
                if call.function is not None:
                    names.append(call.function.name or "")
                    arguments.append(call.function.arguments or "")
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert "".join(names) == "get_weather"
    assert json.loads("".join(arguments)) == json.loads(ARGUMENTS)
    assert reasons == ["tool_calls"]


def test_best_of_one_streams_live_and_still_carries_the_call(
    client: openai.OpenAI, upstream: FakeUpstream
) -> None:
    # best_of 1: the only candidate streams as it is generated; its calls close it.
    stream = client.chat.completions.create(
        model="fake-generator",
        messages=QUESTION,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        seed=1,
        stream=True,
        extra_body={"best_of": 1},
    )
    calls = [call for chunk in stream for c in chunk.choices for call in c.delta.tool_calls or ()]
    assert [c.function.name for c in calls if c.function is not None] == ["get_weather"]


def test_other_openai_fields_pass_through_unchanged(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    before = len(upstream.requests)
    response_format: Any = {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
        },
    }
    client.chat.completions.create(
        model="fake-generator",
        messages=QUESTION,  # type: ignore[arg-type]
        seed=0,
        stop=["\n\n", "END"],
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        logit_bias={"42": -100},
        user="user-7",
        response_format=response_format,
        tool_choice="none",
        tools=TOOLS,  # type: ignore[arg-type]
        extra_body={"best_of": 2, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1},
    )
    for body in _calls_since(upstream, before):
        assert body["stop"] == ["\n\n", "END"]
        assert body["presence_penalty"] == 0.5 and body["frequency_penalty"] == -0.25
        assert body["logit_bias"] == {"42": -100}
        assert body["user"] == "user-7"
        assert body["response_format"] == response_format
        assert body["tool_choice"] == "none"
        assert body["top_k"] == 20 and body["min_p"] == 0.05 and body["repetition_penalty"] == 1.1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("functions", [{"name": "f", "parameters": {}}]),
        ("function_call", "auto"),
        ("modalities", ["text", "audio"]),
    ],
)
def test_fields_best_of_n_cannot_honour_are_a_400_naming_them(
    gateway: ServedGateway, upstream: FakeUpstream, field: str, value: Any
) -> None:
    before = len(upstream.requests)
    body = {"model": "fake-generator", "messages": QUESTION, "best_of": 2, field: value}
    reply = httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == field
    assert len(upstream.requests) == before


def test_echo_on_completions_is_a_400_and_defaults_spelled_out_are_fine(
    gateway: ServedGateway, upstream: FakeUpstream
) -> None:
    url = f"{gateway.base_url}/completions"
    echoed = httpx.post(url, json={"prompt": "Hi", "best_of": 2, "echo": True}, timeout=30)
    assert echoed.status_code == 400 and echoed.json()["error"]["param"] == "echo"
    plain = {"prompt": "Hi", "best_of": 2, "echo": False, "logprobs": None, "prediction": None}
    assert httpx.post(url, json=plain, timeout=30).status_code == 200
    chat = {"messages": QUESTION, "best_of": 2, "logprobs": False, "top_logprobs": 0}
    assert httpx.post(f"{gateway.base_url}/chat/completions", json=chat, timeout=30).status_code == 200


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "user", "content": None}, "messages[1].content"),
        (
            {
                "role": "user",
                "content": "x",
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            "messages[1].tool_calls",
        ),
    ],
)
def test_tool_history_mistakes_are_a_400_naming_the_field(
    gateway: ServedGateway, upstream: FakeUpstream, message: dict[str, Any], param: str
) -> None:
    before = len(upstream.requests)
    body = {"messages": [*QUESTION, message], "best_of": 2}
    reply = httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=30)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    assert len(upstream.requests) == before


# -- logprobs: each candidate's, from the upstream's chunks ---------------------------------------

WINNER = "I am not sure."  # seed 2, best_of 2: "London." (-1) and this (0)


def test_chat_logprobs_come_back_with_the_winner(client: openai.OpenAI, upstream: FakeUpstream) -> None:
    before = len(upstream.requests)
    reply = client.chat.completions.create(
        model="fake-generator",
        messages=QUESTION,  # type: ignore[arg-type]
        seed=2,
        logprobs=True,
        top_logprobs=2,
        extra_body={"best_of": 2},
    )
    for body in _calls_since(upstream, before):
        assert body["logprobs"] is True and body["top_logprobs"] == 2
    best = reply.choices[0]
    assert best.message.content == WINNER
    assert best.logprobs is not None and best.logprobs.content is not None
    assert [t.token for t in best.logprobs.content] == tokens_of(WINNER)
    assert [t.logprob for t in best.logprobs.content] == [fake_logprob(t) for t in tokens_of(WINNER)]


def test_streamed_chat_logprobs_join_in_the_sdk(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="fake-generator",
        messages=QUESTION,  # type: ignore[arg-type]
        seed=2,
        logprobs=True,
        stream=True,
        extra_body={"best_of": 2},
    )
    tokens = [
        t.token
        for chunk in stream
        for choice in chunk.choices
        if choice.logprobs is not None
        for t in choice.logprobs.content or ()
    ]
    assert tokens == tokens_of(WINNER)


def test_completion_logprobs_come_back_with_the_winner(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model="fake-generator", prompt="Weather?", seed=2, logprobs=1, extra_body={"best_of": 2}
    )
    best = reply.choices[0]
    assert best.text == WINNER
    assert best.logprobs is not None and best.logprobs.tokens == tokens_of(WINNER)
    assert best.logprobs.token_logprobs == [fake_logprob(t) for t in tokens_of(WINNER)]
