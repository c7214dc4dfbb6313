"""Fixtures for the generation tests: a fault-injecting upstream per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.fault_upstream import FaultUpstream


@pytest.fixture
def fault() -> Iterator[FaultUpstream]:
    with FaultUpstream() as server:
        yield server


@pytest.fixture
def fault2() -> Iterator[FaultUpstream]:
    with FaultUpstream() as server:
        yield server
