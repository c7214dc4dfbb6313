"""The RLHF routes' bodies and replies (rlhf_schema.py), without a server: vLLM's input
kinds and activation names, the reply shapes, the field named by each error."""

from __future__ import annotations

import math

import pytest

from bon_gateway.api.rlhf_schema import (
    ClassifyRequest,
    GetRewardRequest,
    ScoreApiRequest,
    activate,
    classify_body,
    logit_rows,
    pooling_body,
    rerank_body,
    single_label,
)
from bon_gateway.errors import InvalidRequest
from bon_gateway.types import RawInput, ScoredCandidate, ScoreResult


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("a text", (RawInput(text="a text"),)),
        (["one", "two"], (RawInput(text="one"), RawInput(text="two"))),
        ([1, 2, 3], (RawInput(token_ids=(1, 2, 3)),)),
        ([[1, 2], [3]], (RawInput(token_ids=(1, 2)), RawInput(token_ids=(3,)))),
    ],
)
def test_classify_input_kinds(value: object, want: tuple[RawInput, ...]) -> None:
    request = ClassifyRequest.model_validate({"input": value, "truncate_prompt_tokens": 7}).to_score_request()
    assert request.raw == want and request.messages == () and request.truncate_prompt_tokens == 7


def test_activation_names_resolve_as_vllm() -> None:
    assert ClassifyRequest.model_validate({"input": "x"}).wants_activation()
    assert not ClassifyRequest.model_validate({"input": "x", "use_activation": False}).wants_activation()
    # The deprecated names win over use_activation (vLLM's get_use_activation order).
    assert not ClassifyRequest.model_validate(
        {"input": "x", "activation": False, "use_activation": True}
    ).wants_activation()
    assert ClassifyRequest.model_validate(
        {"input": "x", "softmax": True, "activation": False}
    ).wants_activation()
    # -1 (the model's whole length) cuts nothing.
    assert ClassifyRequest.model_validate({"input": "x", "truncate_prompt_tokens": -1}).truncate_tokens() == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [({}, "input"), ({"input": "x", "messages": []}, "input"), ({"input": [[1], []]}, "input[1]")],
)
def test_classify_errors_name_the_field(body: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        ClassifyRequest.model_validate(body).to_score_request()
    assert err.value.param == param


def test_score_pairs() -> None:
    assert ScoreApiRequest(text_1="q", text_2=["a", "b"]).pairs() == [("q", "a"), ("q", "b")]
    assert ScoreApiRequest(text_1=["q", "r"], text_2=["a", "b"]).pairs() == [("q", "a"), ("r", "b")]
    with pytest.raises(InvalidRequest) as err:
        ScoreApiRequest(text_1=["q", "r"], text_2=["a"]).pairs()
    assert err.value.param == "text_2"


def test_get_reward_queries_are_raw_texts() -> None:
    request = GetRewardRequest(query=["p1 r1", "p1 r2"], prompts=["p1", "p1"]).to_score_request()
    assert request.raw == (RawInput(text="p1 r1"), RawInput(text="p1 r2"))


def _candidate(logits: tuple[float, ...], labels: int, reward: float = 0.0) -> ScoredCandidate:
    return ScoredCandidate(index=0, text="", reward=reward, logits=logits, labels=labels)


def test_activation_and_rows() -> None:
    assert activate([0.0], True) == [0.5]
    assert activate([1.0, 1.0], True) == [0.5, 0.5]
    assert activate([2.0, -1.0], False) == [2.0, -1.0]
    assert logit_rows(_candidate((1.0, 2.0, 3.0, 4.0), 2)) == [[1.0, 2.0], [3.0, 4.0]]
    # A worker that reports no logits (an older remote one): the reward stands in.
    assert logit_rows(_candidate((), 0, reward=1.5)) == [[1.5]]


def test_reply_shapes() -> None:
    result = ScoreResult(
        model="m", scores=[_candidate((0.2, 0.8), 2), _candidate((3.0, 1.0), 2)], total_tokens=9
    )
    body = classify_body(result, "m", use_activation=False)
    assert body["object"] == "list" and body["model"] == "m" and isinstance(body["created"], int)
    assert body["data"][0] == {"index": 0, "label": "LABEL_1", "probs": [0.2, 0.8], "num_classes": 2}
    assert body["data"][1]["label"] == "LABEL_0"
    assert body["usage"] == {
        "prompt_tokens": 9,
        "total_tokens": 9,
        "completion_tokens": 0,
        "prompt_tokens_details": None,
    }
    steps = ScoreResult(model="p", scores=[_candidate((0.0, 0.0, 0.0, math.log(3)), 2)], total_tokens=4)
    (item,) = pooling_body(steps, "p", "token_classify", use_activation=True)["data"]
    assert item["object"] == "pooling" and len(item["data"]) == 2
    assert item["data"][0] == pytest.approx([0.5, 0.5]) and item["data"][1] == pytest.approx([0.25, 0.75])
    ranked = rerank_body(["a", "b", "c"], [0.1, 0.9, 0.5], "m", 12, top_n=2)
    assert [r["index"] for r in ranked["results"]] == [1, 2]
    assert ranked["results"][0] == {"index": 1, "document": {"text": "b"}, "relevance_score": 0.9}
    assert ranked["usage"] == {"total_tokens": 12}
    with pytest.raises(InvalidRequest) as err:
        single_label(_candidate((0.2, 0.8), 2), "cls")
    assert err.value.param == "model"
