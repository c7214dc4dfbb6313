"""Input bounds and the in-flight bound, shared by the HTTP and gRPC fronts.

Input checks run on the engine's plain request types, so both fronts reject
the same requests with the same message (naming the `server.limits` key);
the in-flight bound sheds excess requests at once instead of queueing them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

from bon_gateway.config import LimitsConfig
from bon_gateway.errors import InvalidRequest, Overloaded
from bon_gateway.types import BonRequest, Message, ScoreRequest

__all__ = ["InFlightLimiter", "check_bon_request", "check_score_request"]


class InFlightLimiter:
    """At most `limit` requests served at once; the next one is shed with Overloaded.

    Shedding (rather than waiting for a slot) is what keeps memory flat: a
    waiting request still holds its body and its connection.
    """

    def __init__(self, limit: int, retry_after_s: float = 1.0) -> None:
        self.limit = limit
        self.retry_after_s = retry_after_s
        self._count = 0
        self._lock = threading.Lock()  # both fronts share one event loop today; cheap insurance

    @property
    def in_flight(self) -> int:
        return self._count

    def try_enter(self) -> bool:
        with self._lock:
            if self._count >= self.limit:
                return False
            self._count += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self._count -= 1

    def enter(self) -> None:
        """Take a slot or raise Overloaded (429 / RESOURCE_EXHAUSTED)."""
        if not self.try_enter():
            raise Overloaded(
                f"server busy: {self.limit} requests in flight (server.limits.max_in_flight)",
                retry_after_s=self.retry_after_s,
            )

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()


def _check_messages(messages: Sequence[Message], prompt: str | None, limits: LimitsConfig) -> None:
    if len(messages) > limits.max_messages:
        raise InvalidRequest(
            f"messages: {len(messages)} messages, at most {limits.max_messages} allowed "
            "(server.limits.max_messages)",
            param="messages",
        )
    chars = sum(len(m.content) + len(m.role) for m in messages) + len(prompt or "")
    if chars > limits.max_prompt_chars:
        param = "prompt" if prompt is not None else "messages"
        raise InvalidRequest(
            f"{param}: {chars} characters, at most {limits.max_prompt_chars} allowed "
            "(server.limits.max_prompt_chars)",
            param=param,
        )


def check_bon_request(request: BonRequest, limits: LimitsConfig) -> None:
    """Raise InvalidRequest when a Best-of-N request is over a `server.limits` bound.

    best_of is bounded by `server.max_best_of` in the engine; this adds sizes.
    """
    _check_messages(request.messages, request.prompt, limits)
    max_tokens = request.sampling.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise InvalidRequest(
            f"max_tokens: {max_tokens} is over the limit of {limits.max_tokens} (server.limits.max_tokens)",
            param="max_tokens",
        )
    stops = request.sampling.stop
    if sum(len(s) for s in stops) > limits.max_prompt_chars:
        raise InvalidRequest("stop: too long (server.limits.max_prompt_chars)", param="stop")


def check_score_request(request: ScoreRequest, limits: LimitsConfig) -> None:
    """Raise InvalidRequest when a scoring request is over a `server.limits` bound."""
    _check_messages(request.messages, None, limits)
    count = max(len(request.candidates), len(request.steps))
    if count > limits.max_candidates:
        raise InvalidRequest(
            f"candidates: {count} answers, at most {limits.max_candidates} allowed "
            "(server.limits.max_candidates)",
            param="candidates",
        )
    answer_chars = sum(len(c) for c in request.candidates) + sum(
        len(step) for steps in request.steps for step in steps
    )
    if answer_chars > limits.max_prompt_chars * 4:
        # Answers are scored with the prompt, so they share its budget (several answers' worth).
        raise InvalidRequest(
            f"candidates: {answer_chars} characters in all, at most {limits.max_prompt_chars * 4} "
            "allowed (4 x server.limits.max_prompt_chars)",
            param="candidates",
        )
