"""Qwen2.5-Math RM/PRM, InternLM2 reward and math-shepherd causal PRMs through real workers.

Each reference is written here, independently of the worker's adapters: one
unpadded sequence, fp32, the model card's input string and formula; the
InternLM2 reference runs its own forward pass from the packed `wqkv` weights.
The worker must match within 1e-4 alone, batched with other requests of other
lengths, and through prompt reuse.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch

from bon_gateway.metrics import Metrics
from bon_gateway.scoring.pool import WorkerPool
from bon_gateway.types import Deadline, Message
from tests.fixtures import checkpoints, reward_checkpoints
from tests.scoring.helpers import gateway_config

TOL = 1e-4
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QUESTION = "Tom has 3 apples and buys 4 more. How many apples does he have now?"
MESSAGES = (Message("user", QUESTION),)
TAG = " ки"


def step_lists() -> list[list[str]]:
    """Candidates of 1 to 20 steps, of different lengths (no Cyrillic, see the causal PRM)."""
    out = []
    for n in (1, 2, 3, 5, 8, 13, 20):
        out.append([f"Step {i + 1}: " + "we add " * (1 + (i * n) % 4) + f"{i} and {n}." for i in range(n)])
    out.append(["Tom has 3 apples.", "He buys 4 more, so 3 + 4 = 7.", "The answer is \\boxed{7}."])
    return out


# -- references -------------------------------------------------------------------------------
_CACHE: dict[str, Any] = {}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    key = f"tensors:{path}"
    if key not in _CACHE:
        _CACHE[key] = load_file(str(path / "model.safetensors"))
    return _CACHE[key]  # type: ignore[no-any-return]


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    key = f"tok:{path}"
    if key not in _CACHE:
        _CACHE[key] = AutoTokenizer.from_pretrained(path)
    return _CACHE[key]


def _qwen2(path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    """transformers' Qwen2Model filled from `model.*` (strict) and the raw `score.*` tensors."""
    import transformers

    key = f"qwen2:{path}"
    if key not in _CACHE:
        raw = json.loads((path / "config.json").read_text())
        kept = {k: v for k, v in raw.items() if k not in ("auto_map", "architectures")}
        config = transformers.Qwen2Config(**kept)
        model = transformers.Qwen2Model(config).eval()
        tensors = _tensors(path)
        state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(state, strict=True)
        assert {k for k in tensors if not k.startswith("model.")} == {
            "score.0.weight",
            "score.0.bias",
            "score.2.weight",
            "score.2.bias",
        }
        _CACHE[key] = (model, tensors)
    return _CACHE[key]  # type: ignore[no-any-return]


