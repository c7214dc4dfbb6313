"""Token sequences with marker tokens placed by construction (PRM step separators),
and the steps of a candidate.

A process reward model reads its scores at separator tokens that the adapter
inserts itself (`<extra_0>` for Qwen2.5-Math-PRM, the step tag for math-shepherd).
Searching the token ids for the separator afterwards would also find separators
that the user's own text happens to contain, and create steps that do not exist.
So the text is assembled from pieces whose character spans are known:

- trusted special tokens (written by the chat template or inserted as
  separators) become their id directly;
- everything between them, user text included, is tokenized with
  `split_special_tokens=True`, so a literal "<extra_0>" in a question or a step is
  text, never the special id.

Fast tokenizers split on added tokens before running the model's pre-tokenizer,
so for text free of special strings this gives exactly the ids of tokenizing the
whole string at once (what the model cards do).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from bon_gateway.scoring.worker.formatting import Encoded, Tokenizing, Tokens
from bon_gateway.steps import split_steps


@dataclass(frozen=True, slots=True)
class Special:
    """A trusted special token at characters [start, end) of the text."""

    start: int
    end: int
    id: int


def template_specials(tok: Tokenizing, text: str, start: int, end: int) -> list[Special]:
    """Added tokens (e.g. `<|im_start|>`) written by the chat template in text[start:end]."""
    tokenizer = tok.tokenizer
    vocab = {t.content: i for i, t in tokenizer.added_tokens_decoder.items()}
    if not vocab:
        return []
    pattern = re.compile("|".join(re.escape(s) for s in sorted(vocab, key=len, reverse=True)))
    return [Special(m.start(), m.end(), vocab[m.group(0)]) for m in pattern.finditer(text, start, end)]


def candidate_steps(answer: str, steps: Sequence[str], delimiter: str) -> list[str]:
    """Explicit steps, else the answer split on the delimiter; at least one step."""
    found = list(steps) if steps else split_steps(answer, delimiter)
    # An empty answer is one empty step: every candidate gets a score.
    return found or [answer.strip()]


def encode_pieces(
    tok: Tokenizing,
    text: str,
    specials: Sequence[Special],
    marks: Sequence[int],
    answer_start: int,
    *,
    what: str,
) -> Encoded:
    """Token ids of `text` with `specials` as ids and the rest as plain text.

    `marks` are character offsets where a marker ends; each maps to the token that
    holds the character just before it (the last token starting before the offset):
    the encoding is read at those positions, known by construction.
    """
    tokenizer = tok.tokenizer
    ids: list[int] = []
    starts: list[int] = []
    ends: list[int] = []
    # The tokenizer's own BOS, when it adds one itself and the template did not write it:
    # exactly one BOS, as in Tokenizing.tokenize.
    bos = tok.bos_id
    template_bos = bool(specials) and specials[0].start == 0 and specials[0].id == bos
    if bos is not None and tok.adds_bos and not template_bos:
        ids.append(bos)
        starts.append(0)
        ends.append(0)
    pos = 0
    for special in [*sorted(specials, key=lambda s: s.start), Special(len(text), len(text), -1)]:
        if special.start < pos:
            raise ValueError("overlapping special tokens")
        if special.start > pos:
            enc = tokenizer(
                text[pos : special.start],
                add_special_tokens=False,
                split_special_tokens=True,
                return_offsets_mapping=True,
            )
            ids.extend(enc["input_ids"])
            for s, e in enc["offset_mapping"]:
                starts.append(pos + s)
                ends.append(pos + e)
        if special.id >= 0:
            ids.append(special.id)
            starts.append(special.start)
            ends.append(special.end)
        pos = special.end
    positions = [max(i for i, s in enumerate(starts) if s < mark and ends[i] > s) for mark in marks]
    prompt_tokens = 0
    for i, end in enumerate(ends):
        if end <= answer_start:
            prompt_tokens = i + 1
        else:
            break
    # Markers sit in the answer, which truncation never touches: they only shift.
    return tok.fit(Tokens(ids=ids, prompt_tokens=prompt_tokens), positions, what=what)
