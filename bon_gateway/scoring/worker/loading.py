"""Load a reward model: config.json -> adapter -> tokenizer and weights."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from bon_gateway.config import RewardModelConfig
from bon_gateway.logs import log_phase
from bon_gateway.scoring.worker.adapters import Adapter, adapter_for

log = logging.getLogger("bon_gateway.worker")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_architectures(entry: RewardModelConfig) -> list[str]:
    """`architectures` from config.json (local dir, GGUF metadata, or the hub)."""
    local = Path(entry.path) / "config.json"
    if local.is_file():
        data = json.loads(local.read_text(encoding="utf-8"))
        return list(data.get("architectures") or [])
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"trust_remote_code": entry.trust_remote_code}
    if entry.gguf_file:
        kwargs["gguf_file"] = entry.gguf_file
    config = AutoConfig.from_pretrained(entry.path, **kwargs)
    return list(getattr(config, "architectures", None) or [])


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(entry: RewardModelConfig, device: torch.device) -> torch.dtype:
    if entry.dtype != "auto":
        return _DTYPES[entry.dtype]
    # CPU: fp32 (exact reference scores); CUDA: bf16 backbone, the head stays fp32.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def spread_over_gpus(model: Any) -> None:
    """Place the model's layers over every visible GPU, balanced (accelerate's device
    map, decoder layers kept whole); inputs go to the first GPU, hidden states
    move from layer to layer, and the heads take them where their weights are."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = list(getattr(model, "_no_split_modules", None) or [])
    memory = get_balanced_memory(model, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    dispatch_model(model, device_map=device_map)
    log_phase(log, "spread", devices=sorted({str(d) for d in device_map.values()}))


def load_adapter(entry: RewardModelConfig) -> Adapter:
    """Load one model entry; UnsupportedArchitecture lists what is supported."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    architectures = read_architectures(entry)
    cls, architecture = adapter_for(architectures, entry.kind)
    device = resolve_device(entry.device)
    dtype = resolve_dtype(entry, device)
    log_phase(
        log,
        "load",
        model=entry.name,
        architecture=architecture,
        adapter=cls.__name__,
        device=device,
        dtype=dtype,
    )
    common: dict[str, Any] = {"trust_remote_code": entry.trust_remote_code}
    if entry.gguf_file:
        common["gguf_file"] = entry.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(entry.path, **common)
    model = cls.load_model(entry, {**common, "dtype": dtype, "attn_implementation": cls.attn_implementation})
    if device.type == "cuda" and entry.gpus_per_worker > 1:
        spread_over_gpus(model)
    else:
        model.to(device)
    model.eval()
    adapter = cls(model, tokenizer, entry, architecture=architecture)
    log_phase(
        log,
        "loaded",
        model=entry.name,
        params=sum(p.numel() for p in model.parameters()),
        seconds=time.perf_counter() - started,
    )
    return adapter


class ConfigOnly:
    """The model stand-in of an adapter whose model another server runs: its config only."""

    def __init__(self, config: Any) -> None:
        self.config = config


def load_tokenizing_adapter(entry: RewardModelConfig) -> Adapter:
    """The adapter of a model scored elsewhere (backend = "vllm" / "sglang"): tokenizer and
    config, no weights. It builds the sequences and positions; ValueError if that server
    cannot run it."""
    from transformers import AutoConfig, AutoTokenizer

    from bon_gateway.scoring.worker.remote_runtime import backend_task

    architectures = read_architectures(entry)
    cls, architecture = adapter_for(architectures, entry.kind)
    common: dict[str, Any] = {"trust_remote_code": entry.trust_remote_code}
    if entry.gguf_file:
        common["gguf_file"] = entry.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(entry.path, **common)
    config = AutoConfig.from_pretrained(entry.path, **common)
    adapter = cls(ConfigOnly(config), tokenizer, entry, architecture=architecture)
    backend_task(entry.backend, adapter)
    log_phase(
        log, "load", model=entry.name, architecture=architecture, adapter=cls.__name__, backend=entry.backend
    )
    return adapter
