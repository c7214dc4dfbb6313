"""transformers' own *ForSequenceClassification reward models.

Score = the `score` head at the rightmost non-pad token, which is what these
classes compute themselves (Skywork-Reward(-V2), apeach classifiers, ...).
"""

from __future__ import annotations

from typing import ClassVar

from bon_gateway.scoring.worker.adapters.base import Adapter


class SequenceClassificationAdapter(Adapter):
    architectures: ClassVar[tuple[str, ...]] = (
        "LlamaForSequenceClassification",
        "MistralForSequenceClassification",
        "Qwen2ForSequenceClassification",
        "Qwen3ForSequenceClassification",
        "Gemma3ForSequenceClassification",
    )


class Gemma2SequenceClassificationAdapter(Adapter):
    """Gemma2 soft-caps attention logits, which SDPA cannot do: eager attention."""

    architectures: ClassVar[tuple[str, ...]] = ("Gemma2ForSequenceClassification",)
    attn_implementation: ClassVar[str] = "eager"


class JambaSequenceClassificationAdapter(Adapter):
    """Jamba mixes Mamba layers into the stack: their recurrent state cannot continue from
    a left-padded, repeated prefix, so prompts are recomputed (right padding is exact:
    the scan is causal and pads come after the pooled token)."""

    architectures: ClassVar[tuple[str, ...]] = ("JambaForSequenceClassification",)
    supports_prefix_reuse: ClassVar[bool] = False
