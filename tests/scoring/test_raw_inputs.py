"""Raw inputs (the RLHF routes' text or token ids, no messages) in the worker, and the
pool's prompt affinity: unit tests, no server.

A raw text that is the model's chat template of a conversation becomes exactly the ids the
chat path makes, read at the same positions; the BOS rule follows vLLM's /classify
(add_special_tokens=True) without ever doubling a BOS the text already has.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from bon_gateway.config import RewardModelConfig
from bon_gateway.metrics import Metrics
from bon_gateway.scoring.pool import AFFINITY_SLACK, WorkerPool
from bon_gateway.scoring.wire import AFFINITY_CHARS, prompt_affinity
from bon_gateway.scoring.worker.formatting import InvalidInput, Tokenizing
from bon_gateway.scoring.worker.loading import load_adapter
from bon_gateway.types import Deadline, Message, RawInput
from tests.fakes.gateway import gateway_config
from tests.fixtures import checkpoints, reward_checkpoints

PROMPT = [Message("user", "What is 2 + 2? Answer in a short sentence, please.")]
ANSWER = "It is 4, because 2 + 2 = 4."


class _BosTokenizer:
    """A tokenizer that adds a BOS (as Llama 3's does): one id per character, BOS = 1."""

    bos_token = "<s>"
    bos_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = True, **_: Any) -> dict[str, list[int]]:
        ids: list[int] = []
        while text:
            if text.startswith(self.bos_token):
                ids.append(self.bos_token_id)
                text = text[len(self.bos_token) :]
            else:
                ids.append(100 + ord(text[0]))
                text = text[1:]
        return {"input_ids": [self.bos_token_id, *ids] if add_special_tokens else ids}


def test_raw_text_gets_one_bos_and_never_two() -> None:
    tok = Tokenizing(_BosTokenizer(), max_length=100, truncate_prompt=False)
    # No BOS in the text: added, as vLLM's /classify (add_special_tokens=True) adds it.
    assert tok.raw_ids("ab") == [1, 100 + ord("a"), 100 + ord("b")]
    # The text already starts with it (OpenRLHF decodes with special tokens): kept, not doubled.
    assert tok.raw_ids("<s>ab") == [1, 100 + ord("a"), 100 + ord("b")]


@pytest.mark.parametrize(
    "build", [checkpoints.tiny_llama_rm, reward_checkpoints.tiny_internlm2_rm], ids=["llama", "internlm2"]
)
def test_raw_chat_text_encodes_as_the_chat_path(build: Any) -> None:
    adapter = load_adapter(RewardModelConfig(name="rm", path=str(build())))
    chat = adapter.encode(PROMPT, ANSWER, (), what="candidates[0]")
    conversation = [{"role": m.role, "content": m.content} for m in PROMPT]
    text = adapter.tok.render_chat([*conversation, {"role": "assistant", "content": ANSWER}])
    raw = adapter.encode_raw(adapter.tok.raw_ids(text), what="input[0]")
    assert raw.ids == chat.ids and raw.positions == chat.positions
    # The prompt split (what the prefix cache keeps) ends inside the assistant header, at
    # most the one token before where the chat path's prompt ends.
    assert chat.prompt_tokens - 1 <= raw.prompt_tokens <= chat.prompt_tokens
    # Token ids are used as given (an InternLM2 input that ends in its reward token keeps one).
    assert adapter.encode_raw(list(chat.ids), what="input[0]").ids == chat.ids


def test_raw_input_to_a_prm_reads_its_separators() -> None:
    adapter = load_adapter(RewardModelConfig(name="prm", path=str(reward_checkpoints.tiny_qwen2_prm())))
    chat = adapter.encode(PROMPT, "", ("Step one.", "Step two."), what="candidates[0]")
    raw = adapter.encode_raw(list(chat.ids), what="input[0]")
    assert raw.positions == chat.positions and len(raw.positions) == 2
    with pytest.raises(InvalidInput) as err:
        adapter.encode_raw(adapter.tok.raw_ids("no separator"), what="input[3]")
    assert err.value.param == "input[3]"


def test_prompt_affinity_follows_the_prompt() -> None:
    prompt = "<|im_start|>user\n" + "A long question about the sky. " * 10
    assert len(prompt) > AFFINITY_CHARS
    one = prompt_affinity((), [RawInput(text=prompt + "answer one")])
    two = prompt_affinity((), [RawInput(text=prompt + "a different answer")])
    other = prompt_affinity((), [RawInput(text="X" + prompt)])
    assert one is not None and one == two and one != other
    assert prompt_affinity((), [RawInput(text="short")]) is None  # the answer would be in the hash
    assert prompt_affinity(PROMPT) == prompt_affinity(list(PROMPT)) != prompt_affinity([Message("user", "b")])
    ids = tuple(range(100))
    assert prompt_affinity((), [RawInput(token_ids=(*ids, 5))]) == prompt_affinity(
        (), [RawInput(token_ids=ids)]
    )


async def test_pick_sends_a_prompt_to_its_worker_unless_it_is_much_busier() -> None:
    pool = WorkerPool(gateway_config("http://127.0.0.1:9"), Metrics())
    workers: list[Any] = [SimpleNamespace(serving=True, inflight=0) for _ in range(3)]
    pool._workers["rm"] = workers
    deadline = Deadline.after(5)
    home = workers[7 % 3]
    assert await pool._pick("rm", set(), deadline, affinity=7) is home
    home.inflight = AFFINITY_SLACK  # busier, within the slack: still home
    assert await pool._pick("rm", set(), deadline, affinity=7) is home
    home.inflight = AFFINITY_SLACK + 1  # beyond: the least loaded
    assert await pool._pick("rm", set(), deadline, affinity=7) is not home
    home.inflight = 0
    home.serving = False  # down: another one
    assert await pool._pick("rm", set(), deadline, affinity=7) is not home
    home.serving = True  # a retry excludes the worker that failed
    assert await pool._pick("rm", {id(home)}, deadline, affinity=7) is not home
    # Without affinity: the least loaded, as before.
    workers[0].inflight, workers[1].inflight, workers[2].inflight = 2, 0, 1
    assert await pool._pick("rm", set(), deadline) is workers[1]
    await asyncio.sleep(0)
