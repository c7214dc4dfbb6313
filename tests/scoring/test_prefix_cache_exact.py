"""Scores through the worker's prefix cache equal the plain transformers forward of one
unpadded sequence (1e-4, fp32), whatever was cached, evicted or recomputed.

In-process runtimes (batcher running, no gRPC): the packed CPU path (Llama, Qwen3),
the transformers path (Llama forced onto it, CPU-style sub-batches and CUDA-style
one padded call; Gemma2 with its sliding window), outcome RMs and PRMs (Qwen2 PRM
layout, math-shepherd causal PRM), cold and warm, across requests, with eviction
and pins. Each test also checks that the cache was really used (reused tokens,
entries, stems computed), so an exact score cannot come from a silent fallback;
`test_a_wrong_context_is_caught` shows the comparisons fail on a wrong context.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.formatting import InputTooLong
from bon_gateway.scoring.worker.forward import Group
from bon_gateway.scoring.worker.loading import load_adapter
from bon_gateway.scoring.worker.packed import PENDING, READY
from bon_gateway.scoring.worker.runtime import ModelRuntime, Scored, kv_bytes_per_token
from bon_gateway.steps import split_steps
from bon_gateway.types import Message, RawInput
from tests.fixtures import checkpoints, reward_checkpoints
from tests.marks import slow_except
from tests.scoring.helpers import mixed_candidates
from tests.scoring.test_math_reward_models import QUESTION, reference_causal_prm, reference_qwen2_prm

TOL = 1e-4

PROMPT_A = (Message("system", "You grade answers carefully."), Message("user", "What is 17 * 23?"))
PROMPT_B = (Message("user", "Name a prime number above 100 and say why it is prime."),)
# Gemma2's tiny checkpoint has a sliding window of 64: the cache takes sequences within it.
SHORT = (Message("user", "2+2?"),)
SHORT_ANSWERS = ["4", "four", "It is 4.", "The sum is four."]


def _dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


# name -> (checkpoint, packed path?, short_rows on the transformers path)
PATHS: dict[str, tuple[Callable[[], Path], bool, int | None]] = {
    "llama-packed": (checkpoints.tiny_llama_rm, True, 128),
    "qwen3-packed": (checkpoints.tiny_qwen3_rm, True, 128),
    "llama-transformers-cpu": (checkpoints.tiny_llama_rm, False, 128),
    "llama-transformers-one-call": (checkpoints.tiny_llama_rm, False, None),
    "gemma2-transformers": (checkpoints.tiny_gemma2_rm, False, 128),
}


class Recorder:
    """Wraps a runtime's forward to record every batch's groups."""

    def __init__(self, runtime: ModelRuntime) -> None:
        self.batches: list[list[Group]] = []
        run = runtime.forward.run_batch

        def recording(groups: Sequence[Group]) -> Any:
            self.batches.append(list(groups))
            return run(groups)

        runtime.forward.run_batch = recording  # type: ignore[method-assign]

    def stems(self) -> list[int]:
        """Token counts of the stems computed (stem groups), in order."""
        return [len(g.stem.ids) for b in self.batches for g in b if g.stem is not None]


@asynccontextmanager
async def running(
    path: Path, *, packed: bool = True, short_rows: int | None = 128, **entry: Any
) -> AsyncIterator[ModelRuntime]:
    config = RewardModelConfig.model_validate({"name": "m", "path": str(path), **entry})
    runtime = ModelRuntime(config, load_adapter(config))
    if not packed:
        runtime.forward.packed = None
    runtime.forward.short_rows = short_rows
    runtime.batcher.start()
    try:
        yield runtime
    finally:
        await runtime.batcher.aclose()


async def score(
    runtime: ModelRuntime, messages: Sequence[Message], answers: Sequence[str], **kw: Any
) -> Scored:
    # As the server does: requests being tokenized are announced, so the batcher waits for
    # them (up to max_wait_ms) and requests arriving together share a batch.
    runtime.batcher.announce()
    try:
        group, prompt_tokens = await asyncio.to_thread(runtime.prepare, messages, list(answers), ())
    finally:
        runtime.batcher.withdraw()
    return await runtime.score(group, prompt_tokens, "none", **kw)


def check(path: Path, messages: Sequence[Message], answers: Sequence[str], got: Sequence[Scored]) -> None:
    """Every reward equals the one-sequence reference (got: one Scored per answer, or one for all)."""
    rewards = [r for s in got for r, _ in s.rewards]
    assert len(rewards) == len(answers)
    for answer, reward in zip(answers, rewards, strict=True):
        want = checkpoints.reference_outcome_reward(path, _dicts(messages), answer)
        assert reward == pytest.approx(want, abs=TOL), answer[:30]


def answers_for(name: str) -> list[str]:
    return SHORT_ANSWERS if name.startswith("gemma2") else mixed_candidates()[:6]


def prompt_for(name: str, which: str = "A") -> tuple[Message, ...]:
    if name.startswith("gemma2"):
        return SHORT if which == "A" else (Message("system", "Be brief."), Message("user", "3+3?"))
    return PROMPT_A if which == "A" else PROMPT_B


@pytest.mark.asyncio
@pytest.mark.parametrize("name", slow_except(PATHS, "llama-packed", "gemma2-transformers"))
async def test_outcome_cold_warm_across_requests(name: str) -> None:
    build, packed, short_rows = PATHS[name]
    path = build()
    answers = answers_for(name)
    # A generous max_wait_ms: the batcher waits for announced requests up to it (no longer).
    async with running(path, packed=packed, short_rows=short_rows, max_wait_ms=1000) as runtime:
        assert runtime.cache is not None
        recorder = Recorder(runtime)
        prompt = prompt_for(name)
        # Cold: one request, its candidates share the prompt, computed once and kept.
        cold = await score(runtime, prompt, answers)
        check(path, prompt, answers, [cold])
        assert recorder.stems() and runtime.cache.entries >= 1
        assert cold.outcome.reused_tokens > 0
        # Warm, across requests: one candidate per request, concurrently; the prompt is cached.
        warm = await asyncio.gather(*(score(runtime, prompt, [a]) for a in reversed(answers)))
        check(path, prompt, list(reversed(answers)), warm)
        assert all(s.outcome.reused_tokens > 0 for s in warm)
        # A new prompt, one candidate per request, all at once: computed once (in-flight de-dup),
        # and the requests that arrived together ran in its batch.
        other = prompt_for(name, "B")
        before = len(recorder.stems())
        texts = [a for a in answers if a]  # (an empty answer's "prompt" runs into the template's end)
        fresh = await asyncio.gather(*(score(runtime, other, [a]) for a in texts))
        check(path, other, texts, fresh)
        assert len(recorder.stems()) == before + 1
        stem_batch = next(b for b in reversed(recorder.batches) if any(g.stem is not None for g in b))
        assert sum(1 for g in stem_batch if g.seqs) >= 2
        prompt_len = recorder.stems()[-1]
        # Every request but the one that paid for the prompt saved all of it.
        assert sum(s.outcome.reused_tokens for s in fresh) == (len(texts) - 1) * prompt_len
        # Kept candidates: the same texts again reuse all but their last token.
        kept = await score(runtime, other, answers, keep=True)
        again = await score(runtime, other, answers, keep=True)
        check(path, other, answers * 2, [kept, again])
        assert again.outcome.reused_tokens == sum(n - 1 for n in again.tokens)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "name",
    slow_except(["llama-packed", "llama-transformers-one-call", "gemma2-transformers"], "llama-packed"),
)
async def test_eviction_and_a_full_cache_stay_exact(name: str) -> None:
    build, packed, short_rows = PATHS[name]
    path = build()
    answers = answers_for(name)[:3]
    config = RewardModelConfig(name="m", path=str(path))
    adapter = load_adapter(config)
    per_token = kv_bytes_per_token(adapter.config, next(adapter.model.parameters()).dtype)
    prompts = [(Message("user", f"Question {k}: what is {k} + {k}?"),) for k in range(5)]
    # Room for about one prompt: every new prompt evicts the last one.
    async with running(
        path, packed=packed, short_rows=short_rows, prefix_cache_bytes=45 * per_token
    ) as runtime:
        assert runtime.cache is not None
        for round_ in range(2):
            for prompt in prompts:
                got = await asyncio.gather(*(score(runtime, prompt, [a]) for a in answers))
                check(path, prompt, answers, got)
                assert runtime.cache.used_bytes <= runtime.cache.budget_bytes
                assert runtime.cache.entries <= 1, round_
        assert sum(s.outcome.reused_tokens for s in got) > 0  # the last prompt was still reused
    # Smaller than any prompt: nothing is cached; the in-group reuse still works.
    async with running(
        path, packed=packed, short_rows=short_rows, prefix_cache_bytes=8 * per_token
    ) as runtime:
        assert runtime.cache is not None
        got = await asyncio.gather(*(score(runtime, prompts[0], [a]) for a in answers))
        check(path, prompts[0], answers, got)
        group = await score(runtime, prompts[1], answers)
        check(path, prompts[1], answers, [group])
        assert runtime.cache.entries == 0
        assert group.outcome.reused_tokens > 0


@pytest.mark.asyncio
async def test_open_group_pins_its_prompt_and_answers_before_the_prefill() -> None:
    path = checkpoints.tiny_llama_rm()
    config = RewardModelConfig(name="m", path=str(path))
    adapter = load_adapter(config)
    per_token = kv_bytes_per_token(adapter.config, next(adapter.model.parameters()).dtype)
    runtime = ModelRuntime(
        RewardModelConfig(name="m", path=str(path), prefix_cache_bytes=100 * per_token), adapter
    )
    assert runtime.cache is not None
    # The batcher is not running: open_group must answer without waiting for the prefill.
    group, kept = await runtime.open_group(PROMPT_A, ttl_s=60)
    assert kept and group.prompt_tokens > 0
    (entry,) = group.entries
    assert entry.span.state == PENDING and entry.pins == 1
    runtime.batcher.start()
    try:
        answers = mixed_candidates()[:3]
        first = await score(runtime, PROMPT_A, answers[:1], owner=group)
        assert entry.span.state == READY
        # Other prompts flood the small cache; the pinned prompt stays.
        for k in range(4):
            await score(runtime, (Message("user", f"Unrelated question {k} with some words."),), ["x"])
        rest = await asyncio.gather(*(score(runtime, PROMPT_A, [a], owner=group) for a in answers[1:]))
        check(path, PROMPT_A, answers, [first, *rest])
        assert all(s.outcome.reused_tokens >= group.prompt_tokens - 1 for s in rest), (
            group.prompt_tokens,
            [s.outcome.reused_tokens for s in rest],
            runtime.cache.entries,
        )
        assert runtime.close_group(group.id) and not runtime.close_group(group.id)
        assert entry.pins == 0
    finally:
        await runtime.batcher.aclose()


@pytest.mark.asyncio
async def test_open_group_checks_the_prompt_length() -> None:
    path = checkpoints.tiny_llama_rm()
    long = (Message("user", "many words " * 40),)
    config = RewardModelConfig(name="m", path=str(path), max_length=60)
    runtime = ModelRuntime(config, load_adapter(config))
    with pytest.raises(InputTooLong) as info:
        await runtime.open_group(long, ttl_s=10)
    assert info.value.param == "messages"
    config = RewardModelConfig(name="m", path=str(path), max_length=60, truncate_prompt=True)
    runtime = ModelRuntime(config, load_adapter(config))
    group, kept = await runtime.open_group(long, ttl_s=10)
    assert not kept  # cut at the limit: every candidate is cut differently, nothing to share
    assert runtime.close_group(group.id)


PRMS: dict[str, tuple[Callable[[], Path], str, Callable[[Path, str, Sequence[str]], list[float]]]] = {
    "qwen2-prm": (reward_checkpoints.tiny_qwen2_prm, "auto", reference_qwen2_prm),
    "causal-prm": (checkpoints.tiny_judge_lm, "causal_prm", reference_causal_prm),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("name", slow_except(PRMS, "qwen2-prm"))
@pytest.mark.parametrize("packed", [True, False])
async def test_prm_partials_reuse_their_earlier_work(name: str, packed: bool) -> None:
    """A candidate's successive partials (speculative rejection's checkpoints) in a group:
    each reuses the prompt and the candidate's previous partial; step rewards exact."""
    build, kind, reference = PRMS[name]
    path = build()
    steps = [f"Step {i + 1}: we add {i} and {3 * i} to get {4 * i}." for i in range(6)]
    full = "\n\n".join(steps)
    messages = (Message("user", QUESTION),)
    async with running(path, packed=packed, kind=kind) as runtime:
        assert runtime.cache is not None
        group, kept = await runtime.open_group(messages, ttl_s=60)
        assert kept
        # Two candidates, scored at 3 checkpoints and finished.
        texts = [full, full.replace("we add", "we sum")]
        previous = [0, 0]
        for cut in (45, 110, 170, len(full)):
            partials = [t[:cut] for t in texts]
            got = await asyncio.gather(
                *(score(runtime, messages, [p], keep=True, owner=group) for p in partials)
            )
            for text, scored, before in zip(partials, got, previous, strict=True):
                want = reference(path, QUESTION, split_steps(text, "\n\n"))
                ((_, step_rewards),) = scored.rewards
                assert len(step_rewards) == len(want)
                assert step_rewards == pytest.approx(want, abs=TOL)
                # After the first checkpoint: the earlier partial (all but its last few tokens).
                assert scored.outcome.reused_tokens >= before - 8
            # The first reader pays for the prompt computed when the group opened, the other reused it.
            assert sum(s.outcome.reused_tokens for s in got) >= group.prompt_tokens
            previous = [s.tokens[0] for s in got]
        assert all(s.outcome.reused_tokens > group.prompt_tokens for s in got)
        runtime.close_group(group.id)
        # Cold again: everything evicted, the same texts recomputed, still exact.
        runtime.cache.clear()
        got = await score(runtime, messages, texts)
        for text, (_, step_rewards) in zip(texts, got.rewards, strict=True):
            assert step_rewards == pytest.approx(
                reference(path, QUESTION, split_steps(text, "\n\n")), abs=TOL
            )


