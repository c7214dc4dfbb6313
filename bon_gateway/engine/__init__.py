"""Orchestration: admission, fan-out, score, select. No torch, no HTTP framework."""

from __future__ import annotations

from bon_gateway.engine.admission import AdmittedBon, AdmittedScore
from bon_gateway.engine.engine import Engine
from bon_gateway.engine.protocols import CandidateGenerator, RewardScorer

__all__ = ["AdmittedBon", "AdmittedScore", "CandidateGenerator", "Engine", "RewardScorer"]
