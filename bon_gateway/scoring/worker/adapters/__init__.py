"""Adapter registry: config.json `architectures` -> the adapter that scores it."""

from __future__ import annotations

from bon_gateway.scoring.worker.adapters.base import Adapter
from bon_gateway.scoring.worker.adapters.causal_prm import CausalPRMAdapter
from bon_gateway.scoring.worker.adapters.internlm2 import InternLM2RewardAdapter
from bon_gateway.scoring.worker.adapters.judge import JudgeAdapter
from bon_gateway.scoring.worker.adapters.qwen2_prm import Qwen2ProcessRewardAdapter
from bon_gateway.scoring.worker.adapters.qwen2_rm import Qwen2RewardModelAdapter
from bon_gateway.scoring.worker.adapters.sequence_classification import (
    Gemma2SequenceClassificationAdapter,
    JambaSequenceClassificationAdapter,
    SequenceClassificationAdapter,
)

__all__ = ["ADAPTERS", "Adapter", "JudgeAdapter", "UnsupportedArchitecture", "adapter_for", "supported"]

#: every adapter picked by architecture name (judge is picked by kind instead)
ADAPTERS: tuple[type[Adapter], ...] = (
    SequenceClassificationAdapter,
    Gemma2SequenceClassificationAdapter,
    JambaSequenceClassificationAdapter,
    Qwen2RewardModelAdapter,
    Qwen2ProcessRewardAdapter,
    InternLM2RewardAdapter,
)


class UnsupportedArchitecture(ValueError):
    pass


def supported() -> list[str]:
    return sorted(a for adapter in ADAPTERS for a in adapter.architectures)


def adapter_for(architectures: list[str] | None, kind: str) -> tuple[type[Adapter], str]:
    """The adapter class and the architecture it matched."""
    names = list(architectures or [])
    if kind == "judge":
        return JudgeAdapter, names[0] if names else "CausalLM"
    if kind == "causal_prm":
        return CausalPRMAdapter, names[0] if names else "CausalLM"
    for name in names:
        for adapter in ADAPTERS:
            if name in adapter.architectures:
                return adapter, name
    raise UnsupportedArchitecture(
        f"unsupported architecture {names or '(none in config.json)'}; supported: "
        + ", ".join(supported())
        + '; or any causal LM with kind = "judge" or "causal_prm"'
    )
