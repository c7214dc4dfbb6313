"""Admission: every check a request gets, once, before any work; field names are the HTTP API's."""

from __future__ import annotations

import pytest

from bon_gateway.config import ServerConfig
from bon_gateway.engine.admission import Admission
from bon_gateway.errors import InvalidRequest, Unavailable
from bon_gateway.types import BonRequest, Message, RawInput, SamplingParams, ScoreRequest, ToolCall

USER = (Message("user", "What is 2 + 2?"),)


def admission(models: tuple[str, ...] = ("rm", "prm"), **server: object) -> Admission:
    config = ServerConfig.model_validate(
        {"max_best_of": 8, "limits": {"max_messages": 3, "max_prompt_chars": 100, "max_tokens": 64}, **server}
    )
    return Admission(config, lambda: models)


def refused(request: BonRequest) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        admission().admit_bon(request)
    return caught.value


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (BonRequest(USER, best_of=0), "best_of"),
        (BonRequest(USER, best_of=9), "best_of"),
        (BonRequest(USER, best_of=2, n=3), "n"),
        (BonRequest(USER, best_of=2, min_candidates=3), "min_candidates"),
        (BonRequest((), best_of=2), "messages"),
        (BonRequest((Message("robot", "hi"),)), "messages[0].role"),
        (BonRequest((Message("", "hi"),)), "messages[0].role"),
        (BonRequest(USER * 4), "messages"),
        (BonRequest((Message("user", "x" * 200),)), "messages"),
        (BonRequest((), prompt="x" * 200), "prompt"),
        (BonRequest(USER, sampling=SamplingParams(temperature=-0.1)), "temperature"),
        (BonRequest(USER, sampling=SamplingParams(temperature=float("nan"))), "temperature"),
        (BonRequest(USER, sampling=SamplingParams(top_p=0.0)), "top_p"),
        (BonRequest(USER, sampling=SamplingParams(top_p=1.5)), "top_p"),
        (BonRequest(USER, sampling=SamplingParams(max_tokens=0)), "max_tokens"),
        (BonRequest(USER, sampling=SamplingParams(max_tokens=65)), "max_tokens"),
        (BonRequest(USER, sampling=SamplingParams(stop=("s" * 101,))), "stop"),
        (BonRequest(USER, reward_model="nope"), "reward_model"),
    ],
)
def test_bad_best_of_n_requests_name_the_field(request_: BonRequest, param: str) -> None:
    assert refused(request_).param == param


def test_limits_errors_name_the_config_key() -> None:
    assert (
        "server.limits.max_tokens"
        in refused(BonRequest(USER, sampling=SamplingParams(max_tokens=65))).message
    )
    assert "server.limits.max_messages" in refused(BonRequest(USER * 4)).message


def test_an_admitted_request_carries_its_reward_model_and_scoring_messages() -> None:
    chat = admission().admit_bon(BonRequest(USER, best_of=4, reward_model="prm"))
    assert chat.reward_model == "prm" and chat.scoring_messages == USER
    plain = admission().admit_bon(BonRequest((), prompt="Once upon", best_of=2))
    assert plain.reward_model == "rm"  # the first configured model by default
    assert plain.scoring_messages == (Message("user", "Once upon"),)


def test_no_reward_model_configured_is_unavailable() -> None:
    with pytest.raises(Unavailable):
        admission(models=()).admit_bon(BonRequest(USER))


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (ScoreRequest(USER), "candidates"),
        (ScoreRequest((), candidates=("a",)), "messages"),
        (ScoreRequest(USER, candidates=("a",), steps=(("a",),)), "steps"),
        (ScoreRequest(USER, candidates=("a",) * 300), "candidates"),
        (ScoreRequest(USER, candidates=("x" * 401,)), "candidates"),
        (ScoreRequest(USER, candidates=("a",), reward_model="nope"), "model"),
    ],
)
def test_bad_scoring_requests_name_the_field(request_: ScoreRequest, param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        admission().admit_score(request_)
    assert caught.value.param == param


def test_explicit_steps_are_scored_as_their_joined_text() -> None:
    admitted = admission().admit_score(ScoreRequest(USER, steps=(("a\n\n", "b"), ("c",))))
    assert admitted.texts == ("a\n\nb", "c") and admitted.reward_model == "rm"


# -- text and passthrough values (issue 13, finding 7): both fronts, before any work ----------


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (BonRequest((Message("user", "a\ud800b"),)), "messages[0].content"),
        (BonRequest((Message("user", "hi", name="\udfff"),)), "messages[0].name"),
        (BonRequest((), prompt="\ud83d"), "prompt"),
        (BonRequest(USER, sampling=SamplingParams(stop=("ok", "\ud800"))), "stop[1]"),
        (BonRequest(USER, model="m\ud800"), "model"),
        (
            BonRequest(USER, sampling=SamplingParams(extra={"presence_penalty": float("nan")})),
            "presence_penalty",
        ),
        (
            BonRequest(USER, sampling=SamplingParams(extra={"logit_bias": {"42": float("-inf")}})),
            "logit_bias",
        ),
        (
            BonRequest(
                USER,
                sampling=SamplingParams(
                    extra={"response_format": {"json_schema": {"x": [1.0, float("inf")]}}}
                ),
            ),
            "response_format.json_schema.x[1]",
        ),
        (BonRequest(USER, sampling=SamplingParams(extra={"tools": [{"d": "\ud800"}]})), "tools[0].d"),
    ],
)
def test_invalid_text_and_non_json_numbers_are_refused_naming_the_field(
    request_: BonRequest, param: str
) -> None:
    assert refused(request_).param == param


