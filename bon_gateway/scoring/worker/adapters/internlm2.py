"""InternLM2ForRewardModel (internlm2-1_8b/7b/20b-reward), without remote code.

InternLM2 is Llama with renamed weights and q/k/v packed in one `wqkv`
(modeling_internlm2.py on the hub):

- `model.tok_embeddings` -> embed_tokens; `model.norm` -> norm;
- `model.layers.N.attention.wqkv` [(heads + 2 * kv_heads) * head_dim, h] packs, per
  KV head, its `groups = heads // kv_heads` query heads, then its key, then its
  value: rows viewed as [kv_heads, groups + 2, head_dim, h] (the modeling file's
  `rearrange("b q (h gs d) -> b q h gs d", gs=2 + groups)`); query head
  `kv * groups + g` = Llama's q head of the same index (repeat_kv pairs it with
  kv head `kv`);
- `attention.wo` -> o_proj; `feed_forward.w1/w3/w2` -> gate/up/down_proj;
  `attention_norm` / `ffn_norm` -> input / post_attention_layernorm;
- `v_head` Linear(h, 1, bias=False): the reward head.

Input, as in the card's get_score: the chat template (without a generation
prompt), tokenized, then `config.reward_token_id` appended; score = v_head at
that last token. The backbone is transformers' LlamaModel built from the
config.json keys (`bias` -> attention_bias; rope_theta; num_key_value_heads).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.adapters.base import Adapter
from bon_gateway.scoring.worker.adapters.checkpoint import checkpoint_file, read_tensors
from bon_gateway.scoring.worker.formatting import Encoded, Tokens
from bon_gateway.types import Message


def llama_config(raw: dict[str, Any], attn_implementation: str) -> Any:
    """LlamaConfig equivalent to an internlm2 config.json."""
    from transformers import LlamaConfig

    rope = raw.get("rope_scaling")
    theta = float(raw.get("rope_theta", 10000))
    rope_parameters: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if rope:
        kind = rope.get("type") or rope.get("rope_type")
        if kind == "linear":
            rope_parameters = {**rope_parameters, "rope_type": "linear", "factor": float(rope["factor"])}
        elif kind != "dynamic":
            # Dynamic NTK only changes positions past max_position_embeddings, which the
            # worker never accepts (max_length defaults to it): plain RoPE is exact below.
            raise ValueError(f"unsupported InternLM2 rope_scaling {rope!r}")
    config = LlamaConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads", raw["num_attention_heads"]),
        hidden_act=raw.get("hidden_act", "silu"),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        attention_bias=bool(raw.get("bias", False)),
        mlp_bias=False,  # InternLM2MLP's w1/w2/w3 never have a bias
        rope_parameters=rope_parameters,
        pad_token_id=raw.get("pad_token_id"),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=raw.get("eos_token_id"),
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    config.reward_token_id = raw["reward_token_id"]
    return config


def unpack_wqkv(
    wqkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v weights (or biases) of Llama's q_proj/k_proj/v_proj from InternLM2's wqkv."""
    groups = heads // kv_heads
    rest = wqkv.shape[1:]
    packed = wqkv.reshape(kv_heads, groups + 2, head_dim, *rest)
    q = packed[:, :groups].reshape(heads * head_dim, *rest)
    k = packed[:, -2].reshape(kv_heads * head_dim, *rest)
    v = packed[:, -1].reshape(kv_heads * head_dim, *rest)
    return q.contiguous(), k.contiguous(), v.contiguous()


_RENAMES = {
    "attention.wo.": "self_attn.o_proj.",
    "feed_forward.w1.": "mlp.gate_proj.",
    "feed_forward.w3.": "mlp.up_proj.",
    "feed_forward.w2.": "mlp.down_proj.",
    "attention_norm.": "input_layernorm.",
    "ffn_norm.": "post_attention_layernorm.",
}


