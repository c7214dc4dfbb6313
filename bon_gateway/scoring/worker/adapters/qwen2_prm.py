"""Qwen2ForProcessRewardModel (Qwen2.5-Math-PRM-7B/72B), loaded natively.

Layout: Qwen2Model under `model.*`, head `score` = Linear(h, h), ReLU,
Linear(h, 2) as `score.0` / `score.2` (modeling_qwen2_rm.py on the hub).

Input, as on the model card: the chat template of
[system "Please reason step by step, and put your final answer within \\boxed{}.",
 user = the question, assistant = steps joined by "<extra_0>" plus a final "<extra_0>"].
Per step: softmax(head(h at that step's "<extra_0>"))[1]. The separators are placed
by construction (see markers.py): a literal "<extra_0>" inside the question or a step
is tokenized as text and creates no step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.adapters.base import Adapter
from bon_gateway.scoring.worker.adapters.markers import (
    Special,
    candidate_steps,
    encode_pieces,
    template_specials,
)
from bon_gateway.scoring.worker.adapters.mlp_head import apply_mlp_head, load_qwen2_with_mlp_head
from bon_gateway.scoring.worker.formatting import Encoded, InvalidInput, Tokens, last_user_message
from bon_gateway.types import Message

SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
SEPARATOR = "<extra_0>"
# Stand-ins rendered through the chat template to find where the question and the
# answer go; private-use characters no template writes itself.
_Q, _A = "\ue000Q\ue000", "\ue000A\ue000"


class Qwen2ProcessRewardAdapter(Adapter):
    architectures: ClassVar[tuple[str, ...]] = ("Qwen2ForProcessRewardModel",)
    kind: ClassVar[str] = "process"

    def __init__(self, model: Any, tokenizer: Any, entry: RewardModelConfig, *, architecture: str) -> None:
        super().__init__(model, tokenizer, entry, architecture=architecture)
        sep = tokenizer.convert_tokens_to_ids(SEPARATOR)
        if sep is None or sep == tokenizer.unk_token_id:
            raise ValueError(f"{entry.path}: the tokenizer has no {SEPARATOR} token")
        self.sep_id = int(sep)
        skeleton = self.tok.render_chat(
            [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": _Q},
                {"role": "assistant", "content": _A},
            ]
        )
        if skeleton.count(_Q) != 1 or skeleton.count(_A) != 1 or skeleton.index(_Q) > skeleton.index(_A):
            raise ValueError(f"{entry.path}: the chat template does not place the question and answer once")
        before, rest = skeleton.split(_Q)
        middle, after = rest.split(_A)
        self._skeleton = (before, middle, after)

    @classmethod
    def load_model(cls, entry: RewardModelConfig, load_kwargs: dict[str, Any]) -> Any:
        return load_qwen2_with_mlp_head(entry, load_kwargs)

    @property
    def backbone(self) -> torch.nn.Module:
        module: torch.nn.Module = self.model.model
        return module

    def encode(self, messages: Sequence[Message], answer: str, steps: Sequence[str], *, what: str) -> Encoded:
        """Read at each separator this method inserts (user text cannot produce its id:
        it is tokenized with special tokens split, see markers.py)."""
        before, middle, after = self._skeleton
        question = last_user_message(messages)
        parts = candidate_steps(answer, steps, self.entry.steps.delimiter)
        text = before + question + middle
        answer_start = len(text)
        specials = template_specials(self.tok, text, 0, len(before))
        specials += template_specials(self.tok, text, len(before) + len(question), len(text))
        marks: list[int] = []
        for step in parts:
            text += step
            specials.append(Special(len(text), len(text) + len(SEPARATOR), self.sep_id))
            text += SEPARATOR
            marks.append(len(text))
        tail = len(text)
        text += after
        specials += template_specials(self.tok, text, tail, len(text))
        return encode_pieces(self.tok, text, specials, marks, answer_start, what=what)

    def encode_raw(self, ids: list[int], *, what: str) -> Encoded:
        """Read at every separator id in the input, as vLLM's STEP pooler does (a raw input's
        separators are the client's: it formatted the text)."""
        marks = [i for i, t in enumerate(ids) if t == self.sep_id]
        if not marks:
            raise InvalidInput(
                f"{what} has no {SEPARATOR} step separator: a process reward model scores each step "
                f"at the {SEPARATOR} after it",
                param=what,
            )
        tokens = Tokens(ids=ids, prompt_tokens=min(self.tok.raw_prompt_tokens(ids), marks[0]))
        return self.tok.fit(tokens, marks, what=what)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return apply_mlp_head(self.model.score, hidden)

    def reward(self, logits: torch.Tensor, activation: str) -> tuple[float, tuple[float, ...]]:
        # Step rewards are probabilities by definition (the card's softmax); `activation`
        # does not apply. The candidate's reward is aggregated by the engine; `last` here.
        probs = torch.softmax(logits.float(), dim=-1)[:, 1]
        steps = tuple(float(p) for p in probs)
        return steps[-1], steps
