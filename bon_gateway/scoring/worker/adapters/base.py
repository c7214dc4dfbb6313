"""The adapter interface: what one architecture family tells the worker.

Every reward model is scored the same way: backbone -> hidden states ->
positions -> head. An adapter supplies the pieces that differ per family:

- `load(...)`: build the model (transformers class, attention implementation);
- `backbone`: the module that maps input ids to last hidden states (after the
  final norm), e.g. `model.model`; it must accept `input_ids`, `attention_mask`,
  `position_ids`, `past_key_values`, `use_cache` like transformers' decoders;
- `encode(...)`: the token ids of one candidate (chat template, reward token...)
  and the positions where the head reads hidden states (the pooled token, step
  separators), which encode knows as it builds the sequence;
- `head(hidden)`: fp32 logits from the gathered fp32 hidden states, with the
  checkpoint's own weights;
- `reward(logits, activation)`: the candidate's reward and step rewards.

To add a family: subclass `Adapter` in its own module under `adapters/` and
list the class in `adapters/__init__.py::ADAPTERS`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.formatting import Encoded, InvalidInput, Tokenizing, Tokens
from bon_gateway.types import Message


def rightmost_non_pad(ids: Sequence[int], pad_id: int | None) -> int:
    """The token transformers' *ForSequenceClassification pools: the rightmost non-pad id
    (from the ids, not the mask). Also what the verifier's head is trained on."""
    if pad_id is None:
        return len(ids) - 1
    for i in range(len(ids) - 1, -1, -1):
        if ids[i] != pad_id:
            return i
    # All pad: transformers' argmax over an all-false mask picks position 0.
    return 0


def lm_logits_for(model: Any, config: Any, hidden: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """A causal LM's output logits restricted to `token_ids`, in fp32.

    Only those rows of the output embedding are multiplied (not the whole
    vocabulary); Gemma-style final logit soft-capping is applied as the model does.
    """
    rows = model.get_output_embeddings().weight[list(token_ids)].float()
    logits = torch.nn.functional.linear(hidden.to(rows.device), rows)
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class Adapter:
    """Base class; the defaults fit a decoder-only outcome reward model."""

    #: config.json `architectures` values this adapter serves
    architectures: ClassVar[tuple[str, ...]] = ()
    #: outcome | process | judge (reported by Info)
    kind: ClassVar[str] = "outcome"
    #: attention implementation on CPU / without flash-attn
    attn_implementation: ClassVar[str] = "sdpa"
    #: whether the backbone can continue from a repeated KV cache of the shared prompt
    supports_prefix_reuse: ClassVar[bool] = True

    def __init__(self, model: Any, tokenizer: Any, entry: RewardModelConfig, *, architecture: str) -> None:
        self.model = model
        self.entry = entry
        self.architecture = architecture
        self.max_length = entry.max_length or int(
            getattr(model.config, "max_position_embeddings", 0) or 1 << 20
        )
        self.tok = Tokenizing(tokenizer, max_length=self.max_length, truncate_prompt=entry.truncate_prompt)

    # -- loading ----------------------------------------------------------
    @classmethod
    def load_model(cls, entry: RewardModelConfig, load_kwargs: dict[str, Any]) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_pretrained(entry.path, **load_kwargs)

    # -- pieces -------------------------------------------------------------
    @property
    def backbone(self) -> torch.nn.Module:
        module: torch.nn.Module = self.model.base_model
        return module

    @property
    def config(self) -> Any:
        return self.model.config

    def encode(self, messages: Sequence[Message], answer: str, steps: Sequence[str], *, what: str) -> Encoded:
        """The candidate's ids within max_length and where the head reads them."""
        tokens = self.tok.chat_tokens(messages, answer)
        return self.tok.fit(tokens, [self.pooled_index(tokens.ids)], what=what)

    def encode_raw(self, ids: list[int], *, what: str) -> Encoded:
        """A candidate given as the model's input ids (already formatted), read where the
        chat path reads it: the pooled token (the prompt split only guides the cache)."""
        if not ids:
            raise InvalidInput(f"{what} is empty: there is no token to score", param=what)
        tokens = Tokens(ids=ids, prompt_tokens=self.tok.raw_prompt_tokens(ids))
        return self.tok.fit(tokens, [self.pooled_index(ids)], what=what)

    def pooled_index(self, ids: Sequence[int]) -> int:
        """Where an outcome model reads its sequence (before truncation: the index shifts with it)."""
        return rightmost_non_pad(ids, self.config.pad_token_id)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits [n, num_labels] from fp32 hidden states [n, h]."""
        score = self.model.score
        weight = score.weight.float()
        bias = score.bias.float() if getattr(score, "bias", None) is not None else None
        return torch.nn.functional.linear(hidden.to(weight.device), weight, bias)

    def reward(self, logits: torch.Tensor, activation: str) -> tuple[float, tuple[float, ...]]:
        """Reward of one candidate from its gathered logits [k, num_labels]."""
        row = logits[-1]
        label = self.reward_label(row.shape[0])
        if activation == "softmax" and row.shape[0] > 1:
            value = float(torch.softmax(row, dim=-1)[label])
        elif activation == "sigmoid" or activation == "softmax":
            # softmax over a single logit is always 1: a one-logit head means sigmoid.
            value = 1.0 / (1.0 + math.exp(-float(row[label])))
        else:
            value = float(row[label])
        return self.normalize(value, activation), ()

    @staticmethod
    def reward_label(num_labels: int) -> int:
        # One logit: that logit. Two or more (classifiers such as Qwen2.5-1.5B-apeach): the
        # last label, conventionally the positive class.
        return 0 if num_labels == 1 else num_labels - 1

    def normalize(self, value: float, activation: str) -> float:
        # Normalization applies to raw scores only; probabilities stay probabilities.
        if activation != "none":
            return value
        return (value - self.entry.normalize_mean) / self.entry.normalize_std
