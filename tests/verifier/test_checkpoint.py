"""The assembled GSM8K verifier, with the real SmolLM2-135M weights (slow: ~1-2 min).

What each test proves:
- the assembled directory is an ordinary LlamaForSequenceClassification checkpoint
  (config.json, one score head, SmolLM2's pad id), and assembling again is a no-op;
- the worker's scores for it equal the plain transformers forward of one unpadded
  sequence (fp32; 1e-4, or eps32 * |w| * |h| for this large head, see below), as for
  every model, and the entry's sigmoid is applied;
- the features recomputed now for a handful of training solutions equal the ones the
  shipped head was fitted on (sample_features.npz, taken from the training cache by
  `scripts/train_gsm8k_verifier.py --write-sample`), by both the cache's shared-prompt
  path and the plain one-sequence path; and the shipped head on those features gives
  the worker's scores within the same tolerance. With the bit-for-bit deterministic fit
  (test_fit.py), that is the chain from data to served score, checked in seconds
  instead of the ~25-minute full extraction (`--check` reruns that).
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pytest

from bon_gateway.metrics import Metrics
from bon_gateway.scoring.pool import WorkerPool
from bon_gateway.types import Deadline, Message
from bon_gateway.verifier.assemble import DEFAULT_DIR, STAMP_NAME, assemble_verifier, is_assembled
from bon_gateway.verifier.head import load_head
from tests.fixtures import checkpoints
from tests.scoring.helpers import gateway_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SAMPLE = Path(__file__).resolve().parent / "sample_features.npz"


@pytest.fixture(scope="module")
def verifier_dir() -> Path:
    # The directory config/local.toml serves (built once, reused by later runs).
    return assemble_verifier(REPO / DEFAULT_DIR)


@pytest.fixture(scope="module")
def sample() -> dict[str, np.ndarray]:
    with np.load(SAMPLE) as data:
        return {k: data[k] for k in data.files}


def local_entry(path: Path) -> dict[str, object]:
    data = tomllib.loads((REPO / "config" / "local.toml").read_text(encoding="utf-8"))
    entry = next(e for e in data["reward_models"] if e["name"] == "gsm8k-verifier")
    return {**entry, "path": str(path)}


def test_assembled_checkpoint_is_ordinary_and_assembling_again_is_a_no_op(verifier_dir: Path) -> None:
    config = json.loads((verifier_dir / "config.json").read_text(encoding="utf-8"))
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert config["num_labels"] == 1 if "num_labels" in config else len(config["id2label"]) == 1
    assert config["pad_token_id"] == 2 and "quantization_config" not in config
    assert (verifier_dir / "tokenizer_config.json").is_file()
    assert is_assembled(verifier_dir)
    weights = verifier_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert assemble_verifier(verifier_dir) == verifier_dir
    assert weights.stat().st_mtime_ns == before
    assert (verifier_dir / STAMP_NAME).is_file()


@pytest.mark.integration
@pytest.mark.asyncio
async def test_worker_equals_reference_and_the_shipped_head(
    verifier_dir: Path, sample: dict[str, np.ndarray]
) -> None:
    pool = WorkerPool(gateway_config(local_entry(verifier_dir)), Metrics())
    await pool.start()
    questions, solutions = sample["questions"].tolist(), sample["solutions"].tolist()
    raw: list[float] = []
    probs: list[float] = []
    try:
        for start in range(0, len(solutions), 4):  # one group per problem, as /v1/rewards sends them
            messages = (Message("user", questions[start]),)
            group = solutions[start : start + 4]
            deadline = Deadline.after(300)
            got = await pool.score("gsm8k-verifier", messages, group, deadline=deadline, activation="none")
            raw += [s.reward for s in got.scores]
            # The entry's own activation: sigmoid.
            default = await pool.score("gsm8k-verifier", messages, group, deadline=deadline)
            probs += [s.reward for s in default.scores]
    finally:
        await pool.aclose()
    weight, _ = load_head()
    from_features = sample["final"].astype(np.float64) @ weight[0].astype(np.float64)
    # Tolerance: 1e-4, or the float32 rounding scale of this head's dot product if larger.
    # The head is large (|w| ~ 87 on hidden states of norm ~50: a score sums terms of up to
    # ~4,000 that cancel), so the fp32 rounding every backbone has (worker vs reference,
    # shared-prompt cache vs one sequence) reaches ~1e-4 in the score; eps32 * |w| * |h|
    # is ~5e-4. Measured here: at most ~1.5e-4.
    eps32 = float(np.finfo(np.float32).eps)
    for i, (question, solution) in enumerate(zip(questions, solutions, strict=True)):
        want = checkpoints.reference_outcome_reward(
            verifier_dir, [{"role": "user", "content": question}], solution
        )
        tol = max(1e-4, eps32 * float(np.linalg.norm(weight) * np.linalg.norm(sample["final"][i])))
        assert raw[i] == pytest.approx(want, abs=tol)
        assert raw[i] == pytest.approx(from_features[i], abs=tol)
        assert probs[i] == pytest.approx(1 / (1 + math.exp(-raw[i])), abs=1e-6)
    # The trained head, not a zero or random one: on these (training) solutions the correct
    # ones outscore the incorrect ones on average.
    labels = sample["labels"].astype(bool)
    assert np.mean(np.array(raw)[labels]) > np.mean(np.array(raw)[~labels])


def test_features_recomputed_equal_the_training_cache(sample: dict[str, np.ndarray]) -> None:
    from bon_gateway.verifier.features import Featurizer

    featurizer = Featurizer()
    questions, solutions = sample["questions"].tolist(), sample["solutions"].tolist()
    for start in range(0, len(solutions), 4):
        ids = [featurizer.encode(questions[start], s) for s in solutions[start : start + 4]]
        assert [len(x) for x in ids] == sample["lengths"][start : start + 4].tolist()
        shared = featurizer.shared_prompt_hidden_states(ids)
        for offset, (sequence, states) in enumerate(zip(ids, shared, strict=True)):
            cached = sample["final"][start + offset]
            np.testing.assert_allclose(states[-1], cached, atol=1e-4, rtol=0)
            plain = featurizer.hidden_states(sequence)  # the one-unpadded-sequence reference
            np.testing.assert_allclose(plain[-1], cached, atol=1e-4, rtol=0)
