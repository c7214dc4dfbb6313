"""Parameter lists whose extra variants are `slow`.

The exactness checks run every architecture and code path through torch; all of
them take minutes on a 2-core machine. `make test-fast` (under 2 minutes) keeps the
variants named here as fast, and the full `make test` runs every one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest

__all__ = ["slow_except"]


def slow_except(values: Iterable[Any], *fast: Any) -> list[Any]:
    """`values` for parametrize (or fixture params): each one not in `fast` marked slow."""
    return [value if value in fast else pytest.param(value, marks=pytest.mark.slow) for value in values]
