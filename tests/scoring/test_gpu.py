"""CUDA paths: bf16 backbone with an fp32 head, and fp32 on CUDA (skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.loading import load_adapter
from bon_gateway.scoring.worker.runtime import ModelRuntime
from tests.fixtures import checkpoints
from tests.scoring.helpers import MESSAGE_DICTS, MESSAGES, mixed_candidates

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize(("dtype", "tolerance"), [("auto", 0.15), ("float32", 1e-4)])
@pytest.mark.parametrize("reuse", [True, False])
def test_cuda_scores_match_the_fp32_reference(
    tiny_llama_rm: Path, dtype: str, tolerance: float, reuse: bool
) -> None:
    entry = RewardModelConfig(name="m", path=str(tiny_llama_rm), device="cuda", dtype=dtype)
    runtime = ModelRuntime(entry, load_adapter(entry), prefix_reuse=reuse)
    expected_dtype = torch.bfloat16 if dtype == "auto" else torch.float32
    assert next(runtime.adapter.model.parameters()).dtype == expected_dtype
    candidates = mixed_candidates()
    group, _ = runtime.prepare(MESSAGES, candidates, ())
    (logits,), _ = runtime.forward.run([group])
    assert all(lg.dtype == torch.float32 for lg in logits)  # the head runs in fp32
    for answer, lg in zip(candidates, logits, strict=True):
        want = checkpoints.reference_outcome_reward(tiny_llama_rm, MESSAGE_DICTS, answer)
        assert runtime.adapter.reward(lg, "none")[0] == pytest.approx(want, abs=tolerance, rel=tolerance)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("reuse", [True, False])
def test_model_spread_over_two_gpus_scores_exactly(tiny_llama_rm: Path, reuse: bool) -> None:
    entry = RewardModelConfig(
        name="m", path=str(tiny_llama_rm), device="cuda", dtype="float32", gpus_per_worker=2
    )
    runtime = ModelRuntime(entry, load_adapter(entry), prefix_reuse=reuse)
    assert {p.device.index for p in runtime.adapter.model.parameters()} == {0, 1}
    candidates = mixed_candidates()
    group, _ = runtime.prepare(MESSAGES, candidates, ())
    (logits,), _ = runtime.forward.run([group])
    for answer, lg in zip(candidates, logits, strict=True):
        want = checkpoints.reference_outcome_reward(tiny_llama_rm, MESSAGE_DICTS, answer)
        assert runtime.adapter.reward(lg, "none")[0] == pytest.approx(want, abs=1e-4)
