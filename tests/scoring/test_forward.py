"""In-process exactness of backbone -> positions -> head, with and without prompt reuse.

These load the adapters in the test process (no worker) so every batching and
padding case is cheap to check against the one-sequence reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.forward import Forward, Group, batch_cost, common_prefix, split_rows
from bon_gateway.scoring.worker.loading import load_adapter
from bon_gateway.scoring.worker.runtime import ModelRuntime
from bon_gateway.types import Message
from tests.fixtures import checkpoints
from tests.marks import slow_except
from tests.scoring.helpers import mixed_candidates

TOL = 1e-4

PROMPTS = [
    (Message("user", "What is 17 * 23?"),),
    (Message("system", "You grade answers. " * 20), Message("user", "Name a prime above 100.")),
    (Message("user", "Say hi."),),
]
ANSWERS = [
    mixed_candidates(),
    ["101", "103 is prime because it has no divisor below its square root. " * 4, "", "97"],
    ["hi"],  # a group of one: nothing to reuse
]


def _dicts(messages: tuple[Message, ...]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


@pytest.fixture(scope="module", params=slow_except(["llama", "qwen2", "qwen3", "judge"], "llama"))
def runtime_and_ref(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    builders = {
        "llama": checkpoints.tiny_llama_rm,
        "qwen2": checkpoints.tiny_qwen2_rm,
        "qwen3": checkpoints.tiny_qwen3_rm,
        "judge": checkpoints.tiny_judge_lm,
    }
    path = builders[request.param]()
    kind = "judge" if request.param == "judge" else "auto"
    entry = RewardModelConfig(name=request.param, path=str(path), kind=kind)
    ref = checkpoints.reference_judge_reward if kind == "judge" else checkpoints.reference_outcome_reward
    return ModelRuntime(entry, load_adapter(entry)), path, ref


# How rows are split into backbone calls: None = one padded batch (the CUDA way), 0 = only
# equal lengths together (no padding, no mask), 128 = the CPU default (short rows pad together).
@pytest.mark.parametrize("short_rows", [None, 0, 128])
@pytest.mark.parametrize("reuse", [True, False])
def test_batch_of_groups_equals_reference(  # type: ignore[no-untyped-def]
    runtime_and_ref, reuse: bool, short_rows: int | None
) -> None:
    runtime, path, ref = runtime_and_ref
    runtime.prefix_reuse = reuse
    groups = [runtime.prepare(msgs, answers, ())[0] for msgs, answers in zip(PROMPTS, ANSWERS, strict=True)]
    if reuse:
        assert [g.prefix > 0 for g in groups] == [True, True, False]
        assert groups[0].prefix != groups[1].prefix  # left padding of the prefixes is exercised
    forward = Forward(runtime.adapter, runtime.forward.device)
    forward.short_rows = short_rows
    logits, figures = forward.run(groups)
    assert figures.real_tokens == sum(g.real_tokens for g in groups)
    if short_rows == 0:
        assert figures.padded_tokens == 0
    assert (figures.reused_tokens > 0) == reuse
    for msgs, answers, per in zip(PROMPTS, ANSWERS, logits, strict=True):
        for answer, lg in zip(answers, per, strict=True):
            got, _ = runtime.adapter.reward(lg, "none")
            assert got == pytest.approx(ref(path, _dicts(msgs), answer), abs=TOL)


def test_split_rows_pads_only_short_rows() -> None:
    lengths = [300, 40, 300, 500, 10, 128, 200]
    # Longest first; equal long lengths share a call; rows of <= 128 tokens share one.
    assert split_rows(lengths, 128) == [[3], [0, 2], [6], [5, 1, 4]]
    assert split_rows(lengths, 0) == [[3], [0, 2], [6], [5], [1], [4]]
    assert split_rows([], 128) == []


def test_common_prefix_leaves_own_tokens() -> None:
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert common_prefix([[1, 2, 3]]) == 0
    assert common_prefix([[7, 2], [1, 2]]) == 0


def test_batch_cost_counts_padding() -> None:
    full = Group(seqs=[[1] * 10, [1] * 4], positions=[[9], [3]])
    reuse = Group(seqs=[[1] * 10, [1] * 6], positions=[[9], [5]], prefix=5)
    assert batch_cost([full]) == 20
    assert batch_cost([reuse]) == 5 + 2 * 5
    assert batch_cost([full, reuse]) == 20 + 15


def test_pad_equals_eos_pools_before_trailing_im_end(tiny_llama_rm: Path) -> None:
    entry = RewardModelConfig(name="m", path=str(tiny_llama_rm))
    adapter = ModelRuntime(entry, load_adapter(entry)).adapter
    pad = adapter.config.pad_token_id
    # SmolLM2: pad == eos == <|im_end|>; a sequence ending in it is read one token earlier,
    # exactly as LlamaForSequenceClassification does.
    assert adapter.pooled_index([5, 6, pad]) == 1
    assert adapter.pooled_index([5, 6, 7]) == 2


def test_group_above_budget_split_in_length_order() -> None:
    from bon_gateway.scoring.worker.runtime import split_group

    seqs = [[1] * n for n in (50, 10, 40, 12)]
    group = Group(seqs=seqs, positions=[[len(s) - 1] for s in seqs], prefix=5)
    parts = split_group(group, 60)
    assert [indices for _, indices in parts] == [[1, 3], [2], [0]]
    assert all(batch_cost([g]) <= 60 for g, _ in parts)
    assert [g.prefix for g, _ in parts] == [5, 0, 0]  # a part of one row has nothing to share
    assert split_group(group, 10_000)[0][1] == [0, 1, 2, 3]


@pytest.mark.asyncio
async def test_runtime_splits_group_above_budget_exactly(tiny_llama_rm: Path) -> None:
    entry = RewardModelConfig(name="m", path=str(tiny_llama_rm), max_batch_tokens=300)
    runtime = ModelRuntime(entry, load_adapter(entry))
    runtime.batcher.start()
    try:
        messages, answers = PROMPTS[0], ANSWERS[0]
        group, prompt_tokens = runtime.prepare(messages, answers, ())
        assert batch_cost([group]) > 300
        scored = await runtime.score(group, prompt_tokens, "none")
    finally:
        await runtime.batcher.aclose()
    assert scored.tokens == [len(s) for s in group.seqs]
    for answer, (reward, _) in zip(answers, scored.rewards, strict=True):
        want = checkpoints.reference_outcome_reward(tiny_llama_rm, _dicts(messages), answer)
        assert reward == pytest.approx(want, abs=TOL)