def _score_head(t: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    x = torch.relu(h @ t["score.0.weight"].T + t["score.0.bias"])
    return x @ t["score.2.weight"].T + t["score.2.bias"]


def reference_qwen2_prm(path: Path, question: str, steps: Sequence[str]) -> list[float]:
    """Qwen2.5-Math-PRM card: steps joined by <extra_0> plus a final one; softmax(...)[1] there."""
    tok = _tokenizer(path)
    model, tensors = _qwen2(path)
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": "<extra_0>".join(steps) + "<extra_0>"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    ids = torch.tensor([tok.encode(text)])
    sep = tok.encode("<extra_0>")[0]
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state[0]
        probs = torch.softmax(_score_head(tensors, hidden), dim=-1)
    mask = ids[0] == sep
    return [float(p) for p in probs[mask][:, 1]]


def reference_qwen2_rm(path: Path, messages: Sequence[dict[str, str]], answer: str) -> float:
    """Qwen2.5-Math-RM card: the chat template, head output at the last token."""
    tok = _tokenizer(path)
    model, tensors = _qwen2(path)
    text = tok.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state[0]
        return float(_score_head(tensors, hidden)[-1, 0])


def reference_causal_prm(path: Path, question: str, steps: Sequence[str]) -> list[float]:
    """math-shepherd card: question + " " + "Step ... ки\\nStep ... ки"; softmax over [+, -] at the tags."""
    from transformers import AutoModelForCausalLM

    tok = _tokenizer(path)
    key = f"lm:{path}"
    if key not in _CACHE:
        _CACHE[key] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = _CACHE[key]
    text = question + " " + "\n".join(step + TAG for step in steps)
    ids = torch.tensor([tok.encode(text)])
    tag_id = tok.encode(TAG)[-1]
    good = tok.encode("+", add_special_tokens=False)[0]
    bad = tok.encode("-", add_special_tokens=False)[0]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    picked = logits[ids[0] == tag_id][:, [good, bad]]
    return [float(p) for p in torch.softmax(picked, dim=-1)[:, 0]]


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def internlm2_forward(path: Path, ids: Sequence[int]) -> float:
    """InternLM2ForRewardModel from its packed weights, plain torch ops (modeling_internlm2.py).

    wqkv rows are [kv_heads, groups + 2, head_dim]: per KV head its query heads, then its
    key, then its value (`rearrange("b q (h gs d) -> b q h gs d", gs=2 + groups)`).
    """
    cfg = json.loads((path / "config.json").read_text())
    t = _tensors(path)
    heads, kv, h = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]
    d, groups, eps = h // heads, heads // kv, cfg["rms_norm_eps"]
    n = len(ids)
    x = t["model.tok_embeddings.weight"][torch.tensor(ids)]
    inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(n, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().float()[:, None, :], emb.sin().float()[:, None, :]
    causal = torch.full((n, n), float("-inf")).triu(1)
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        hn = _rms(x, t[p + "attention_norm.weight"], eps)
        qkv = hn @ t[p + "attention.wqkv.weight"].T
        if cfg["bias"]:
            qkv = qkv + t[p + "attention.wqkv.bias"]
        qkv = qkv.view(n, kv, groups + 2, d)
        q = qkv[:, :, :groups].reshape(n, heads, d)
        k = qkv[:, :, -2]
        v = qkv[:, :, -1]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d) + causal
        out = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v).reshape(n, heads * d)
        out = out @ t[p + "attention.wo.weight"].T
        if cfg["bias"]:
            out = out + t[p + "attention.wo.bias"]
        x = x + out
        hn = _rms(x, t[p + "ffn_norm.weight"], eps)
        gate = torch.nn.functional.silu(hn @ t[p + "feed_forward.w1.weight"].T)
        x = x + (gate * (hn @ t[p + "feed_forward.w3.weight"].T)) @ t[p + "feed_forward.w2.weight"].T
    x = _rms(x, t["model.norm.weight"], eps)
    return float(x[-1] @ t["v_head.weight"][0])


def reference_internlm2(path: Path, messages: Sequence[dict[str, str]], answer: str) -> float:
    """internlm2-reward card get_score: template (no generation prompt), no special tokens, + reward token."""
    tok = _tokenizer(path)
    cfg = json.loads((path / "config.json").read_text())
    text = tok.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    ids = [*tok.encode(text, add_special_tokens=False), cfg["reward_token_id"]]
    with torch.no_grad():
        return internlm2_forward(path, ids)


