"""Qwen2ForRewardModel (Qwen2.5-Math-RM-72B), loaded natively without remote code.

The checkpoint is a transformers Qwen2Model under `model.*` plus an MLP head
`score` = Sequential(Linear(h, h), ReLU, Linear(h, num_labels)) stored as
`score.0.*` and `score.2.*` (modeling_qwen2_rm.py on the hub). Transformers'
own Qwen2Model loads the backbone (dropping the `model.` prefix); the head's
tensors are read from the safetensors files and applied in fp32 by `head()`
(mlp_head.py, shared with the Qwen2.5-Math PRM).

Score: the chat template of the conversation, head output at the last token
(the card scores the whole unpadded `apply_chat_template` string).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.adapters.base import Adapter
from bon_gateway.scoring.worker.adapters.mlp_head import apply_mlp_head, load_qwen2_with_mlp_head


class Qwen2RewardModelAdapter(Adapter):
    architectures: ClassVar[tuple[str, ...]] = ("Qwen2ForRewardModel",)

    @classmethod
    def load_model(cls, entry: RewardModelConfig, load_kwargs: dict[str, Any]) -> Any:
        return load_qwen2_with_mlp_head(entry, load_kwargs)

    @property
    def backbone(self) -> torch.nn.Module:
        module: torch.nn.Module = self.model.model
        return module

    def pooled_index(self, ids: Sequence[int]) -> int:
        # The card scores one unpadded chat-templated sequence: its last token (the template
        # ends in "<|im_end|>\n", so no pad id sits at the end of real inputs).
        return len(ids) - 1

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return apply_mlp_head(self.model.score, hidden)
