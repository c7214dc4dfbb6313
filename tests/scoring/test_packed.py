"""Packed (varlen) CPU runs equal transformers' forward of each unpadded sequence."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.forward import Forward, Group
from bon_gateway.scoring.worker.loading import load_adapter
from bon_gateway.scoring.worker.packed import (
    FusedLinear,
    PackedDecoder,
    onednn_linear_works,
    packing_limit,
)
from tests.fixtures import checkpoints
from tests.marks import slow_except

TOL = 1e-5


def _backbone(path: Path) -> Any:
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval().base_model


def _one_sequence(backbone: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        hidden: torch.Tensor = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]
    return hidden


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(100, 2000, (n,), generator=g)]


def _tiny_mistral(window: int) -> Path:
    return checkpoints.cached_checkpoint(
        f"mistral-rm-w{window}",
        lambda out: checkpoints.build_sequence_classifier(out, "mistral", seed=8, sliding_window=window),
    )


@pytest.fixture(scope="module", params=slow_except(["llama", "qwen2", "qwen3", "mistral"], "llama"))
def backbone(request: pytest.FixtureRequest) -> Any:
    paths = {
        "llama": checkpoints.tiny_llama_rm,
        "qwen2": checkpoints.tiny_qwen2_rm,
        "qwen3": checkpoints.tiny_qwen3_rm,
        "mistral": lambda: _tiny_mistral(4096),
    }
    return _backbone(paths[request.param]())


def _decoder(backbone: Any, onednn: bool) -> PackedDecoder:
    decoder = PackedDecoder(backbone)
    decoder.linear = FusedLinear(onednn=onednn)
    return decoder


def test_this_torch_has_the_fused_onednn_linears() -> None:
    # The CPU fast path; without it the plain torch fallback runs (tested below as well).
    assert onednn_linear_works()


@pytest.mark.parametrize("onednn", [True, False])
def test_packed_rows_equal_one_sequence_each(backbone: Any, onednn: bool) -> None:
    rows = [_ids(n, seed) for seed, n in enumerate([1, 7, 33, 5, 64])]
    got = _decoder(backbone, onednn).run(rows, [-1] * len(rows), [])
    for row, hidden in zip(rows, got, strict=True):
        want = _one_sequence(backbone, row)
        assert hidden.shape == want.shape
        assert (hidden - want).abs().max() < TOL


@pytest.mark.parametrize("onednn", [True, False])
def test_rows_continuing_shared_prompts_equal_the_whole_sequence(backbone: Any, onednn: bool) -> None:
    decoder = _decoder(backbone, onednn)
    prompts = [_ids(20, 100), _ids(9, 101)]
    caches = [decoder.prompt(p) for p in prompts]
    for prompt, cache in zip(prompts, caches, strict=True):
        assert (cache.hidden - _one_sequence(backbone, prompt)).abs().max() < TOL
    # Rows of prompt 0 split by a standalone row: two spans of the same prompt.
    rows = [_ids(1, 1), _ids(12, 2), _ids(15, 3), _ids(30, 4), _ids(4, 5), _ids(8, 6)]
    prompt_of = [0, 0, -1, 0, 1, 1]
    got = decoder.run(rows, prompt_of, caches)
    for row, p, hidden in zip(rows, prompt_of, got, strict=True):
        whole = (prompts[p] if p >= 0 else []) + row
        want = _one_sequence(backbone, whole)[-len(row) :]
        assert (hidden - want).abs().max() < TOL


def test_packing_limit_by_family(tiny_gemma2_rm: Path, tiny_jamba_rm: Path) -> None:
    assert packing_limit(_backbone(checkpoints.tiny_llama_rm())) == 1 << 30
    assert packing_limit(_backbone(_tiny_mistral(16))) == 16
    # Soft-capped attention and Mamba layers are not Llama-shaped: transformers runs them.
    assert packing_limit(_backbone(tiny_gemma2_rm)) is None
    assert packing_limit(_backbone(tiny_jamba_rm)) is None


def test_forward_uses_transformers_past_a_sliding_window() -> None:
    path = _tiny_mistral(16)
    entry = RewardModelConfig(name="m", path=str(path))
    adapter = load_adapter(entry)
    forward = Forward(adapter, torch.device("cpu"))
    assert forward.packed is not None and forward.packing_limit == 16
    short, long = _ids(12, 7), _ids(40, 8)
    # Past the window, full causal attention is not what the model computes: the packed
    # run would be wrong there, so the forward must not use it.
    packed_long = forward.packed.run([long], [-1], [])[0]
    assert (packed_long[-1] - _one_sequence(adapter.backbone, long)[-1]).abs().max() > 1e-3
    logits, figures = forward.run([Group(seqs=[short, long], positions=[[11], [39]])])
    for seq, lg in zip([short, long], logits[0], strict=True):
        with torch.inference_mode():
            want = adapter.head(_one_sequence(adapter.backbone, seq)[-1:].float())
        assert (lg - want).abs().max() < 1e-4
    assert figures.rows == 2


def test_packed_batch_pads_nothing(tiny_llama_rm: Path) -> None:
    entry = RewardModelConfig(name="m", path=str(tiny_llama_rm))
    forward = Forward(load_adapter(entry), torch.device("cpu"))
    prompt = _ids(30, 9)
    seqs = [prompt + _ids(n, 10 + n) for n in (3, 17, 40)]
    groups = [
        Group(seqs=seqs, positions=[[len(s) - 1] for s in seqs], prefix=30),
        Group(seqs=[_ids(11, 20), _ids(90, 21)], positions=[[10], [89]]),
    ]
    _, figures = forward.run(groups)
    assert figures.padded_tokens == 0
    assert figures.batch_tokens == 30 + 3 + 17 + 40 + 11 + 90
    assert figures.reused_tokens == 2 * 30
    assert figures.rows == 1 + 3 + 2


def test_rows_run_in_chunks_of_bounded_tokens(tiny_llama_rm: Path) -> None:
    from bon_gateway.scoring.worker.packed import _chunks

    assert _chunks([5, 5, 5, 12, 1, 1], 10) == [[0, 1], [2], [3], [4, 5]]
    assert _chunks([], 10) == []
    backbone = _backbone(tiny_llama_rm)
    decoder = PackedDecoder(backbone, chunk_tokens=16)
    prompt = _ids(10, 30)
    cache = decoder.prompt(prompt)
    rows = [_ids(n, 40 + n) for n in (9, 9, 20, 3)]
    got = decoder.run(rows, [0, 0, 0, -1], [cache])
    for row, p, hidden in zip(rows, [0, 0, 0, -1], got, strict=True):
        whole = (prompt if p == 0 else []) + row
        assert (hidden - _one_sequence(backbone, whole)[-len(row) :]).abs().max() < TOL


def test_positions_inside_the_shared_prompt_read_the_prompt_pass(tiny_llama_rm: Path) -> None:
    entry = RewardModelConfig(name="m", path=str(tiny_llama_rm))
    adapter = load_adapter(entry)
    forward = Forward(adapter, torch.device("cpu"))
    prompt = _ids(25, 50)
    seqs = [prompt + _ids(n, 60 + n) for n in (4, 9)]
    positions = [[3, 24, 26], [10, len(seqs[1]) - 1]]
    logits, _ = forward.run([Group(seqs=seqs, positions=positions, prefix=25)])
    for seq, pos, lg in zip(seqs, positions, logits[0], strict=True):
        with torch.inference_mode():
            want = adapter.head(_one_sequence(adapter.backbone, seq)[pos].float())
        assert lg.shape == want.shape
        assert (lg - want).abs().max() < 1e-4
