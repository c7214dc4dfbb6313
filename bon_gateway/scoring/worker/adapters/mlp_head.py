"""A transformers Qwen2 backbone with the checkpoint's own MLP head, loaded without remote
code (Qwen2.5-Math RM and PRM): `score` = Sequential(Linear(h, h), ReLU, Linear(h, labels))
stored as `score.0.*` / `score.2.*`, applied in fp32."""

from __future__ import annotations

from typing import Any

import torch

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.adapters.checkpoint import read_tensors


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