def test_passthrough_values_nested_too_deep_are_refused() -> None:
    deep: object = "leaf"
    for _ in range(1000):
        deep = [deep]
    error = refused(BonRequest(USER, sampling=SamplingParams(extra={"response_format": {"a": deep}})))
    assert error.param is not None and error.param.startswith("response_format.a")
    assert "nested deeper" in error.message
    shallow: object = "leaf"
    for _ in range(20):
        shallow = [shallow]
    admission().admit_bon(
        BonRequest(USER, sampling=SamplingParams(extra={"response_format": {"a": shallow}}))
    )


@pytest.mark.parametrize("count", [2**31, 57985071844])
def test_a_truncation_count_beyond_the_wire_int32_is_refused(count: int) -> None:
    # bench/fuzz_at_scale.py: POST /classify {"input": ..., "truncate_prompt_tokens": 57985071844}
    # was a 500 (ValueError building the worker's request); it is the client's 400.
    request_ = ScoreRequest((), raw=(RawInput(text="2 + 2 = 4"),), truncate_prompt_tokens=count)
    with pytest.raises(InvalidRequest) as caught:
        admission(("rm",)).admit_score(request_)
    assert caught.value.param == "truncate_prompt_tokens"
    largest = ScoreRequest((), raw=(RawInput(text="2 + 2 = 4"),), truncate_prompt_tokens=2**31 - 1)
    assert admission(("rm",)).admit_score(largest).request.truncate_prompt_tokens == 2**31 - 1


def test_scoring_inputs_with_lone_surrogates_are_refused() -> None:
    for request_, param in (
        (ScoreRequest(USER, candidates=("fine", "bad\ud800")), "candidates[1]"),
        (ScoreRequest(USER, steps=(("a", "\udc00"),)), "steps[0][1]"),
        (ScoreRequest((Message("user", "\ud800"),), candidates=("x",)), "messages[0].content"),
    ):
        with pytest.raises(InvalidRequest) as caught:
            admission().admit_score(request_)
        assert caught.value.param == param


def test_the_reward_model_reads_tool_calls_in_the_assistant_turn() -> None:
    call = ToolCall("c1", "get_weather", '{"city": "Paris"}')
    chat = (
        Message("user", "Weather?"),
        Message("assistant", "", (call,)),
        Message("tool", "21 C", tool_call_id="c1"),
    )
    rendered = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    bon = admission(max_best_of=8).admit_bon(BonRequest(chat))
    assert [(m.role, m.content) for m in bon.scoring_messages] == [
        ("user", "Weather?"),
        ("assistant", rendered),
        ("tool", "21 C"),
    ]
    assert bon.request.messages == chat  # the upstream gets the turns as they came
    score = admission().admit_score(ScoreRequest(chat, candidates=("It is 21 C.",)))
    assert score.request.messages[1].content == rendered


def test_tool_calls_only_in_assistant_turns_and_with_a_name() -> None:
    call = ToolCall("c1", "f", "{}")
    assert refused(BonRequest((Message("user", "x", (call,)),))).param == "messages[0].tool_calls"
    nameless = ToolCall("c1", "", "{}")
    assert refused(BonRequest((Message("assistant", "", (nameless,)),))).param == (
        "messages[0].tool_calls[0].function.name"
    )
