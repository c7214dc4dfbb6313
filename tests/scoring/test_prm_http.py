"""PRMs end to end: POST /v1/rewards on the real gateway with real workers.

`steps` or candidates split on the model entry's delimiter give `step_rewards`
equal to the model cards' formulas and the aggregated `reward`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bon_gateway.scoring.pool import WorkerPool
from tests.fakes.gateway import ServedGateway, gateway_config
from tests.fixtures import checkpoints, reward_checkpoints
from tests.scoring.test_math_reward_models import QUESTION, reference_causal_prm, reference_qwen2_prm

pytestmark = pytest.mark.integration

TOL = 1e-4
STEPS = [
    ["Tom has 3 apples.", "He buys 4 more, so 3 + 4 = 7.", "The answer is \\boxed{7}."],
    ["Tom has 3 apples.", "3 + 4 = 8.", "The answer is \\boxed{8}."],
    ["3 + 4 = 7, so \\boxed{7}."],
]


@pytest.fixture(scope="module")
def gateway() -> Iterator[ServedGateway]:
    config = gateway_config(
        "http://127.0.0.1:9",  # no generation in these tests
        reward_models=[
            {"name": "prm", "path": str(reward_checkpoints.tiny_qwen2_prm())},
            {
                "name": "shepherd",
                "path": str(checkpoints.tiny_judge_lm()),
                "kind": "causal_prm",
                "steps": {"delimiter": "\n"},
            },
        ],
    )
    with ServedGateway(config, scorer_factory=WorkerPool) as served:
        yield served


def _post(gateway: ServedGateway, body: dict[str, object]) -> dict[str, object]:
    reply = httpx.post(f"{gateway.http_url}/v1/rewards", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    data: dict[str, object] = reply.json()
    return data


@pytest.mark.parametrize(
    ("model", "join"), [("prm", "\n\n"), ("shepherd", "\n")], ids=["qwen2-prm", "causal-prm"]
)
@pytest.mark.parametrize("given", ["steps", "candidates"])
def test_rewards_step_rewards_and_aggregation(
    gateway: ServedGateway, model: str, join: str, given: str
) -> None:
    path = Path(gateway.config.reward_model(model).path)
    ref = reference_qwen2_prm if model == "prm" else reference_causal_prm
    want = [ref(path, QUESTION, steps) for steps in STEPS]
    payload = {"steps": STEPS} if given == "steps" else {"candidates": [join.join(s) for s in STEPS]}
    messages = [{"role": "user", "content": QUESTION}]
    for aggregation, fold in (
        ("last", lambda r: r[-1]),
        ("min", min),
        ("prod", math.prod),
        ("mean", lambda r: sum(r) / len(r)),
    ):
        body = _post(gateway, {"model": model, "messages": messages, "aggregation": aggregation, **payload})
        data = body["data"]
        assert isinstance(data, list) and len(data) == len(STEPS)
        for item, expected in zip(data, want, strict=True):
            assert item["step_rewards"] == pytest.approx(expected, abs=TOL)
            assert item["reward"] == pytest.approx(fold(expected), abs=TOL)
        best = max(range(len(want)), key=lambda i: fold(want[i]))
        assert body["selected_index"] == best


def test_rewards_majority_vote_with_a_prm(gateway: ServedGateway) -> None:
    body = _post(
        gateway,
        {
            "model": "prm",
            "messages": [{"role": "user", "content": QUESTION}],
            "steps": STEPS,
            "selection": "majority_vote",
        },
    )
    assert body["selected_answer"] == "7"
    assert body["vote_share"] == pytest.approx(2 / 3)
    assert body["selected_index"] in (0, 2)
