"""A spawned worker dies with the process that spawned it (its owner, the pool).

- Linux: `prctl(PR_SET_PDEATHSIG, SIGTERM)`: the kernel sends SIGTERM the moment the
  owner dies, even by SIGKILL (the 0.5 s parent watch of __main__ stays as the fallback
  elsewhere). Before this, a worker still loading its model when its owner was killed
  or interrupted lived on until the load finished (5-13 s with Ctrl-C in the demo).
- Until it serves, SIGTERM and SIGINT end the worker at once: nothing is in flight, and
  waiting for the load thread would only keep it alive.
- A worker whose owner is gone removes its Unix socket and the pool's socket directory
  when it is empty (the last worker out): the owner could not (SIGKILL).

Stdlib only; no torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
from types import FrameType

__all__ = ["die_with_owner", "exit_at_once_on_signals", "owner_gone", "remove_socket_dir_if_orphan"]

_PR_SET_PDEATHSIG = 1


def die_with_owner(owner_pid: int) -> bool:
    """Ask the kernel for SIGTERM when the owner dies; whether that is in place (Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        done = bool(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False
    if done and owner_gone(owner_pid):  # it died before the call: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)
    return done


def owner_gone(owner_pid: int | None) -> bool:
    return owner_pid is not None and os.getppid() != owner_pid


def remove_socket_dir_if_orphan(listen: str, owner_pid: int | None) -> None:
    """With the owner gone: remove this worker's socket, and its directory once empty."""
    if not listen.startswith("unix:") or not owner_gone(owner_pid):
        return
    path = listen[len("unix:") :]
    with contextlib.suppress(OSError):
        os.unlink(path)
    with contextlib.suppress(OSError):  # not empty: another worker is still there, it will
        os.rmdir(os.path.dirname(path))


def exit_at_once_on_signals(listen: str, owner_pid: int | None) -> None:
    """Until the server's own handlers replace these: SIGTERM/SIGINT exit now (128 + signal)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        remove_socket_dir_if_orphan(listen, owner_pid)
        os._exit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
