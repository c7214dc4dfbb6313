"""Any causal LM as a judge: logit(yes) - logit(no) after a judging prompt.

The prompt is the model's chat template of one user message built from the
model entry's `judge.template` ({question} = the last user message, {answer} =
the candidate) with the generation prompt added; the score is read at the last
position, where the model would write its verdict.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.adapters.base import Adapter, lm_logits_for
from bon_gateway.scoring.worker.formatting import Encoded, InvalidInput, last_user_message
from bon_gateway.types import Message


class JudgeAdapter(Adapter):
    architectures: ClassVar[tuple[str, ...]] = ()  # chosen by kind="judge", any *ForCausalLM
    kind: ClassVar[str] = "judge"

    def __init__(self, model: Any, tokenizer: Any, entry: RewardModelConfig, *, architecture: str) -> None:
        super().__init__(model, tokenizer, entry, architecture=architecture)
        self.yes_id = self.tok.first_token(entry.judge.yes)
        self.no_id = self.tok.first_token(entry.judge.no)

    @classmethod
    def load_model(cls, entry: RewardModelConfig, load_kwargs: dict[str, Any]) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(entry.path, **load_kwargs)

    def encode(self, messages: Sequence[Message], answer: str, steps: Sequence[str], *, what: str) -> Encoded:
        template = self.entry.judge.template
        content = template.format(question=last_user_message(messages), answer=answer)
        text = self.tok.render_chat([{"role": "user", "content": content}], add_generation_prompt=True)
        # Everything up to the answer is prompt; what follows it is part of the candidate's
        # own tokens (never cut when truncating).
        prefix = template.split("{answer}", 1)[0].format(question=last_user_message(messages))
        start = text.find(prefix)
        answer_start = start + len(prefix) if start >= 0 else 0
        tokens = self.tok.tokenize(text, answer_start)
        return self.tok.fit(tokens, [len(tokens.ids) - 1], what=what)

    def encode_raw(self, ids: list[int], *, what: str) -> Encoded:
        raise InvalidInput(
            f"{what}: model {self.entry.name!r} takes no raw input "
            "(a judge reads a question and an answer through its judging prompt); send messages",
            param=what,
        )

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_logits_for(self.model, self.config, hidden, (self.yes_id, self.no_id))

    def reward(self, logits: torch.Tensor, activation: str) -> tuple[float, tuple[float, ...]]:
        row = logits[-1]
        diff = row[0] - row[1]
        if activation in ("sigmoid", "softmax"):
            # softmax over {yes, no} equals sigmoid of the difference
            return float(torch.sigmoid(diff)), ()
        return self.normalize(float(diff), activation), ()
