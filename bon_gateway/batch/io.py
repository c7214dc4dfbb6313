"""JSONL files of a batch job: resume scanning, whole-line appends, atomic rewrites.

Crash safety rests on three habits:
- every output line is written with one `os.write` on an `O_APPEND` descriptor,
  then fsynced, so a finished row is on disk before the next one starts and a
  reader never sees half of a row unless the machine died mid-write;
- on start, a last line without its newline (or one that does not parse) is cut
  off, so the next append starts on a fresh line;
- derived files (pairs, step labels, report) are written to a temporary file and
  renamed over the target, so they are either the old or the new version.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "JsonlAppender",
    "ResumeState",
    "atomic_write_bytes",
    "atomic_write_jsonl",
    "iter_jsonl",
    "repair_tail",
    "scan_output",
]

log = logging.getLogger("bon_gateway.batch")


@dataclass(slots=True)
class ResumeState:
    """What an existing output file already holds."""

    done_ids: set[str] = field(default_factory=set)
    rows: int = 0
    duplicates: int = 0  # rows whose id was already seen (kept; only the first counts)
    bad_lines: int = 0  # unparseable lines in the middle of the file (left in place)
    repaired_bytes: int = 0  # bytes of a torn last line that were cut off


def _row_id(row: Any) -> str | None:
    if isinstance(row, dict) and "id" in row and "candidates" in row:
        return str(row["id"])
    return None


def scan_output(path: Path, *, repair: bool = True) -> ResumeState:
    """Ids already complete in `path`; with `repair`, cut off a torn last line.

    A crash (SIGKILL, power loss) can leave the last line without its newline
    or half written. That line is not a finished row: it is removed so the run
    that resumes appends whole lines only, and its id is run again.
    """
    state = ResumeState()
    if not path.exists():
        return state
    data = path.read_bytes()
    good_end = 0  # byte offset just after the last line kept
    position = 0
    while position < len(data):
        newline = data.find(b"\n", position)
        end = len(data) if newline < 0 else newline + 1
        line = data[position:end]
        complete = newline >= 0
        row_id: str | None = None
        if line.strip():
            try:
                row_id = _row_id(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                row_id = None
            if row_id is None and not complete:
                break  # a torn last line: everything from `position` goes
            if row_id is None:
                state.bad_lines += 1
            elif row_id in state.done_ids:
                state.duplicates += 1
            else:
                state.done_ids.add(row_id)
                state.rows += 1
            if not complete:
                # Valid JSON without its newline: a write that finished except for
                # the newline. Keep the row and restore the newline below.
                good_end = end
                if repair:
                    _append_raw(path, b"\n")
                return state
        good_end = end
        position = end
    if good_end < len(data):
        state.repaired_bytes = len(data) - good_end
        if repair:
            log.warning("output %s: cut %d bytes of a torn last line", path, state.repaired_bytes)
            with path.open("r+b") as handle:
                handle.truncate(good_end)
                handle.flush()
                os.fsync(handle.fileno())
    return state


def repair_tail(path: Path) -> int:
    """Cut a last line that lacks its newline (a torn append); returns the bytes cut."""
    if not path.exists():
        return 0
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return 0
    keep = data.rfind(b"\n") + 1
    with path.open("r+b") as handle:
        handle.truncate(keep)
        os.fsync(handle.fileno())
    return len(data) - keep


def _append_raw(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def iter_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a JSONL file; blank and unparseable lines are skipped."""
    if not path.exists():
        return
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                yield row


def encode_line(row: dict[str, Any]) -> bytes:
    """One JSON line, UTF-8, no NaN (JSON has none: NaN becomes null)."""
    return (json.dumps(_finite(row), ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class JsonlAppender:
    """Appends whole JSON lines to a file; each line is durable when `write` returns.

    Only one writer per file: the batch runner calls `write` from its event
    loop thread, so lines from concurrent rows never interleave.
    """

    def __init__(self, path: Path, *, fsync: bool = True) -> None:
        self.path = path
        self.fsync = fsync
        self.lines = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, row: dict[str, Any]) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        data = memoryview(encode_line(row))
        # One write() per line: on a local file system an O_APPEND write of a
        # line lands whole. The loop only guards against short writes.
        while data:
            written = os.write(self._fd, data)
            data = data[written:]
        if self.fsync:
            os.fsync(self._fd)
        self.lines += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> int:
    """Write every row as one JSON line, atomically; returns the row count."""
    lines = [encode_line(row) for row in rows]
    atomic_write_bytes(path, b"".join(lines))
    return len(lines)
