"""What a worker process tells the pool besides its gRPC replies, as types.

- Start-up status: the pool that spawns a worker passes it the write end of a
  pipe (`--status-fd N`); the worker writes exactly one JSON line there, either
  `{"serving": {"listen": ..., "pid": ..., "models": [...]}}` once its server
  listens, or `{"error": "..."}` when it cannot start. The pool opens its gRPC
  channel only then, so it never waits out a reconnect backoff while a model
  loads. (The worker also logs a human-readable line on stderr for operators.)
- A bad request field: INVALID_ARGUMENT carries the field in the trailing
  metadata key `ERROR_PARAM_KEY` (the public gRPC front uses the same key).

A leaf module (stdlib only): the front process's pool imports it, no torch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

__all__ = [
    "ERROR_PARAM_KEY",
    "Serving",
    "StartFailed",
    "WorkerStatus",
    "decode_status",
    "encode_status",
    "write_status",
]

ERROR_PARAM_KEY = "bon-error-param"


@dataclass(frozen=True, slots=True)
class Serving:
    """The worker's server listens and every model is loaded."""

    listen: str
    pid: int
    models: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StartFailed:
    """The worker could not start (bad config, unsupported checkpoint, no memory...)."""

    error: str


WorkerStatus = Serving | StartFailed


def encode_status(status: WorkerStatus) -> bytes:
    if isinstance(status, Serving):
        body: dict[str, object] = {
            "serving": {"listen": status.listen, "pid": status.pid, "models": list(status.models)}
        }
    else:
        body = {"error": status.error}
    return json.dumps(body).encode() + b"\n"


def decode_status(line: bytes) -> WorkerStatus:
    """The status in one line the worker wrote; ValueError when it is not one."""
    data = json.loads(line)
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return StartFailed(data["error"])
    serving = data.get("serving") if isinstance(data, dict) else None
    if not isinstance(serving, dict):
        raise ValueError(f"not a worker status: {line[:200]!r}")
    return Serving(
        listen=str(serving["listen"]),
        pid=int(serving["pid"]),
        models=tuple(str(m) for m in serving["models"]),
    )


def write_status(fd: int, status: WorkerStatus) -> None:
    """Write `status` on the pool's pipe and close it (one status per process)."""
    data = encode_status(status)
    try:
        while data:
            data = data[os.write(fd, data) :]
    except BrokenPipeError:
        pass  # the pool is gone; the parent watch stops this worker
    finally:
        os.close(fd)
