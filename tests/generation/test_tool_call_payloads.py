"""Tool calling on the upstream side (issue 13, finding 6): the history's tool turns as
sent, tool-call deltas parsed, a whole (non-streamed) reply's calls as the one chunk it
amounts to, and what the reward model reads of a turn that calls tools."""

from __future__ import annotations

import json

from bon_gateway.generation.payload import build_payload, completion_as_chunk, parse_chunk
from bon_gateway.types import BonRequest, Generation, Message, SamplingParams, ToolCall, scoring_text

CALL = ToolCall("call_1", "get_weather", '{"city": "Paris"}')


def test_the_history_keeps_tool_calls_and_tool_call_ids() -> None:
    messages = (
        Message("user", "Weather?"),
        Message("assistant", "", (CALL,)),
        Message("tool", "21 C", tool_call_id="call_1"),
        Message("user", "Thanks", name="ann"),
    )
    tools = [{"type": "function", "function": {"name": "get_weather"}}]
    request = BonRequest(messages, sampling=SamplingParams(extra={"tools": tools, "tool_choice": "auto"}))
    _, body = build_payload(request, "m", seed=3)
    assert body["tools"] == tools and body["tool_choice"] == "auto"
    assert body["messages"] == [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "content": "21 C", "tool_call_id": "call_1"},
        {"role": "user", "content": "Thanks", "name": "ann"},
    ]


def test_tool_call_deltas_are_parsed_per_call() -> None:
    chunk = {
        "choices": [
            {
                "index": 1,
                "delta": {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "c0",
                            "type": "function",
                            "function": {"name": "f", "arguments": ""},
                        },
                        {"index": 1, "function": {"arguments": '{"a"'}},
                    ]
                },
                "finish_reason": None,
            }
        ]
    }
    [delta], usage = parse_chunk(chunk)
    assert usage is None and delta.index == 1 and delta.text == ""
    assert [(c.index, c.id, c.name, c.arguments) for c in delta.tool_calls] == [
        (0, "c0", "f", ""),
        (1, "", "", '{"a"'),
    ]


def test_a_whole_reply_that_calls_tools_is_one_chunk_with_its_calls() -> None:
    whole = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c0", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ]
    }
    [delta], _ = parse_chunk(completion_as_chunk(whole))
    assert delta.finish_reason == "tool_calls" and delta.text == ""
    assert [(c.index, c.id, c.name, c.arguments) for c in delta.tool_calls] == [(0, "c0", "f", "{}")]


def test_the_reward_model_reads_content_then_each_call() -> None:
    assert scoring_text("plain", ()) == "plain"
    rendered = scoring_text("Let me check.", (CALL, ToolCall("c2", "f", "not json")))
    first, second, third = rendered.split("\n")
    assert first == "Let me check."
    assert second == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert json.loads(third.removeprefix("<tool_call>").removesuffix("</tool_call>")) == {
        "name": "f",
        "arguments": "not json",
    }
    assert Generation(0, "", tool_calls=(CALL,)).scoring_text() == second
