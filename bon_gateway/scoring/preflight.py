"""Checks of a reward-model entry made before anything loads, so that a start-up
failure is one line naming the model, its path and what to do, in seconds instead
of after the hub's retries.

- Workers spawned here need the `worker` extra (torch, transformers): a gateway
  installed without it says so (`pip install 'bon-gateway[worker]'`).
- A path that names a local directory (absolute, `./`, `../`, `~`, or more than the
  one slash of a hub id `ORG/NAME`) must exist; a hub id is left to the hub.
- Workers whose every model is a local directory run with `HF_HUB_OFFLINE=1`: nothing
  to download, so no hub call (and no retries when there is no network).
- A hub id when the hub cannot be reached (no network): served from the local hub
  cache when it is there (offline), else one line at once instead of the hub's ~27 s
  of retries.
- `device = "cuda"` on a torch without a usable CUDA device says so (worker side).

Stdlib only: the front's pool imports it (no torch there).
"""

from __future__ import annotations

import importlib.util
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

from bon_gateway.config import RewardModelConfig
from bon_gateway.errors import WorkerError

__all__ = [
    "all_local",
    "check_device",
    "check_hub",
    "check_path",
    "check_worker_extra",
    "is_local_path",
]


def is_local_path(path: str) -> bool:
    """Whether `path` names a local directory rather than a hub id (ORG/NAME or NAME)."""
    return (
        path.startswith(("/", "./", "../", "~", "."))
        or path.count("/") > 1
        or Path(path).expanduser().exists()
    )


WORKER_MODULES = ("torch", "transformers")


def check_worker_extra(entry: RewardModelConfig) -> None:
    """WorkerError when workers are to be spawned here and their modules are missing
    (looked up, not imported: the front never imports torch)."""
    missing = [name for name in WORKER_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise WorkerError(
            f"reward model {entry.name!r}: workers = {entry.workers} are spawned here and need "
            f"{' and '.join(missing)}, not installed: pip install 'bon-gateway[worker]' "
            "(or run the workers elsewhere and list them in `addresses`, with workers = 0)"
        )


def check_path(entry: RewardModelConfig) -> None:
    """WorkerError when the entry's local path does not exist (a hub id passes)."""
    if not is_local_path(entry.path):
        return
    where = Path(entry.path).expanduser()
    if not where.exists():
        raise WorkerError(
            f"reward model {entry.name!r}: {entry.path} does not exist (a local path, relative to "
            f"{os.getcwd()}); fix `path` in its reward_models entry, or give a hub id ORG/NAME"
        )
    if entry.gguf_file and not (where / entry.gguf_file).is_file():
        raise WorkerError(
            f"reward model {entry.name!r}: gguf_file {entry.gguf_file} not found in {entry.path}"
        )


def all_local(entries: Iterable[RewardModelConfig]) -> bool:
    """Whether every entry loads from a local directory (the worker needs no hub)."""
    entries = list(entries)
    return bool(entries) and all(is_local_path(e.path) for e in entries)


def check_device(entry: RewardModelConfig) -> None:
    """WorkerError when the entry asks for CUDA and torch has none. Imports torch."""
    if not entry.device.startswith("cuda"):
        return
    import torch

    if torch.cuda.is_available():
        return
    why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
    raise WorkerError(
        f"reward model {entry.name!r}: device = {entry.device!r} but {why} (torch {torch.__version__}); "
        'set device = "cpu" (or "auto") in its reward_models entry or --device cpu, '
        "or install a CUDA build of torch"
    )


def _hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    cache = os.environ.get("XDG_CACHE_HOME", "~/.cache")
    home = os.environ.get("HF_HOME") or os.path.join(cache, "huggingface")
    return Path(home).expanduser() / "hub"


def in_hub_cache(hub_id: str) -> bool:
    """Whether a snapshot of `hub_id` is in the local hub cache (huggingface_hub's layout)."""
    snapshots = _hub_cache() / ("models--" + hub_id.replace("/", "--")) / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def hub_reachable(timeout_s: float = 3.0) -> str | None:
    """None when the hub (HF_ENDPOINT, else huggingface.co) accepts a TCP connection; else why not."""
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except OSError as err:
        return f"{host}:{port}: {err.strerror or err}"


def check_hub(entries: Iterable[RewardModelConfig]) -> None:
    """Before anything imports huggingface_hub: when a hub id is to be loaded and the hub
    cannot be reached, go offline if every hub model is cached, else WorkerError."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        return
    hub_entries = [e for e in entries if not is_local_path(e.path)]
    if not hub_entries:
        return
    unreachable = hub_reachable()
    if unreachable is None:
        return
    missing = [e for e in hub_entries if not in_hub_cache(e.path)]
    if not missing:
        os.environ["HF_HUB_OFFLINE"] = "1"  # every one is cached: load them from there
        return
    entry = missing[0]
    raise WorkerError(
        f"reward model {entry.name!r}: {entry.path} is a hub id, it is not in the hub cache "
        f"({_hub_cache()}) and the hub cannot be reached ({unreachable}); download it where "
        "there is a network and give its local directory as `path`, or set HF_ENDPOINT to a mirror"
    )
