"""Reading a checkpoint's own files (config.json, safetensors tensors), local or from the
hub cache: what the natively loaded remote-code checkpoints need besides transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


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
