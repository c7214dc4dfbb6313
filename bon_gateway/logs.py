"""Logging set-up for `bon-gateway serve` and `bon-gateway worker`, and the one
way the code logs a phase.

`log_phase(log, "score", id=..., model=..., seconds=...)` writes one line per
phase. In text mode it reads `TIME LEVEL LOGGER phase=score id=... model=...`;
in json mode (python-json-logger) it is one object per line with ts, level,
logger, message, and the same fields as typed JSON values, passed through the
record (`extra=`), never parsed back out of the message. Prompt and answer
text is never logged at INFO or above; only DEBUG lines may carry it.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Literal, TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as _LibraryJsonFormatter

__all__ = ["JsonFormatter", "LogFormat", "configure_logging", "forward_child_line", "log_phase"]

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# The record attribute that carries a phase line's fields.
FIELDS_ATTR = "bon_fields"
_RESERVED = frozenset({"ts", "level", "logger", "message", "exc_info"})


def _text(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def log_phase(
    logger: logging.Logger, phase: str, level: int = logging.INFO, *, exc_info: bool = False, **fields: Any
) -> None:
    """Log `phase=NAME key=value ...`; the JSON formatter gets the fields as they are.

    `exc_info` adds the exception being handled (its traceback) to the line.
    """
    if not logger.isEnabledFor(level):
        return
    pairs = " ".join(f"{key}={_text(value)}" for key, value in fields.items())
    message = f"phase={phase} {pairs}" if pairs else f"phase={phase}"
    logger.log(
        level, message, exc_info=exc_info, extra={FIELDS_ATTR: {"phase": phase, **fields}}, stacklevel=2
    )


class JsonFormatter(_LibraryJsonFormatter):
    """python-json-logger with the gateway's key names; a phase line's fields merged in."""

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
            reserved_attrs=[*RESERVED_ATTRS, FIELDS_ATTR],
            json_ensure_ascii=False,
            json_default=str,
        )

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # ISO 8601 in UTC with milliseconds, whatever the host's time zone.
        from datetime import UTC, datetime

        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        fields = getattr(record, FIELDS_ATTR, None)
        super().add_fields(log_data, record, message_dict)
        if fields:
            for key, value in fields.items():
                if key not in _RESERVED:
                    log_data.setdefault(key, value)


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


def forward_child_line(line: str, fallback: logging.Logger, **context: Any) -> str:
    """Log one stderr line of a child process (a spawned reward worker) once, here.

    The pool starts its workers with `--log-format json`: each of their log lines is
    re-emitted as this process's record, under the worker's logger and level, with its
    phase fields (typed, in json mode) and `context` (which worker) added, and this
    process's timestamp only. Any other line (a crash traceback, a library's print) goes
    to `fallback` at INFO as it is, prefixed with the context. Returns the line's text
    (its message, for a JSON line).
    """
    data: object = None
    if line.startswith("{"):
        try:
            data = json.loads(line)
        except ValueError:
            data = None
    if not isinstance(data, dict) or not isinstance(data.get("message"), str):
        where = "".join(f"{key}={_text(value)} " for key, value in context.items())
        fallback.info("%s%s", where, line)
        return line
    logger = logging.getLogger(str(data.get("logger") or fallback.name))
    level = logging.getLevelName(str(data.get("level", "INFO")))
    level = level if isinstance(level, int) else logging.INFO
    if not logger.isEnabledFor(level):
        return str(data["message"])
    fields = {key: value for key, value in data.items() if key not in _RESERVED}
    message = str(data["message"])
    pairs = " ".join(f"{key}={_text(value)}" for key, value in context.items() if key not in fields)
    if pairs:
        message = f"{message} {pairs}"
    if isinstance(data.get("exc_info"), str):
        message = f"{message}\n{data['exc_info']}"
    logger.log(level, "%s", message, extra={FIELDS_ATTR: {**fields, **context}})
    return str(data["message"])
