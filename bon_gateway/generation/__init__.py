"""Clients for the OpenAI-compatible upstream generator."""

from __future__ import annotations

from bon_gateway.generation.upstream import FanOutResult, UpstreamClient

__all__ = ["FanOutResult", "UpstreamClient"]
