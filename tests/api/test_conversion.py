"""Schemas -> engine types, errors -> statuses: pure functions, no server."""

from __future__ import annotations

import grpc
import pytest
from pydantic import ValidationError

from bon_gateway.api import grpc_convert
from bon_gateway.api.grpc_service import grpc_status
from bon_gateway.api.http_errors import describe_validation_errors, http_status, request_field_names
from bon_gateway.api.openai_schema import ChatCompletionRequest, CompletionRequest, RewardsRequest
from bon_gateway.errors import (
    BonError,
    DeadlineExceeded,
    InvalidRequest,
    Overloaded,
    Unauthenticated,
    Unavailable,
    UpstreamError,
    WorkerError,
)
from bon_gateway.types import Message
from bon_gateway.v1 import best_of_n_pb2 as pb

USER = {"role": "user", "content": "hi"}


def test_chat_request_converts_to_a_bon_request() -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "2+2"}, {"type": "text", "text": "?"}]},
            ],
            "best_of": 8,
            "n": 2,
            "stop": "\n",
            "temperature": 0.5,
            "max_tokens": 10,
            "max_completion_tokens": 20,
            "frequency_penalty": 0.1,
            "user": "someone",  # an OpenAI field the gateway does not interpret: passed through
            "metadata": {"k": "v"},  # OpenAI platform bookkeeping: ignored
            "return_candidates": True,
            "min_candidates": 6,
            "selection": "weighted_vote",
            "aggregation": "min",
        }
    )
    bon = body.to_bon_request(default_best_of=4)
    assert bon.messages == (Message("system", "be brief"), Message("user", "2+2?"))
    assert (bon.model, bon.best_of, bon.n, bon.min_candidates) == ("m", 8, 2, 6)
    assert bon.sampling.stop == ("\n",) and bon.sampling.temperature == 0.5
    assert bon.sampling.max_tokens == 20  # max_completion_tokens wins, as in OpenAI's API
    assert bon.sampling.extra == {"frequency_penalty": 0.1, "user": "someone"}
    assert (bon.selection, bon.aggregation, bon.return_candidates) == ("weighted_vote", "min", True)


def test_best_of_defaults_to_config_but_at_least_n() -> None:
    body = ChatCompletionRequest.model_validate({"messages": [USER]})
    assert body.to_bon_request(4).best_of == 4
    body = ChatCompletionRequest.model_validate({"messages": [USER], "n": 6})
    assert body.to_bon_request(4).best_of == 6


def test_completion_prompt_list_of_one() -> None:
    assert CompletionRequest.model_validate({"prompt": ["x"]}).to_bon_request(4).prompt == "x"
    with pytest.raises(InvalidRequest) as caught:
        CompletionRequest.model_validate({"prompt": ["x", "y"]}).to_bon_request(4)
    assert caught.value.param == "prompt"


def test_rewards_request_converts_steps() -> None:
    score = RewardsRequest.model_validate(
        {"messages": [USER], "steps": [["a", "b"], ["c"]], "activation": "sigmoid"}
    ).to_score_request()
    assert score.steps == (("a", "b"), ("c",)) and score.candidates == ()
    assert score.activation == "sigmoid" and score.reward_model is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages[0].content[0].text"),
        ({"messages": [USER], "stop": 5}, "stop"),
        ({"messages": [USER], "best_of": True}, "best_of"),
    ],
)
def test_validation_errors_name_the_client_field(body: dict[str, object], param: str) -> None:
    names = request_field_names([ChatCompletionRequest])
    with pytest.raises(ValidationError) as caught:
        ChatCompletionRequest.model_validate(body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in caught.value.errors()]
    found, message, _ = describe_validation_errors(errors, names)
    assert found == param
    assert message.startswith(param)


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InvalidRequest("x", param="n"), 400, grpc.StatusCode.INVALID_ARGUMENT),
        (Unauthenticated("x"), 401, grpc.StatusCode.UNAUTHENTICATED),
        (Overloaded("x"), 429, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (Unavailable("x"), 503, grpc.StatusCode.UNAVAILABLE),
        (UpstreamError("x"), 503, grpc.StatusCode.UNAVAILABLE),
        (WorkerError("x"), 503, grpc.StatusCode.UNAVAILABLE),
        (DeadlineExceeded("x"), 504, grpc.StatusCode.DEADLINE_EXCEEDED),
        (BonError("x"), 500, grpc.StatusCode.INTERNAL),
    ],
)
def test_one_mapping_per_front(error: BonError, status: int, code: grpc.StatusCode) -> None:
    assert http_status(error) == status
    assert grpc_status(error) == code


def test_proto_zero_values_mean_defaults() -> None:
    bon = grpc_convert.bon_request_from_proto(
        pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")]), default_best_of=4
    )
    assert (bon.best_of, bon.n, bon.min_candidates, bon.reward_model, bon.model) == (4, 1, None, None, None)
    assert (bon.selection, bon.aggregation, bon.prompt) == ("argmax", "last", None)
    assert bon.sampling.temperature is None and bon.sampling.seed is None
    bon = grpc_convert.bon_request_from_proto(
        pb.GenerateRequest(prompt="p", n=3, sampling=pb.SamplingParams(temperature=0.0, seed=0, stop=["x"])),
        default_best_of=2,
    )
    assert bon.best_of == 3 and bon.prompt == "p"
    # Explicit zeros in optional fields are kept (temperature 0 = greedy).
    assert bon.sampling.temperature == 0.0 and bon.sampling.seed == 0 and bon.sampling.stop == ("x",)
