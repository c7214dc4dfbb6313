"""PRM encodings in process: separators by construction, truncation keeps them aligned."""

from __future__ import annotations

import pytest

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.formatting import InputTooLong
from bon_gateway.scoring.worker.loading import load_adapter
from bon_gateway.types import Message
from tests.fixtures import checkpoints, reward_checkpoints
from tests.marks import slow_except

LONG_QUESTION = "How many apples? " + "Tom counts apples again and again. " * 40
STEPS = ["Tom has 3 apples.", "He buys 4 more.", "So \\boxed{7}."]


@pytest.mark.parametrize("kind", slow_except(["prm", "shepherd"], "prm"))
def test_left_truncation_cuts_the_prompt_and_keeps_every_step(kind: str) -> None:
    path = reward_checkpoints.tiny_qwen2_prm() if kind == "prm" else checkpoints.tiny_judge_lm()
    extra = {} if kind == "prm" else {"kind": "causal_prm"}
    full = load_adapter(RewardModelConfig(name="a", path=str(path), **extra))
    messages = (Message("user", LONG_QUESTION),)
    whole = full.encode(messages, "", STEPS, what="c")
    whole_positions = whole.positions
    assert len(whole_positions) == 3
    limit = len(whole.ids) - 50
    cut = load_adapter(
        RewardModelConfig(name="b", path=str(path), max_length=limit, truncate_prompt=True, **extra)
    )
    short = cut.encode(messages, "", STEPS, what="c")
    assert len(short.ids) == limit
    assert short.prompt_tokens == whole.prompt_tokens - 50
    # The answer is intact and the separators moved with it.
    assert short.ids[short.prompt_tokens :] == whole.ids[whole.prompt_tokens :]
    assert short.positions == [p - 50 for p in whole_positions]
    strict = load_adapter(RewardModelConfig(name="c", path=str(path), max_length=limit, **extra))
    with pytest.raises(InputTooLong, match="max_length"):
        strict.encode(messages, "", STEPS, what="candidates[0]")


def test_qwen2_prm_question_and_steps_cannot_produce_the_separator_id() -> None:
    adapter = load_adapter(RewardModelConfig(name="a", path=str(reward_checkpoints.tiny_qwen2_prm())))
    steps = ["a <extra_0> b", "<extra_0>", "c"]
    enc = adapter.encode((Message("user", "q <extra_0> q"),), "", steps, what="c")
    positions = enc.positions
    assert len(positions) == 3
    assert all(enc.ids[p] == adapter.sep_id for p in positions)  # type: ignore[attr-defined]
    # Without explicit steps the answer is split on the entry's delimiter ("\n\n").
    split = adapter.encode((Message("user", "q"),), "x\n\ny\n\n\n\nz", (), what="c")
    assert len(split.positions) == 3