async def score_raw(runtime: ModelRuntime, ids: list[int]) -> Scored:
    """One raw input (token ids, no messages), as the RLHF routes send it."""
    runtime.batcher.announce()
    try:
        group, prompt_tokens = await asyncio.to_thread(
            runtime.prepare, (), [], (), [RawInput(token_ids=tuple(ids))]
        )
    finally:
        runtime.batcher.withdraw()
    return await runtime.score(group, prompt_tokens, "none")


@pytest.mark.asyncio
@pytest.mark.parametrize("packed", slow_except([True, False], True))
async def test_raw_inputs_with_no_prompt_boundary_reuse_their_common_prefix(packed: bool) -> None:
    """verl-shaped traffic: one sample per request, token ids with no assistant-turn header
    (so no known prompt). The samples of one prompt reuse it whether they arrive after the
    first or together with it (the others wait for the one computing it), and stay exact."""
    path = checkpoints.tiny_llama_rm()
    rng = random.Random(3)

    def samples(prompt_len: int, n: int) -> tuple[list[int], list[list[int]]]:
        prompt = [rng.randrange(100, 1000) for _ in range(prompt_len)]
        answers = [[rng.randrange(100, 1000) for _ in range(rng.randint(3, 30))] for _ in range(n)]
        return prompt, [prompt + answer for answer in answers]

    async with running(path, packed=packed, max_wait_ms=1000) as runtime:
        assert runtime.cache is not None
        prompt, first_group = samples(48, 5)
        first = await score_raw(runtime, first_group[0])
        later = await asyncio.gather(*(score_raw(runtime, ids) for ids in first_group[1:]))
        prompt2, together = samples(40, 5)
        arrived = await asyncio.gather(*(score_raw(runtime, ids) for ids in together))
        for ids, got in zip([*first_group, *together], [first, *later, *arrived], strict=True):
            assert got.rewards[0][0] == pytest.approx(checkpoints.reference_raw_logits(path, ids)[0], abs=TOL)
        assert first.outcome.reused_tokens == 0
        assert all(s.outcome.reused_tokens >= len(prompt) for s in later)
        # Together: exactly one of them computed the new prompt; the others read it.
        assert sorted(s.outcome.reused_tokens >= len(prompt2) for s in arrived) == [False] + [True] * 4
        # The samples that continued a prompt kept nothing of their own (their answers):
        # one entry per prompt.
        assert runtime.cache.entries == 2
        # An input that shares only a short head with what is cached (a common first turn)
        # is kept for the samples of its own prompt.
        short_head = [*prompt2[:16], *samples(60, 1)[1][0]]
        alone = await score_raw(runtime, short_head)
        sibling = await score_raw(runtime, [*short_head[:-3], 7, 8, 9])
        for ids, got in ((short_head, alone), ([*short_head[:-3], 7, 8, 9], sibling)):
            assert got.rewards[0][0] == pytest.approx(checkpoints.reference_raw_logits(path, ids)[0], abs=TOL)
        assert runtime.cache.entries == 3
        assert sibling.outcome.reused_tokens == len(short_head) - 3


