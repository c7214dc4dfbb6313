"""Offline batch Best-of-N (`bon-gateway batch`) and preference-data export.

Modules: `rows` (input parsing), `io` (resumable JSONL), `clients` (HTTP gateway
or in-process engine), `runner` (the concurrent loop), `records` (output rows),
`export` (TRL preference pairs and step labels), `summary` and `report`
(figures). Nothing is imported here so that `bon-gateway --help` stays cheap.
"""

from __future__ import annotations

__all__: list[str] = []
