"""Fixtures for the API tests: a fake upstream and the real gateway on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes import FakeScorer, FakeUpstream, ServedGateway, gateway_config

# Seed 0 makes candidate i answer TEXTS[i] (FakeUpstream picks texts[seed % 4]).
TEXTS = (
    "Paris.",
    "The capital of France is Paris.",
    "London.",
    "I am not sure.",
)
REWARDS = {TEXTS[0]: 1.5, TEXTS[1]: 3.0, TEXTS[2]: -2.0, TEXTS[3]: 0.25}
RANKED = sorted(TEXTS, key=lambda t: -REWARDS[t])
BEST = RANKED[0]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(TEXTS) as server:
        yield server


@pytest.fixture(scope="module")
def scorer() -> FakeScorer:
    return FakeScorer(REWARDS, step_rewards={TEXTS[1]: (0.5, 3.0)})


@pytest.fixture(scope="module")
def gateway(upstream: FakeUpstream, scorer: FakeScorer) -> Iterator[ServedGateway]:
    """One gateway per test module; tests must leave the fakes as they found them."""
    with ServedGateway(gateway_config(upstream.url, max_best_of=16), scorer) as served:
        yield served
