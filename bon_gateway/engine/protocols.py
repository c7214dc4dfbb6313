"""What the engine needs from a generator and a scorer, and the callback types.

A leaf module: generation/ and scoring/ import these to implement them, the
engine imports them to use them, and nothing here imports either side.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

from bon_gateway.types import (
    BonRequest,
    CandidateScore,
    Deadline,
    Generation,
    GenerationEvent,
    Message,
    ModelInfo,
    RawInput,
    ScoreBatchResult,
    Usage,
)

__all__ = [
    "CandidateGenerator",
    "GenerationRun",
    "OnGenerated",
    "OnScored",
    "ReadinessListener",
    "RewardScorer",
    "ScoringGroup",
]

OnGenerated = Callable[[Generation], Awaitable[None]]
OnScored = Callable[[int, CandidateScore], Awaitable[None]]
# Called (on the event loop, without arguments) whenever a component's readiness
# may have changed; the listener reads `ready()` / `usable()` again.
ReadinessListener = Callable[[], None]


class GenerationRun(Protocol):
    """One request's live candidates, as the upstream streams them."""

    def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        """Progress (when asked for), Finished and Failed events until no candidate is left."""
        ...

    def cancel(self, index: int) -> None:
        """Stop generating candidate `index` (its stream is closed; no more events for it)."""
        ...

    def usage(self) -> Usage:
        """Tokens generated so far (the upstream's own counts where it reports them)."""
        ...

    async def aclose(self) -> None:
        """Close every stream still open."""
        ...


class CandidateGenerator(Protocol):
    """Gets N candidates from the upstream generator."""

    @property
    def default_model(self) -> str: ...

    def usable(self) -> bool:
        """False when no upstream can take a call now (all ejected after failures)."""
        ...

    def on_readiness_change(self, listener: ReadinessListener) -> None:
        """Call `listener` whenever `usable()` may have changed."""
        ...

    def stream(
        self, request: BonRequest, deadline: Deadline, *, progress: bool = False, progress_every: int = 0
    ) -> GenerationRun:
        """Start best_of candidates; no call, retry or backoff wait runs past `deadline`.

        progress: a Progress event for every chunk of text (a stream that broke after
        some was shown is not retried from scratch). progress_every > 0: one every that
        many tokens, which leaves broken streams retryable (a retried candidate's next
        Progress then has fewer tokens than its last)."""
        ...

    async def aclose(self) -> None: ...


class ScoringGroup(Protocol):
    """One request's candidates on one worker: their prompt is computed once, as
    soon as the group opens, and kept there until `close` (or the deadline)."""

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the prompt (0 until the worker has seen it)."""
        ...

    async def opened(self) -> None:
        """Wait until the worker has the prompt tokenized and checked (not its keys and values,
        which it computes on in the background). A prompt too long for the reward model raises
        InvalidRequest naming `messages` here, before anything is generated."""
        ...

    async def score(self, candidates: Sequence[str], *, deadline: Deadline) -> ScoreBatchResult:
        """Score these candidates (whole or partial texts) against the kept prompt; input order.

        A text that extends one scored before in this group (a candidate's next
        partial) reuses that work on the worker as well as the prompt's.
        """
        ...

    async def close(self) -> None:
        """Release the kept prompt (and partials) on the worker."""
        ...


class RewardScorer(Protocol):
    """Scores one group of candidates sharing a prompt on the worker pool."""

    def models(self) -> list[ModelInfo]: ...

    def ready(self) -> bool: ...

    def on_readiness_change(self, listener: ReadinessListener) -> None:
        """Call `listener` whenever `ready()` may have changed."""
        ...

    async def score(
        self,
        model: str,
        messages: Sequence[Message],
        candidates: Sequence[str],
        *,
        deadline: Deadline,
        steps: Sequence[Sequence[str]] = (),
        activation: str | None = None,
        request_id: str = "",
        raw: Sequence[RawInput] = (),
        truncate_prompt_tokens: int = 0,
    ) -> ScoreBatchResult:
        """Scores in input order; the worker call gets the time left before `deadline`.
        With `raw`, those inputs are scored as they are (no messages), not `candidates`."""
        ...

    def open_group(
        self, model: str, messages: Sequence[Message], *, deadline: Deadline, request_id: str = ""
    ) -> ScoringGroup:
        """A group for one request's candidates; its prompt goes to the worker at once."""
        ...

    async def aclose(self) -> None: ...
