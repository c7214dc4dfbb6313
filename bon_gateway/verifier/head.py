"""The shipped head file: `gsm8k_head.safetensors`, one tensor `score.weight` [1, hidden].

Its metadata records how it was made (data file hash, split, L2 strength, seed, the
cross-validated figures), so `scripts/train_gsm8k_verifier.py --check` can say whether
a reproduction matches.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import numpy.typing as npt

HEAD_FILE = Path(__file__).resolve().parent / "gsm8k_head.safetensors"
TENSOR_NAME = "score.weight"


def head_sha256(path: Path = HEAD_FILE) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_head(path: Path = HEAD_FILE) -> tuple[npt.NDArray[np.float32], dict[str, str]]:
    """(score.weight [1, hidden] float32, metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        weight = np.asarray(handle.get_tensor(TENSOR_NAME), dtype=np.float32)
        metadata = dict(handle.metadata() or {})
    if weight.ndim != 2 or weight.shape[0] != 1:
        raise ValueError(f"{path}: {TENSOR_NAME} must be [1, hidden], got {list(weight.shape)}")
    return weight, metadata


def save_head(weight: npt.NDArray[np.floating], metadata: dict[str, str], path: Path = HEAD_FILE) -> None:
    from safetensors.numpy import save_file

    tensor = np.ascontiguousarray(np.asarray(weight, dtype=np.float32).reshape(1, -1))
    save_file({TENSOR_NAME: tensor}, str(path), metadata=metadata)
