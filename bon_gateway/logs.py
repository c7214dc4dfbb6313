"""Logging set-up for `bon-gateway serve` and `bon-gateway worker`.

text: `TIME LEVEL LOGGER MESSAGE`. json: one object per line with ts, level,
logger, message, plus the `key=value` pairs of our `phase=... id=...` lines as
fields (a pair never overrides ts/level/logger/message). Prompt and answer
text is never logged at INFO or above; only DEBUG lines may carry it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

__all__ = ["JsonFormatter", "LogFormat", "configure_logging", "message_fields"]

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
_PAIR = re.compile(r"(?:^|\s)([a-z_][a-z0-9_\-]*)=(\S+)")
_RESERVED = frozenset({"ts", "level", "logger", "message", "exc_info"})


def message_fields(message: str) -> dict[str, str]:
    """The `key=value` pairs of a `phase=... id=...` line; {} for other lines."""
    if not message.startswith("phase="):
        return {}
    return {k: v for k, v in _PAIR.findall(message) if k not in _RESERVED}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        for key, value in message_fields(message).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(
    level: str | int = "INFO", fmt: LogFormat = "text", stream: TextIO | None = None
) -> None:
    """Replace the root logger's handlers with one on `stream` (stderr) in `fmt`."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