def llama_state_dict(tensors: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """LlamaModel's state dict from InternLM2's `model.*` tensors."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if not key.startswith("model."):
            continue  # output.* (LM head) and v_head are not part of the backbone
        name = key[len("model.") :]
        if name.startswith("tok_embeddings."):
            out["embed_tokens." + name[len("tok_embeddings.") :]] = value
        elif ".attention.wqkv." in name:
            layer, suffix = name.split(".attention.wqkv.")
            q, k, v = unpack_wqkv(value, heads, kv_heads, head_dim)
            for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{layer}.self_attn.{proj}.{suffix}"] = part
        else:
            for old, new in _RENAMES.items():
                name = name.replace(old, new)
            out[name] = value
    return out


class InternLM2Model(torch.nn.Module):
    """LlamaModel backbone (`model`) and InternLM2's `v_head`, fp32."""

    def __init__(self, backbone: Any, v_head: torch.nn.Linear) -> None:
        super().__init__()
        self.model = backbone
        self.v_head = v_head
        self.config = backbone.config


class InternLM2RewardAdapter(Adapter):
    architectures: ClassVar[tuple[str, ...]] = ("InternLM2ForRewardModel",)

    def __init__(self, model: Any, tokenizer: Any, entry: RewardModelConfig, *, architecture: str) -> None:
        super().__init__(model, tokenizer, entry, architecture=architecture)
        self.reward_token_id = int(model.config.reward_token_id)

    @classmethod
    def load_model(cls, entry: RewardModelConfig, load_kwargs: dict[str, Any]) -> Any:
        from transformers import LlamaModel
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        config_file = checkpoint_file(entry.path, "config.json")
        if config_file is None:
            raise FileNotFoundError(f"{entry.path}: config.json not found")
        raw = json.loads(Path(config_file).read_text(encoding="utf-8"))
        config = llama_config(raw, load_kwargs.get("attn_implementation") or "sdpa")
        dtype = load_kwargs.get("dtype") or torch.float32
        tensors = read_tensors(entry.path)
        state = {k: v.to(dtype) for k, v in llama_state_dict(tensors, config).items()}
        # Built on the meta device and filled with the checkpoint's tensors: no random init
        # of billions of parameters; the rotary buffers are not in the checkpoint, so the
        # rotary module is rebuilt on the CPU.
        with torch.device("meta"):
            backbone = LlamaModel(config)
        backbone.load_state_dict(state, strict=True, assign=True)
        backbone.rotary_emb = LlamaRotaryEmbedding(config=config)
        weight = tensors["v_head.weight"].float()
        v_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            v_head.weight.copy_(weight)
        return InternLM2Model(backbone, v_head)

    @property
    def backbone(self) -> torch.nn.Module:
        module: torch.nn.Module = self.model.model
        return module

    def encode(self, messages: Sequence[Message], answer: str, steps: Sequence[str], *, what: str) -> Encoded:
        # The card tokenizes the template string with add_special_tokens=False; the template
        # writes the BOS itself, and Tokenizing keeps exactly one BOS either way.
        # The reward token is appended before fitting to max_length, and read there.
        tokens = self.tok.chat_tokens(messages, answer)
        ids = [*tokens.ids, self.reward_token_id]
        return self.tok.fit(Tokens(ids=ids, prompt_tokens=tokens.prompt_tokens), [len(ids) - 1], what=what)

    def encode_raw(self, ids: list[int], *, what: str) -> Encoded:
        # As the chat path: the reward token appended (unless the input ends with it), read there.
        if not ids or ids[-1] != self.reward_token_id:
            ids = [*ids, self.reward_token_id]
        tokens = Tokens(ids=ids, prompt_tokens=self.tok.raw_prompt_tokens(ids))
        return self.tok.fit(tokens, [len(ids) - 1], what=what)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.v_head.weight.float()
        return torch.nn.functional.linear(hidden.to(weight.device), weight)
