"""Orchestration: fan-out, score, select. No torch, no HTTP framework."""

from __future__ import annotations

from bon_gateway.engine.engine import CandidateGenerator, Engine, RewardScorer

__all__ = ["CandidateGenerator", "Engine", "RewardScorer"]
