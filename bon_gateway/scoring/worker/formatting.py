"""Chat formatting and tokenization for reward models.

The reward model must see exactly the token sequence it was trained on: the
model's own chat template, one BOS (never two), and the answer never cut.
Every adapter's `encode()` ends in `Tokenizing.fit`, the one place that
left-truncates an over-long prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bon_gateway.types import Message


class InvalidInput(ValueError):
    """An input the model cannot score (mapped to INVALID_ARGUMENT on `param`)."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param  # the request field: candidates[i], input[i]


class InputTooLong(InvalidInput):
    """An input exceeds the model's max_length."""


@dataclass(frozen=True, slots=True)
class Tokens:
    """Token ids of one candidate's input, before fitting them to max_length."""

    ids: list[int]
    # Number of leading tokens that belong to the prompt (everything before the answer).
    prompt_tokens: int


@dataclass(frozen=True, slots=True)
class Encoded:
    """One candidate ready for the backbone."""

    ids: list[int]
    # Number of leading tokens that belong to the prompt (everything before the answer).
    prompt_tokens: int
    # Where the head reads hidden states: the last or pooled token, or one per step separator.
    positions: list[int]


def as_dicts(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


def last_user_message(messages: Sequence[Message]) -> str:
    """The question a judge or a PRM grades: the last user turn (else the last message)."""
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    return messages[-1].content if messages else ""


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
        self.adds_bos = tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]
        self._strip_bos = bos is not None and self.adds_bos
        self._bos = bos or ""
        self._assistant_header: list[int] | None = None

    @property
    def bos_id(self) -> int | None:
        bos: int | None = self.tokenizer.bos_token_id
        return bos

    def render_chat(self, conversation: list[dict[str, str]], *, add_generation_prompt: bool = False) -> str:
        text: str = self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return text

    def tokenize(self, text: str, answer_start: int) -> Tokens:
        """Tokenize `text`; characters before `answer_start` are the prompt."""
        if self._strip_bos and self._bos and text.startswith(self._bos):
            text = text[len(self._bos) :]
            answer_start -= len(self._bos)
        enc = self.tokenizer(text, return_offsets_mapping=True)
        ids: list[int] = list(enc["input_ids"])
        # A token belongs to the prompt when it ends before the answer starts.
        prompt_tokens = 0
        for i, (_, end) in enumerate(enc["offset_mapping"]):
            if end <= answer_start or (i == 0 and self._strip_bos and ids[0] == self.bos_id):
                prompt_tokens = i + 1
            else:
                break
        return Tokens(ids=ids, prompt_tokens=prompt_tokens)

    def chat_tokens(self, messages: Sequence[Message], answer: str) -> Tokens:
        """The chat template of [*messages, assistant answer], tokenized."""
        text = self.render_chat([*as_dicts(messages), {"role": "assistant", "content": answer}])
        start = text.rfind(answer) if answer else len(text)
        if start < 0:  # the template rewrote the answer (e.g. stripped it): treat it all as answer
            start = 0
        return self.tokenize(text, start)

    def fit(self, tokens: Tokens, positions: Sequence[int], *, what: str) -> Encoded:
        """`tokens` within max_length, read at `positions` (indices into `tokens.ids`).

        Over-long input is left-truncated in the prompt when configured (a leading BOS
        is kept: the model was trained with it in first position), else rejected; the
        answer and every position read are never cut, positions after the cut shift.
        """
        ids, prompt_tokens = tokens.ids, tokens.prompt_tokens
        excess = len(ids) - self.max_length
        if excess <= 0:
            return Encoded(ids=ids, prompt_tokens=prompt_tokens, positions=list(positions))
        keep_head = 1 if ids and ids[0] == self.bos_id else 0
        cut = range(keep_head, keep_head + excess)
        if not self.truncate_prompt or excess > prompt_tokens - keep_head or any(p in cut for p in positions):
            raise InputTooLong(
                f"{what} has {len(ids)} tokens, above the reward model's max_length of "
                f"{self.max_length} tokens"
                + ("" if self.truncate_prompt else " (set truncate_prompt to left-truncate the prompt)"),
                param=what,
            )
        return Encoded(
            ids=ids[:keep_head] + ids[keep_head + excess :],
            prompt_tokens=prompt_tokens - excess,
            positions=[p - excess if p >= cut.stop else p for p in positions],
        )

    def raw_ids(self, text: str) -> list[int]:
        """Text that is already the model's input (a chat template applied), tokenized as
        vLLM's /classify tokenizes a string (add_special_tokens=True), except that a text
        that already starts with the BOS gets no second one."""
        bos = self.tokenizer.bos_token
        starts_with_bos = bool(bos) and text.startswith(bos)
        ids: list[int] = list(self.tokenizer(text, add_special_tokens=not starts_with_bos)["input_ids"])
        return ids

    def assistant_header(self) -> list[int]:
        """The ids that open the assistant's turn in this model's chat template (what
        add_generation_prompt writes, less its last token, which could merge with the
        answer's first characters); [] without a template. Cached."""
        if self._assistant_header is not None:
            return self._assistant_header
        header: list[int] = []
        try:
            turn = [{"role": "user", "content": "\ue000"}]
            with_prompt = self.render_chat(turn, add_generation_prompt=True)
            without = self.render_chat(turn)
        except Exception:  # no chat template, or one that refuses this turn
            with_prompt = without = ""
        if with_prompt.startswith(without) and len(with_prompt) > len(without):
            ids = self.tokenizer(with_prompt[len(without) :], add_special_tokens=False)["input_ids"]
            header = list(ids[:-1]) if len(ids) > 1 else list(ids)
        self._assistant_header = header
        return header

    def raw_prompt_tokens(self, ids: Sequence[int]) -> int:
        """How many leading ids of a raw input are its prompt: up to the end of the last
        assistant-turn header (the answer follows it); 0 when none is found. Only a hint for
        the prefix cache (what to keep for the next sample of the same prompt)."""
        header = self.assistant_header()
        n = len(header)
        if n == 0:
            return 0
        first = header[0]
        for start in range(len(ids) - n, -1, -1):
            if ids[start] == first and list(ids[start : start + n]) == header:
                return start + n
        return 0

    def first_token(self, word: str) -> int:
        ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"{word!r} encodes to no token")
        return int(ids[0])