@pytest.mark.asyncio
async def test_a_wrong_context_is_caught() -> None:
    """The comparisons above can fail: rows continuing another prompt's keys and values
    (as a cache bug would give them) score far from the reference."""
    path = checkpoints.tiny_llama_rm()
    async with running(path) as runtime:
        assert runtime.cache is not None
        await score(runtime, PROMPT_B, ["warm"])
        answers = mixed_candidates()[:3]
        group, _ = await asyncio.to_thread(runtime.prepare, PROMPT_A, answers, ())
        wrong = runtime.cache.match(
            (await asyncio.to_thread(runtime.prepare, PROMPT_B, ["x"], ()))[0].seqs[0], group.prefix
        )
        assert wrong is not None and wrong.length >= 16
        bad = Group(seqs=group.seqs, positions=group.positions, context=wrong.context)
        ((outcome, _),) = await asyncio.gather(runtime.batcher.submit(bad))
        rewards = [runtime.adapter.reward(lg, "none")[0] for lg in outcome.logits]
        wants = [checkpoints.reference_outcome_reward(path, _dicts(PROMPT_A), a) for a in answers]
        assert max(abs(r - w) for r, w in zip(rewards, wants, strict=True)) > 1e-3


def test_architectures_that_cannot_reuse_do_not_cache() -> None:
    jamba = RewardModelConfig(name="m", path=str(checkpoints.tiny_jamba_rm()))
    assert ModelRuntime(jamba, load_adapter(jamba)).cache is None
    off = RewardModelConfig(name="m", path=str(checkpoints.tiny_llama_rm()), prefix_cache_bytes=0)
    assert ModelRuntime(off, load_adapter(off)).cache is None
    gemma = RewardModelConfig(name="m", path=str(checkpoints.tiny_gemma2_rm()))
    runtime = ModelRuntime(gemma, load_adapter(gemma))
    assert runtime.cache_limit == 63  # sequences past the sliding window are not cached


@pytest.mark.asyncio
async def test_gemma2_past_its_window_is_scored_without_the_cache() -> None:
    path = checkpoints.tiny_gemma2_rm()
    answers = mixed_candidates()[3:6]  # long: past the window of 64
    async with running(path, packed=False) as runtime:
        assert runtime.cache is not None
        got = await score(runtime, PROMPT_A, answers)
        check(path, PROMPT_A, answers, [got])
        assert runtime.cache.entries == 0 and got.outcome.reused_tokens > 0  # in-group reuse only
