"""Fakes for tests: a real fake upstream server, a deterministic scorer, and the
served gateway on loopback ports."""

from __future__ import annotations

from tests.fakes.gateway import ServedGateway, gateway_config
from tests.fakes.scorer import FakeScorer, ScoreCall, words
from tests.fakes.upstream import FakeUpstream, ThreadedServer, unused_port

__all__ = [
    "FakeScorer",
    "FakeUpstream",
    "ScoreCall",
    "ServedGateway",
    "ThreadedServer",
    "gateway_config",
    "unused_port",
    "words",
]
