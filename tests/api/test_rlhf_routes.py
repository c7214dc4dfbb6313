"""The RLHF reward-server routes on the real gateway with real workers (tiny checkpoints).

verl's and OpenRLHF's own remote-reward-model clients, unchanged, get the reference
rewards (the plain transformers forward of one unpadded sequence, fp32); vLLM's
/classify, /pooling, /score and /rerank shapes with each input kind; bad input is a 400
naming the field.

verl's reward loop module imports packages that are not installed here (ray, tensordict,
omegaconf, codetiming, orjson: training-cluster dependencies): `import_with_stubs` puts an
empty stand-in module in sys.modules for each one that is missing, and only for those.
tensordict being absent, verl's DataProto cannot be built: `_OneSample` carries the two
fields `_preprocess_reward_inputs` reads (non_tensor_batch["raw_prompt"], batch[...]).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import math
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from bon_gateway.scoring.pool import WorkerPool
from tests.fakes.gateway import ServedGateway, gateway_config
from tests.fixtures import checkpoints, reward_checkpoints
from tests.fixtures.checkpoints import reference_raw_logits
from tests.scoring.test_math_reward_models import QUESTION, SYSTEM, reference_qwen2_prm

pytestmark = pytest.mark.integration

TOL = 1e-4
PROMPT = [{"role": "user", "content": "What is 2 + 2? Think about it and answer in one short sentence."}]
ANSWERS = ["4.", "It is 4, because 2 + 2 = 4.", "Five, I think, but I may be wrong about it."]
STEPS = ["Tom has 3 apples.", "He buys 4 more, so 3 + 4 = 7.", "The answer is \\boxed{7}."]


# -- the clients' modules ------------------------------------------------------------------


class _Stub(types.ModuleType):
    """An installed-nowhere module: any attribute is another stub (classes, decorators and
    type annotations of the importing module resolve to something)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Stub(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self

    def __or__(self, other: Any) -> Any:
        return self

    __ror__ = __or__

    def __getitem__(self, key: Any) -> Any:
        return self

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[type, ...]:
        return (object,)


def import_with_stubs(name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[str]]:
    """Import `name`, stubbing each missing third-party module it needs (never the client's own)."""
    stubbed: list[str] = []
    own = name.split(".")[0]
    if importlib.util.find_spec(own) is None:
        pytest.skip(f"{own} is not installed: `make rlhf-clients` (pip install --no-deps)")
    for _ in range(50):
        try:
            return importlib.import_module(name), stubbed
        except ModuleNotFoundError as err:
            missing = err.name or ""
            if not missing or missing.split(".")[0] == own:
                raise
            parts = missing.split(".")
            for i in range(1, len(parts) + 1):
                module = ".".join(parts[:i])
                if module not in sys.modules:
                    monkeypatch.setitem(sys.modules, module, _Stub(module))
                    stubbed.append(module)
            for loaded in [m for m in sys.modules if m == own or m.startswith(own + ".")]:
                monkeypatch.delitem(sys.modules, loaded)
    raise RuntimeError(f"could not import {name}")


# -- the gateway -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway() -> Iterator[ServedGateway]:
    config = gateway_config(
        "http://127.0.0.1:9",  # no generation here
        reward_models=[
            {"name": "rm", "path": str(checkpoints.tiny_llama_rm())},
            {"name": "cls", "path": str(checkpoints.tiny_qwen2_classifier())},
            {"name": "prm", "path": str(reward_checkpoints.tiny_qwen2_prm())},
        ],
    )
    # Three worker processes load torch at once: on a busy 2-core machine that takes minutes.
    served = ServedGateway(config, scorer_factory=WorkerPool).start(timeout_s=300)
    try:
        yield served
    finally:
        served.stop()


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _chat_text(path: Path, answer: str) -> str:
    text: str = _tokenizer(path).apply_chat_template(
        [*PROMPT, {"role": "assistant", "content": answer}], tokenize=False
    )
    return text


def _post(gateway: ServedGateway, path: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    reply = httpx.post(f"{gateway.http_url}{path}", json=body, timeout=120)
    assert reply.status_code == status, reply.text
    data: dict[str, Any] = reply.json()
    return data


def _rewards(gateway: ServedGateway, model: str, answers: list[str]) -> list[float]:
    body = _post(gateway, "/v1/rewards", {"model": model, "messages": PROMPT, "candidates": answers})
    return [item["reward"] for item in body["data"]]


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# -- the real clients --------------------------------------------------------------------------


class _OneSample:
    """What verl's `_preprocess_reward_inputs` reads of a one-sample DataProto."""

    def __init__(self, chat: list[dict[str, str]], response_ids: list[int]) -> None:
        self.non_tensor_batch = {"raw_prompt": chat}
        self.batch = {
            "responses": torch.tensor(response_ids),
            "attention_mask": torch.ones(len(response_ids), dtype=torch.long),
        }

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: Any) -> _OneSample:
        return self


def test_verl_reward_loop_classify(gateway: ServedGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    module, stubbed = import_with_stubs("verl.experimental.reward_loop.reward_loop", monkeypatch)
    assert "ray" in stubbed and not any(s.startswith("verl") for s in stubbed)
    path = Path(gateway.config.reward_model("rm").path)
    tok = _tokenizer(path)
    worker = module.RewardLoopWorker.__new__(module.RewardLoopWorker)
    worker.config = types.SimpleNamespace(
        reward=types.SimpleNamespace(
            reward_model=types.SimpleNamespace(rollout=types.SimpleNamespace(name="vllm"), model_path="rm")
        )
    )
    worker.reward_router_address = gateway.http_url.removeprefix("http://")
    worker.input_tokenizer = tok
    worker.reward_model_tokenizer = tok

    for answer in ANSWERS:
        sample = _OneSample(list(PROMPT), tok(answer, add_special_tokens=False)["input_ids"])
        got = asyncio.run(worker.compute_score_disrm(sample))["reward_score"]
        # What verl sends: the chat template with its leading BOS (SmolLM2's <|im_start|>) cut
        # off; tokenized as vLLM does (add_special_tokens: this tokenizer adds no BOS).
        text = _chat_text(path, answer).removeprefix(tok.bos_token)
        want = reference_raw_logits(path, tok(text)["input_ids"])[0]
        assert got == pytest.approx(want, abs=TOL)


def test_openrlhf_remote_rm_get_reward(gateway: ServedGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    module, stubbed = import_with_stubs("openrlhf.utils.agent", monkeypatch)
    assert not any(s.startswith("openrlhf") for s in stubbed)
    path = Path(gateway.config.reward_model("rm").path)
    executor = module.SingleTurnAgentExecutor(remote_rm_url=f"{gateway.http_url}/get_reward")
    queries = [_chat_text(path, a) for a in ANSWERS]  # prompt + response, BOS included
    prompts = [_chat_text(path, "")] * len(ANSWERS)
    (reply,) = asyncio.run(executor._fetch_rewards_via_http(queries, prompts, [None] * len(ANSWERS)))
    want = [checkpoints.reference_outcome_reward(path, PROMPT, a) for a in ANSWERS]
    assert reply["rewards"] == pytest.approx(want, abs=TOL)
    assert reply["scores"] == reply["rewards"] and reply["extra_logs"] == {}
    # The text already starts with the BOS: no second one, so /v1/rewards agrees exactly.
    assert reply["rewards"] == pytest.approx(_rewards(gateway, "rm", ANSWERS), abs=1e-6)


# -- vLLM's routes -------------------------------------------------------------------------------


def test_classify_every_input_kind(gateway: ServedGateway) -> None:
    path = Path(gateway.config.reward_model("rm").path)
    tok = _tokenizer(path)
    texts = [_chat_text(path, a) for a in ANSWERS]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    want = [reference_raw_logits(path, i)[0] for i in ids]
    raw = {"use_activation": False}
    cases: list[tuple[dict[str, Any], list[float]]] = [
        ({"input": texts[0], **raw}, want[:1]),
        ({"input": texts, **raw}, want),
        ({"input": ids[1], **raw}, want[1:2]),
        ({"input": ids, **raw}, want),
        ({"messages": [*PROMPT, {"role": "assistant", "content": ANSWERS[2]}], **raw}, want[2:]),
        ({"input": texts, "activation": False}, want),  # the deprecated names
        ({"input": texts, "softmax": False}, want),
        ({"input": texts}, [_sigmoid(w) for w in want]),  # activation on by default
    ]
    for body, expected in cases:
        reply = _post(gateway, "/classify", {"model": "rm", **body})
        assert reply["object"] == "list" and reply["model"] == "rm" and reply["id"].startswith("classify-")
        assert [d["index"] for d in reply["data"]] == list(range(len(expected)))
        assert [d["probs"][0] for d in reply["data"]] == pytest.approx(expected, abs=TOL), body
        assert all(d["num_classes"] == 1 and d["label"] == "LABEL_0" for d in reply["data"])
        assert reply["usage"]["prompt_tokens"] == reply["usage"]["total_tokens"] > 0
    assert want == pytest.approx(_rewards(gateway, "rm", ANSWERS), abs=TOL)


def test_classify_two_label_classifier(gateway: ServedGateway) -> None:
    path = Path(gateway.config.reward_model("cls").path)
    text = _chat_text(path, ANSWERS[1])
    logits = reference_raw_logits(path, _tokenizer(path)(text, add_special_tokens=False)["input_ids"])
    top = max(logits)
    softmax = [math.exp(x - top) / sum(math.exp(y - top) for y in logits) for x in logits]
    (item,) = _post(gateway, "/classify", {"model": "cls", "input": text})["data"]
    assert item["probs"] == pytest.approx(softmax, abs=TOL) and item["num_classes"] == 2
    assert item["label"] == f"LABEL_{softmax.index(max(softmax))}"
    (item,) = _post(gateway, "/pooling", {"model": "cls", "input": text, "use_activation": False})["data"]
    assert item["object"] == "pooling" and item["data"] == pytest.approx(logits, abs=TOL)


def _prm_text(path: Path) -> str:
    text: str = _tokenizer(path).apply_chat_template(
        [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": QUESTION},
            {"role": "assistant", "content": "<extra_0>".join(STEPS) + "<extra_0>"},
        ],
        tokenize=False,
    )
    return text


def test_pooling_token_classify_on_a_prm(gateway: ServedGateway) -> None:
    path = Path(gateway.config.reward_model("prm").path)
    want = reference_qwen2_prm(path, QUESTION, STEPS)
    for body in ({"task": "token_classify"}, {}):  # token_classify is a PRM's default task
        reply = _post(gateway, "/pooling", {"model": "prm", "input": _prm_text(path), **body})
        (item,) = reply["data"]
        assert reply["id"].startswith("pool-") and item["object"] == "pooling"
        assert [row[1] for row in item["data"]] == pytest.approx(want, abs=TOL)
        assert all(row[0] + row[1] == pytest.approx(1.0) for row in item["data"])
    (item,) = _post(gateway, "/pooling", {"model": "prm", "input": _prm_text(path), "task": "classify"})[
        "data"
    ]
    assert item["data"][1] == pytest.approx(want[-1], abs=TOL)
    # /get_reward on a PRM: its reward is the last step's (as /v1/rewards aggregates by default).
    assert _post(gateway, "/get_reward", {"model": "prm", "query": [_prm_text(path)]})["rewards"] == (
        pytest.approx([want[-1]], abs=TOL)
    )


def test_pooling_classify_matches_classify(gateway: ServedGateway) -> None:
    path = Path(gateway.config.reward_model("rm").path)
    texts = [_chat_text(path, a) for a in ANSWERS]
    classify = _post(gateway, "/classify", {"model": "rm", "input": texts})["data"]
    pooling = _post(gateway, "/pooling", {"model": "rm", "input": texts, "task": "classify"})["data"]
    assert [p["data"][0] for p in pooling] == pytest.approx([c["probs"][0] for c in classify], abs=1e-9)
    assert all(len(p["data"]) == 1 for p in pooling)


def test_score_and_rerank(gateway: ServedGateway) -> None:
    path = Path(gateway.config.reward_model("rm").path)
    query = PROMPT[0]["content"]
    want = [checkpoints.reference_outcome_reward(path, PROMPT, a) for a in ANSWERS]
    reply = _post(gateway, "/score", {"model": "rm", "text_1": query, "text_2": ANSWERS})
    assert reply["object"] == "list" and reply["id"].startswith("score-")
    assert [d["object"] for d in reply["data"]] == ["score"] * len(ANSWERS)
    assert [d["score"] for d in reply["data"]] == pytest.approx([_sigmoid(w) for w in want], abs=TOL)
    pairwise = _post(
        gateway,
        "/v1/score",
        {"model": "rm", "text_1": [query] * 3, "text_2": ANSWERS, "use_activation": False},
    )
    assert [d["score"] for d in pairwise["data"]] == pytest.approx(want, abs=TOL)

    reply = _post(gateway, "/rerank", {"model": "rm", "query": query, "documents": ANSWERS, "top_n": 2})
    order = sorted(range(len(want)), key=lambda i: -want[i])[:2]
    assert [r["index"] for r in reply["results"]] == order
    assert [r["document"]["text"] for r in reply["results"]] == [ANSWERS[i] for i in order]
    assert [r["relevance_score"] for r in reply["results"]] == pytest.approx(
        [_sigmoid(want[i]) for i in order], abs=TOL
    )
    assert reply["usage"]["total_tokens"] > 0


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/score", {"model": "cls", "text_1": "q", "text_2": ["a"]}, 400, "model"),
        ("/rerank", {"model": "cls", "query": "q", "documents": ["a"]}, 400, "model"),
        ("/classify", {"model": "nope", "input": "text"}, 404, "model"),
        ("/classify", {"model": "rm", "input": []}, 400, "input"),
        ("/classify", {"model": "rm", "input": ["ok text", ""]}, 400, "input[1]"),
        ("/classify", {"model": "rm", "input": [5, -1]}, 400, "input[0]"),
        ("/classify", {"model": "rm", "input": [10**9]}, 400, "input[0]"),
        ("/classify", {"model": "rm", "input": "x", "messages": PROMPT}, 400, "input"),
        ("/classify", {"model": "rm", "messages": PROMPT}, 400, "messages"),
        (
            "/classify",
            {"model": "rm", "input": "x", "truncate_prompt_tokens": -2},
            400,
            "truncate_prompt_tokens",
        ),
        ("/classify", {"model": "rm", "input": "x", "use_activation": "maybe"}, 400, "use_activation"),
        ("/pooling", {"model": "rm", "input": "x", "task": "embed"}, 400, "task"),
        ("/pooling", {"model": "rm", "input": "x", "task": "token_classify"}, 400, "task"),
        ("/pooling", {"model": "prm", "input": "no separator here"}, 400, "input[0]"),
        ("/score", {"model": "rm", "text_1": ["a", "b"], "text_2": ["c", "d", "e"]}, 400, "text_2"),
        ("/rerank", {"model": "rm", "query": "q"}, 400, "documents"),
        ("/get_reward", {"query": "not a list"}, 400, "query"),
        ("/get_reward", {"query": ["fine", ""]}, 400, "query[1]"),
        ("/get_reward", {"query": []}, 400, "query"),
    ],
)
def test_bad_input_names_the_field(
    gateway: ServedGateway, path: str, body: dict[str, Any], status: int, param: str
) -> None:
    error = _post(gateway, path, body, status)["error"]
    assert error["param"] == param, error
    assert error["message"]


def _reused_tokens(gateway: ServedGateway, model: str) -> float:
    text = gateway.metrics.render().decode()
    match = re.search(rf'^bon_reused_prompt_tokens_total\{{model="{model}"\}} (\S+)$', text, re.M)
    assert match is not None, "no bon_reused_prompt_tokens_total series"
    return float(match.group(1))


def test_one_sample_per_request_reuses_the_prompt(gateway: ServedGateway) -> None:
    """A GRPO group sent the way verl sends it (one sample per /classify request): from the
    second sample on, the prompt's keys and values come from the worker's prefix cache.
    Checked to fail (0 tokens reused) with the worker's raw prompt split turned off."""
    path = Path(gateway.config.reward_model("rm").path)
    tok = _tokenizer(path)
    prompt = [
        {"role": "user", "content": "Explain, step by step and in plain words, why the sky looks blue. " * 3}
    ]
    answers = [f"Because of Rayleigh scattering, reason number {i}." for i in range(4)]
    texts = [
        tok.apply_chat_template([*prompt, {"role": "assistant", "content": a}], tokenize=False)
        for a in answers
    ]
    before = _reused_tokens(gateway, "rm")
    got = [
        _post(gateway, "/classify", {"model": "rm", "input": t, "use_activation": False})["data"][0]["probs"][
            0
        ]
        for t in texts
    ]
    reused = _reused_tokens(gateway, "rm") - before
    header = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    prompt_tokens = len(tok(header, add_special_tokens=False)["input_ids"])
    assert prompt_tokens > 48
    # Each of the three later samples reuses (nearly) the whole prompt.
    assert reused >= 3 * (prompt_tokens - 16), (reused, prompt_tokens)
    want = [reference_raw_logits(path, tok(t, add_special_tokens=False)["input_ids"])[0] for t in texts]
    assert got == pytest.approx(want, abs=TOL)
