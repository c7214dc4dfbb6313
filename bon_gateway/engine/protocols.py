"""What the engine needs from a generator and a scorer, and the callback types.

A leaf module: generation/ and scoring/ import these to implement them, the
engine imports them to use them, and nothing here imports either side.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from bon_gateway.types import (
    BonRequest,
    CandidateScore,
    Deadline,
    Dropped,
    Generation,
    Message,
    ModelInfo,
    ScoreBatchResult,
)

__all__ = [
    "CandidateGenerator",
    "GenerationOutcome",
    "OnGenerated",
    "OnScored",
    "ReadinessListener",
    "RewardScorer",
]

OnGenerated = Callable[[Generation], Awaitable[None]]
OnScored = Callable[[int, CandidateScore], Awaitable[None]]
# Called (on the event loop, without arguments) whenever a component's readiness
# may have changed; the listener reads `ready()` / `usable()` again.
ReadinessListener = Callable[[], None]


class GenerationOutcome(Protocol):
    @property
    def generations(self) -> list[Generation]: ...

    @property
    def dropped(self) -> list[Dropped]: ...


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

    async def generate(
        self, request: BonRequest, deadline: Deadline, on_generated: OnGenerated | None = None
    ) -> GenerationOutcome:
        """best_of candidates; no call, retry or backoff wait runs past `deadline`."""
        ...

    async def aclose(self) -> None: ...


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
    ) -> ScoreBatchResult:
        """Scores in input order; the worker call gets the time left before `deadline`."""
        ...

    async def aclose(self) -> None: ...
