"""The fake verifier of the search tests: a text's reward is a running sum of its words'
weights, so a partial and the whole text can rank differently, as with a real verifier."""

from __future__ import annotations

from bon_gateway.types import Message

__all__ = ["TEXTS", "USER", "WEIGHTS", "reward"]

USER = (Message("user", "Which answer is best?"),)
WEIGHTS = {"good": 1.0, "fine": 0.4, "meh": 0.0, "bad": -1.0}

# Partial and whole rankings disagree (candidate 2 starts badly, ends best).
TEXTS = (
    "good good meh meh meh meh meh meh bad bad",
    "fine fine fine fine fine fine fine fine",
    "bad bad meh good good good good good good good good",
    "meh meh meh meh",  # finishes before the second checkpoint
    "good bad good bad good bad good bad good bad good",
    "bad bad bad bad bad bad bad bad",
)


def reward(text: str) -> float:
    words = text.split()
    # A tiny length term breaks ties between different texts deterministically.
    return sum(WEIGHTS.get(w, 0.0) for w in words) + 1e-3 * len(words)
