"""Gemma2, Jamba and 2-label classifiers scored exactly; activations and normalization."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.loading import load_adapter
from bon_gateway.scoring.worker.runtime import ModelRuntime
from tests.fixtures import checkpoints
from tests.marks import slow_except
from tests.scoring.helpers import MESSAGE_DICTS, MESSAGES, mixed_candidates

TOL = 1e-4


def _runtime(path: Path, reuse: bool = True, **entry: object) -> ModelRuntime:
    config = RewardModelConfig.model_validate({"name": "m", "path": str(path), **entry})
    return ModelRuntime(config, load_adapter(config), prefix_reuse=reuse)


def _score(runtime: ModelRuntime, candidates: list[str], activation: str = "none") -> list[float]:
    group, _ = runtime.prepare(MESSAGES, candidates, ())
    (logits,), _ = runtime.forward.run([group])
    return [runtime.adapter.reward(lg, activation)[0] for lg in logits]


@pytest.mark.parametrize("build", [checkpoints.tiny_gemma2_rm, checkpoints.tiny_jamba_rm])
@pytest.mark.parametrize("reuse", slow_except([True, False], True))
def test_hybrid_and_softcapped_families_equal_reference(build: Callable[[], Path], reuse: bool) -> None:
    path = build()
    runtime = _runtime(path, reuse)
    candidates = mixed_candidates()
    got = _score(runtime, candidates)
    for answer, value in zip(candidates, got, strict=True):
        assert value == pytest.approx(
            checkpoints.reference_outcome_reward(path, MESSAGE_DICTS, answer), abs=TOL
        )


def test_gemma2_runs_eager_attention() -> None:
    runtime = _runtime(checkpoints.tiny_gemma2_rm())
    assert runtime.adapter.model.config._attn_implementation == "eager"


def test_two_label_classifier_logit_and_softmax(tiny_qwen2_classifier: Path) -> None:
    runtime = _runtime(tiny_qwen2_classifier)
    candidates = mixed_candidates()[:4]
    raw = _score(runtime, candidates)
    probs = _score(runtime, candidates, "softmax")
    for answer, r, p in zip(candidates, raw, probs, strict=True):
        logits = checkpoints.reference_outcome_logits(tiny_qwen2_classifier, MESSAGE_DICTS, answer)
        assert r == pytest.approx(logits[1], abs=TOL)  # the positive (last) label
        # 1e-5, not 1e-6: with prompt reuse the logits differ from the reference by fp32
        # round-off (a few 1e-6 at |logit| ~ 12), which a softmax passes on.
        assert p == pytest.approx(float(torch.softmax(torch.tensor(logits), -1)[1]), abs=1e-5)


def test_activation_and_normalization(tiny_llama_rm: Path) -> None:
    candidates = mixed_candidates()[:3]
    want = [checkpoints.reference_outcome_reward(tiny_llama_rm, MESSAGE_DICTS, a) for a in candidates]
    runtime = _runtime(tiny_llama_rm, normalize_mean=0.5, normalize_std=2.0)
    assert _score(runtime, candidates) == pytest.approx([(w - 0.5) / 2.0 for w in want], abs=TOL)
    # Probabilities are not normalized; softmax over a single logit means sigmoid.
    sig = [1 / (1 + math.exp(-w)) for w in want]
    assert _score(runtime, candidates, "sigmoid") == pytest.approx(sig, abs=1e-5)
    assert _score(runtime, candidates, "softmax") == pytest.approx(sig, abs=1e-5)


def test_judge_activation_is_sigmoid_of_difference(tiny_judge_lm: Path) -> None:
    runtime = _runtime(tiny_judge_lm, kind="judge")
    answer = "391"
    diff = checkpoints.reference_judge_reward(tiny_judge_lm, MESSAGE_DICTS, answer)
    assert _score(runtime, [answer]) == pytest.approx([diff], abs=TOL)
    assert _score(runtime, [answer], "softmax") == pytest.approx([1 / (1 + math.exp(-diff))], abs=1e-5)


def test_gemma2_prompt_reuse_across_the_sliding_window(tiny_gemma2_rm: Path) -> None:
    """Prefixes longer than the window (64) and of different lengths in one batch."""
    from bon_gateway.types import Message

    prompts = [
        (Message("system", "Be careful. " * 40), Message("user", "What is 2+2?")),
        (Message("user", "What is 2+2?"),),
    ]
    runtime = _runtime(tiny_gemma2_rm)
    candidates = mixed_candidates()
    groups = [runtime.prepare(p, candidates, ())[0] for p in prompts]
    assert groups[0].prefix > 64 > groups[1].prefix > 0
    per_group, figures = runtime.forward.run(groups)
    assert figures.reused_tokens > 0
    for prompt, logits in zip(prompts, per_group, strict=True):
        dicts = [{"role": m.role, "content": m.content} for m in prompt]
        for answer, lg in zip(candidates, logits, strict=True):
            want = checkpoints.reference_outcome_reward(tiny_gemma2_rm, dicts, answer)
            assert runtime.adapter.reward(lg, "none")[0] == pytest.approx(want, abs=TOL)
