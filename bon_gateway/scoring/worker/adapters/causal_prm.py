"""Causal-LM process reward models, math-shepherd style (kind = "causal_prm").

Any *ForCausalLM (math-shepherd-mistral-7b-prm is a MistralForCausalLM/Llama).
Input, as on the math-shepherd card: question + " " + the steps, each followed by
the step tag (" ки"), steps separated by "\\n" ("Step 1: ... ки\\nStep 2: ... ки").
Per step: softmax over the LM logits of [good_token, bad_token] ("+", "-") at
the tag's last token, probability of good. Token ids come from the model entry's
`steps` settings.

The card finds the tags by searching the ids for the tag id; here the tag
positions are known by construction (character offsets of the inserted tags), so
a "ки" that the question or a step contains is read as text and creates no step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.adapters.base import Adapter, lm_logits_for
from bon_gateway.scoring.worker.adapters.markers import candidate_steps, encode_pieces
from bon_gateway.scoring.worker.formatting import Encoded, InvalidInput, last_user_message
from bon_gateway.types import Message

STEP_JOIN = "\n"  # between "... ки" and the next step, as in math-shepherd's data


class CausalPRMAdapter(Adapter):
    architectures: ClassVar[tuple[str, ...]] = ()  # chosen by kind="causal_prm", any *ForCausalLM
    kind: ClassVar[str] = "process"

    def __init__(self, model: Any, tokenizer: Any, entry: RewardModelConfig, *, architecture: str) -> None:
        super().__init__(model, tokenizer, entry, architecture=architecture)
        self.good_id = self.tok.first_token(entry.steps.good_token)
        self.bad_id = self.tok.first_token(entry.steps.bad_token)
        if self.good_id == self.bad_id:
            raise ValueError("steps.good_token and steps.bad_token encode to the same token")

    @classmethod
    def load_model(cls, entry: RewardModelConfig, load_kwargs: dict[str, Any]) -> Any:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(entry.path, **load_kwargs)

    def build_text(self, question: str, steps: Sequence[str]) -> tuple[str, int, list[int]]:
        """The card's input string, where the answer starts and where each tag ends."""
        tag = self.entry.steps.step_tag
        text = question + " "
        answer_start = len(text)
        marks: list[int] = []
        for i, step in enumerate(steps):
            if i:
                text += STEP_JOIN
            text += step + tag
            marks.append(len(text))
        return text, answer_start, marks

    def encode(self, messages: Sequence[Message], answer: str, steps: Sequence[str], *, what: str) -> Encoded:
        parts = candidate_steps(answer, steps, self.entry.steps.delimiter)
        text, answer_start, marks = self.build_text(last_user_message(messages), parts)
        # No trusted specials: the whole input is text, tokenized in one piece like the card
        # (plus the tokenizer's own BOS when it adds one). A tag is ordinary text, so its
        # positions cannot be recovered from the ids: they come from where it was inserted.
        return encode_pieces(self.tok, text, [], marks, answer_start, what=what)

    def encode_raw(self, ids: list[int], *, what: str) -> Encoded:
        raise InvalidInput(
            f"{what}: model {self.entry.name!r} takes no raw input "
            "(a causal-LM PRM places its step tags itself (they are ordinary text)); send messages",
            param=what,
        )

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_logits_for(self.model, self.config, hidden, (self.good_id, self.bad_id))

    def reward(self, logits: torch.Tensor, activation: str) -> tuple[float, tuple[float, ...]]:
        # Probabilities by definition (softmax over good/bad); `activation` does not apply.
        probs = torch.softmax(logits.float(), dim=-1)[:, 0]
        steps = tuple(float(p) for p in probs)
        return steps[-1], steps