# -- the pool -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paths() -> dict[str, Path]:
    return {
        "prm": reward_checkpoints.tiny_qwen2_prm(),
        "math_rm": reward_checkpoints.tiny_qwen2_math_rm(),
        "internlm2": reward_checkpoints.tiny_internlm2_rm(),
        "internlm2_bias": reward_checkpoints.tiny_internlm2_rm_bias(),
        "shepherd": checkpoints.tiny_judge_lm(),
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool(paths: dict[str, Path]) -> AsyncIterator[WorkerPool]:
    config = gateway_config(
        {"name": "prm", "path": str(paths["prm"])},
        {"name": "math_rm", "path": str(paths["math_rm"])},
        {"name": "internlm2", "path": str(paths["internlm2"])},
        {"name": "internlm2_bias", "path": str(paths["internlm2_bias"])},
        {"name": "shepherd", "path": str(paths["shepherd"]), "kind": "causal_prm"},
    )
    pool = WorkerPool(config, Metrics())
    await pool.start()
    yield pool
    await pool.aclose()


def _reused(pool: WorkerPool, model: str) -> float:
    value = pool.metrics.registry.get_sample_value("bon_reused_prompt_tokens_total", {"model": model})
    return float(value or 0.0)


PRMS = {"prm": reference_qwen2_prm, "shepherd": reference_causal_prm}


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("model", ["prm", "shepherd"])
async def test_prm_steps_alone_batched_and_reused(
    pool: WorkerPool, paths: dict[str, Path], model: str
) -> None:
    ref = PRMS[model]
    lists = step_lists()
    want = [ref(paths[model], QUESTION, steps) for steps in lists]
    assert [len(w) for w in want] == [len(s) for s in lists]
    # Alone: one candidate per request, one request at a time (no prefix to reuse).
    for steps, expected in zip(lists, want, strict=True):
        got = await pool.score(model, MESSAGES, ["".join(steps)], steps=[steps], deadline=Deadline.after(60))
        assert got.scores[0].step_rewards == pytest.approx(expected, abs=TOL)
        assert got.scores[0].reward == pytest.approx(expected[-1], abs=TOL)
    # Batched with other lengths: concurrent single-candidate requests (padded batches).
    results = await asyncio.gather(
        *(pool.score(model, MESSAGES, ["".join(s)], steps=[s], deadline=Deadline.after(60)) for s in lists)
    )
    for result, expected in zip(results, want, strict=True):
        assert result.scores[0].step_rewards == pytest.approx(expected, abs=TOL)
    # Prompt reuse: all candidates of a request share the prompt; concurrent groups too.
    before = _reused(pool, model)
    rotations = [lists[i:] + lists[:i] for i in range(3)]
    results = await asyncio.gather(
        *(
            pool.score(model, MESSAGES, ["".join(s) for s in r], steps=r, deadline=Deadline.after(60))
            for r in rotations
        )
    )
    assert _reused(pool, model) > before
    for rotation, result in zip(rotations, results, strict=True):
        for steps, score in zip(rotation, result.scores, strict=True):
            assert score.step_rewards == pytest.approx(want[lists.index(steps)], abs=TOL)


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("model", ["prm", "shepherd"])
async def test_prm_splits_candidates_on_the_delimiter(
    pool: WorkerPool, paths: dict[str, Path], model: str
) -> None:
    lists = step_lists()[:4]
    texts = ["\n\n".join(s) for s in lists]
    got = await pool.score(model, MESSAGES, texts, deadline=Deadline.after(60))
    for steps, score in zip(lists, got.scores, strict=True):
        assert score.step_rewards == pytest.approx(PRMS[model](paths[model], QUESTION, steps), abs=TOL)


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
async def test_prm_separator_text_in_user_input_is_not_a_step(
    pool: WorkerPool, paths: dict[str, Path]
) -> None:
    """A literal "<extra_0>" in the question or a step is text: no extra step, not the special id."""
    import re

    question = "Is <extra_0> a step? " + QUESTION
    steps = ["First <extra_0> we count.", "Then 3 + 4 = 7<extra_0>", "So \\boxed{7}."]
    got = await pool.score(
        "prm", (Message("user", question),), ["".join(steps)], steps=[steps], deadline=Deadline.after(60)
    )
    assert len(got.scores[0].step_rewards) == 3
    # Reference: the card's formula on ids where only the template's tokens and the inserted
    # separators are special; the user's "<extra_0>" is spelled out as text.
    path = paths["prm"]
    tok = _tokenizer(path)
    model, tensors = _qwen2(path)
    marker = "\ue001"  # the inserted separators, while the user's literals stay as they are
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": question},
        {"role": "assistant", "content": marker.join(steps) + marker},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    sep = tok.convert_tokens_to_ids("<extra_0>")
    special = {"<|im_start|>": 1, "<|im_end|>": 2, marker: sep}
    ids: list[int] = []
    pos = 0
    for m in re.finditer("|".join(re.escape(k) for k in special), text):
        ids += tok(text[pos : m.start()], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        ids.append(special[m.group(0)])
        pos = m.end()
    ids += tok(text[pos:], add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ids.count(sep) == 3
    with torch.no_grad():
        hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        probs = torch.softmax(_score_head(tensors, hidden), dim=-1)[torch.tensor(ids) == sep][:, 1]
    assert got.scores[0].step_rewards == pytest.approx([float(p) for p in probs], abs=TOL)


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
async def test_causal_prm_tag_text_in_a_step_is_not_a_step(pool: WorkerPool, paths: dict[str, Path]) -> None:
    """A "ки" inside a step is text: the tag positions come from construction, not from the ids."""
    steps = ["We write ки here.", "Then 3 + 4 = 7.", "So \\boxed{7}."]
    got = await pool.score("shepherd", MESSAGES, ["".join(steps)], steps=[steps], deadline=Deadline.after(60))
    assert len(got.scores[0].step_rewards) == 3
    # The card's id search finds 4 tags here; the first is the user's text, the rest are steps.
    found = reference_causal_prm(paths["shepherd"], QUESTION, steps)
    assert len(found) == 4
    assert got.scores[0].step_rewards == pytest.approx(found[1:], abs=TOL)


MESSAGE_DICTS = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
OUTCOME = {
    "math_rm": reference_qwen2_rm,
    "internlm2": reference_internlm2,
    "internlm2_bias": reference_internlm2,
}


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
@pytest.mark.parametrize("model", ["math_rm", "internlm2", "internlm2_bias"])
async def test_outcome_rm_alone_batched_and_reused(
    pool: WorkerPool, paths: dict[str, Path], model: str
) -> None:
    from tests.scoring.helpers import mixed_candidates

    messages = tuple(Message(m["role"], m["content"]) for m in MESSAGE_DICTS)
    candidates = mixed_candidates()
    want = [OUTCOME[model](paths[model], MESSAGE_DICTS, c) for c in candidates]
    for answer, expected in zip(candidates[:3], want[:3], strict=True):
        got = await pool.score(model, messages, [answer], deadline=Deadline.after(60))
        assert got.scores[0].reward == pytest.approx(expected, abs=TOL)
        assert got.scores[0].step_rewards == ()
    results = await asyncio.gather(
        *(pool.score(model, messages, [c], deadline=Deadline.after(60)) for c in candidates)
    )
    for result, expected in zip(results, want, strict=True):
        assert result.scores[0].reward == pytest.approx(expected, abs=TOL)
    before = _reused(pool, model)
    rotations = [candidates[i:] + candidates[:i] for i in range(3)]
    results = await asyncio.gather(
        *(pool.score(model, messages, r, deadline=Deadline.after(60)) for r in rotations)
    )
    assert _reused(pool, model) > before
    for rotation, result in zip(rotations, results, strict=True):
        for answer, score in zip(rotation, result.scores, strict=True):
            assert score.reward == pytest.approx(want[candidates.index(answer)], abs=TOL)


@pytest.mark.integration
@pytest.mark.asyncio(loop_scope="module")
async def test_models_report_architectures(pool: WorkerPool) -> None:
    got = {m.name: m.architecture for m in pool.models()}
    assert got == {
        "prm": "Qwen2ForProcessRewardModel",
        "math_rm": "Qwen2ForRewardModel",
        "internlm2": "InternLM2ForRewardModel",
        "internlm2_bias": "InternLM2ForRewardModel",
        "shepherd": "LlamaForCausalLM",
    }


def test_wqkv_unpacking_matches_internlm2_rearrangement() -> None:
    """unpack_wqkv against the modeling file's rearrange, head by head."""
    from bon_gateway.scoring.worker.adapters.internlm2 import unpack_wqkv

    heads, kv, d, h = 8, 2, 4, 16
    groups = heads // kv
    w = torch.arange((heads + 2 * kv) * d * h, dtype=torch.float32).view(-1, h)
    q, k, v = unpack_wqkv(w, heads, kv, d)
    for head in range(heads):
        block = (head // groups) * (groups + 2) + head % groups
        assert torch.equal(q[head * d : (head + 1) * d], w[block * d : (block + 1) * d])
    for j in range(kv):
        key_block, value_block = j * (groups + 2) + groups, j * (groups + 2) + groups + 1
        assert torch.equal(k[j * d : (j + 1) * d], w[key_block * d : (key_block + 1) * d])
        assert torch.equal(v[j * d : (j + 1) * d], w[value_block * d : (value_block + 1) * d])
