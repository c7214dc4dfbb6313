"""Qwen2ForRewardModel (Qwen2.5-Math-RM-72B), loaded natively without remote code.

The checkpoint is a transformers Qwen2Model under `model.*` plus an MLP head
`score` = Sequential(Linear(h, h), ReLU, Linear(h, num_labels)) stored as
`score.0.*` and `score.2.*` (modeling_qwen2_rm.py on the hub). Transformers'
own Qwen2Model loads the backbone (dropping the `model.` prefix); the head's
tensors are read from the safetensors files and applied in fp32 by `head()`.

Score: the chat template of the conversation, head output at the last token
(the card scores the whole unpadded `apply_chat_template` string).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.adapters.base import Adapter


def checkpoint_file(path: str, name: str) -> str | None:
    """A file of a local checkpoint directory or a hub repo (cached), None when absent."""
    local = Path(path) / name
    if local.is_dir() or Path(path).is_dir():
        return str(local) if local.is_file() else None
    from transformers.utils.hub import cached_file

    found: str | None = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
    return found


def read_tensors(path: str, keep: Any = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors checkpoint (single file or sharded), optionally filtered by name."""
    from safetensors import safe_open

    index = checkpoint_file(path, "model.safetensors.index.json")
    if index is not None:
        weight_map: dict[str, str] = json.loads(Path(index).read_text(encoding="utf-8"))["weight_map"]
        files = sorted({f for k, f in weight_map.items() if keep is None or keep(k)})
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        file = checkpoint_file(path, name)
        if file is None:
            raise FileNotFoundError(f"{path}: {name} not found (safetensors weights are required)")
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                if keep is None or keep(key):
                    out[key] = handle.get_tensor(key)
    return out


class HeadedModel(torch.nn.Module):
    """A transformers backbone (`model`) and the checkpoint's own head (`score`), head in fp32."""

    def __init__(self, backbone: Any, head: torch.nn.Module) -> None:
        super().__init__()
        self.model = backbone
        self.score = head
        self.config = backbone.config


def mlp_head(tensors: dict[str, torch.Tensor], prefix: str) -> torch.nn.Sequential:
    """Sequential(Linear, ReLU, Linear) from `{prefix}.0.*` / `{prefix}.2.*`, fp32."""
    w0, w2 = tensors[f"{prefix}.0.weight"], tensors[f"{prefix}.2.weight"]
    head = torch.nn.Sequential(
        torch.nn.Linear(w0.shape[1], w0.shape[0], bias=f"{prefix}.0.bias" in tensors),
        torch.nn.ReLU(),
        torch.nn.Linear(w2.shape[1], w2.shape[0], bias=f"{prefix}.2.bias" in tensors),
    )
    state = {k[len(prefix) + 1 :]: v.float() for k, v in tensors.items() if k.startswith(prefix + ".")}
    head.load_state_dict(state, strict=True)
    return head


def load_qwen2_with_mlp_head(entry: RewardModelConfig, load_kwargs: dict[str, Any]) -> HeadedModel:
    from transformers import Qwen2Model

    # The hub config names remote code in auto_map; model_type "qwen2" is transformers' own.
    kwargs = {k: v for k, v in load_kwargs.items() if k != "gguf_file"}
    backbone = Qwen2Model.from_pretrained(entry.path, **kwargs)
    head = mlp_head(read_tensors(entry.path, lambda k: k.startswith("score.")), "score")
    return HeadedModel(backbone, head)


def apply_mlp_head(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    first, last = head[0], head[2]  # type: ignore[index]
    hidden = hidden.to(first.weight.device)
    x = torch.relu(torch.nn.functional.linear(hidden, first.weight.float(), _float(first.bias)))
    return torch.nn.functional.linear(x, last.weight.float(), _float(last.bias))


def _float(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.float()


class Qwen2RewardModelAdapter(Adapter):
    architectures: ClassVar[tuple[str, ...]] = ("Qwen2ForRewardModel",)

    @classmethod
    def load_model(cls, entry: RewardModelConfig, load_kwargs: dict[str, Any]) -> Any:
        return load_qwen2_with_mlp_head(entry, load_kwargs)

    @property
    def backbone(self) -> torch.nn.Module:
        module: torch.nn.Module = self.model.model
        return module

    def positions(self, ids: Sequence[int]) -> list[int]:
        # The card scores one unpadded chat-templated sequence: its last token (the template
        # ends in "<|im_end|>\n", so no pad id sits at the end of real inputs).
        return [len(ids) - 1]

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return apply_mlp_head(self.model.score, hidden)
