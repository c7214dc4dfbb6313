"""A spawned worker's log lines reach the gateway's log once: one timestamp (the
gateway's), the worker's own logger, level and phase fields, in text and JSON mode
(bon_gateway.logs.forward_child_line; issue 16, item 5)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bon_gateway.logs import JsonFormatter, configure_logging, forward_child_line, log_phase

TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")
FALLBACK = logging.getLogger("bon_gateway.scoring")


def _worker_line(phase: str, level: int = logging.INFO, **fields: object) -> str:
    """What a worker started with --log-format json writes on stderr."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    worker_log = logging.getLogger("test.worker.side")
    worker_log.addHandler(handler)
    worker_log.propagate = False
    worker_log.setLevel(logging.DEBUG)
    try:
        log_phase(worker_log, phase, level, **fields)
    finally:
        worker_log.removeHandler(handler)
    line = stream.getvalue().strip()
    data = json.loads(line)
    data["logger"] = "bon_gateway.worker"  # as the worker names its logger
    return json.dumps(data)


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield io.StringIO()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_text_mode_one_timestamp_the_workers_logger_level_and_fields(captured: io.StringIO) -> None:
    configure_logging("INFO", "text", captured)
    line = _worker_line("serving", listen="unix:/tmp/x.sock", models="rm", pid=42)
    assert len(TIMESTAMP.findall(line)) == 1  # the worker's own
    text = forward_child_line(line, FALLBACK, worker="rm")
    assert text == "phase=serving listen=unix:/tmp/x.sock models=rm pid=42"
    [out] = captured.getvalue().splitlines()
    assert len(TIMESTAMP.findall(out)) == 1, out  # before: the gateway's and the worker's
    assert out.endswith(
        " INFO bon_gateway.worker phase=serving listen=unix:/tmp/x.sock models=rm pid=42 worker=rm"
    )


def test_json_mode_keeps_the_fields_typed(captured: io.StringIO) -> None:
    configure_logging("INFO", "json", captured)
    forward_child_line(_worker_line("loaded", model="rm", params=1234, seconds=1.5), FALLBACK, worker="rm")
    [out] = captured.getvalue().splitlines()
    data = json.loads(out)
    assert (data["logger"], data["level"], data["phase"]) == ("bon_gateway.worker", "INFO", "loaded")
    assert (data["params"], data["seconds"], data["model"], data["worker"]) == (1234, 1.5, "rm", "rm")
    assert "ts" in data and len(TIMESTAMP.findall(out)) == 1


def test_levels_are_the_workers(captured: io.StringIO) -> None:
    configure_logging("WARNING", "text", captured)
    forward_child_line(_worker_line("load", model="rm"), FALLBACK, worker="rm")  # INFO: filtered
    forward_child_line(_worker_line("stop", logging.WARNING, reason="parent-gone"), FALLBACK, worker="rm")
    [out] = captured.getvalue().splitlines()
    assert " WARNING bon_gateway.worker phase=stop reason=parent-gone worker=rm" in out


def test_other_lines_pass_through_once(captured: io.StringIO) -> None:
    configure_logging("INFO", "text", captured)
    for raw in ("Traceback (most recent call last):", "{not json", '{"no": "message"}'):
        assert forward_child_line(raw, FALLBACK, worker="rm") == raw
    lines = captured.getvalue().splitlines()
    assert [line.split(" bon_gateway.scoring ", 1)[1] for line in lines] == [
        "worker=rm Traceback (most recent call last):",
        "worker=rm {not json",
        'worker=rm {"no": "message"}',
    ]


FORK_WHILE_GRPC_RUNS = """
import asyncio, os, sys
if sys.argv[1] == "quiet":
    from bon_gateway.cli import quiet_grpc_environment
    quiet_grpc_environment(os.environ)
import grpc, uvloop

async def main():
    server = grpc.aio.server()
    server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # The pool spawns its workers this way (uvloop forks) while the gRPC front runs.
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await child.wait()
    await server.stop(0)

uvloop.run(main())
"""


@pytest.mark.integration
def test_spawning_workers_prints_no_grpc_fork_notice() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])

    def stderr_of(mode: str) -> str:
        argv = [sys.executable, "-c", FORK_WHILE_GRPC_RUNS, mode]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stderr

    assert "fork_posix" in stderr_of("default")  # what every clean run printed
    assert stderr_of("quiet") == ""
