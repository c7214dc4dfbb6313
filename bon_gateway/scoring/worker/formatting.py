"""Chat formatting and tokenization for reward models.

The reward model must see exactly the token sequence it was trained on: the
model's own chat template, one BOS (never two), and the answer never cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bon_gateway.types import Message


class InputTooLong(ValueError):
    """An input exceeds the model's max_length (mapped to INVALID_ARGUMENT)."""


@dataclass(frozen=True, slots=True)
class Encoded:
    """One candidate ready for the backbone."""

    ids: list[int]
    # Number of leading tokens that belong to the prompt (everything before the answer).
    prompt_tokens: int


def as_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


class Tokenizing:
    """Wraps a Hugging Face tokenizer: BOS handling, answer span, truncation."""

    def __init__(self, tokenizer: Any, *, max_length: int, truncate_prompt: bool) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncate_prompt = truncate_prompt
        bos = tokenizer.bos_token
        probe = tokenizer("a")["input_ids"]
        # Some tokenizers (Llama 3, Gemma) add a BOS themselves and their chat template also
        # writes one: the template's copy is stripped so the sequence holds exactly one.
        self._strip_bos = (
            bos is not None and tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
        )
        self._bos = bos or ""

    def render_chat(self, conversation: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        text: str = self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return text

    def encode(self, text: str, answer_start: int, *, what: str = "input") -> Encoded:
        """Tokenize `text`; characters before `answer_start` are the prompt.

        Over-long input is left-truncated in the prompt when configured, else rejected;
        the answer is never cut.
        """
        if self._strip_bos and self._bos and text.startswith(self._bos):
            text = text[len(self._bos) :]
            answer_start -= len(self._bos)
        enc = self.tokenizer(text, return_offsets_mapping=True)
        ids: list[int] = list(enc["input_ids"])
        offsets = enc["offset_mapping"]
        # A token belongs to the prompt when it ends before the answer starts.
        prompt_tokens = 0
        for i, (_, end) in enumerate(offsets):
            if end <= answer_start or (i == 0 and self._strip_bos and ids[0] == self.tokenizer.bos_token_id):
                prompt_tokens = i + 1
            else:
                break
        if len(ids) > self.max_length:
            excess = len(ids) - self.max_length
            # Keep a leading BOS: the model was trained with it in first position.
            keep_head = 1 if ids and ids[0] == self.tokenizer.bos_token_id else 0
            if not self.truncate_prompt or excess > prompt_tokens - keep_head:
                raise InputTooLong(
                    f"{what} has {len(ids)} tokens, above the reward model's max_length of "
                    f"{self.max_length} tokens"
                    + ("" if self.truncate_prompt else " (set truncate_prompt to left-truncate the prompt)")
                )
            ids = ids[:keep_head] + ids[keep_head + excess :]
            prompt_tokens -= excess
        return Encoded(ids=ids, prompt_tokens=prompt_tokens)

    def encode_chat(self, messages: Sequence[Message], answer: str, *, what: str) -> Encoded:
        """The chat template of [*messages, assistant answer], tokenized."""
        text = self.render_chat([*as_dicts(messages), {"role": "assistant", "content": answer}])
        start = text.rfind(answer) if answer else len(text)
        if start < 0:  # the template rewrote the answer (e.g. stripped it): treat it all as answer
            start = 0
        return self.encode(text, start, what=what)

    def first_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"{word!r} encodes to no token")
        return int(ids[0])
