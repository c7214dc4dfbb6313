"""The last lines of the demo and `make serve` (local.stop_process): a server stopped by
our SIGTERM is a normal stop, not an exit code that reads like an error (issue 16, item 5)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bon_gateway.local import stop_process

pytestmark = pytest.mark.integration  # starts a subprocess


def say(message: str) -> None:
    print(f"[demo] {message}")


def test_a_normal_stop_shows_no_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stop_process(sleeper, "llama.cpp server", say)
    assert sleeper.returncode == -15
    assert capsys.readouterr().out == "[demo] stopped llama.cpp server\n"


def test_a_failure_at_stop_shows_its_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    code = (
        "import signal, sys, time\n"
        "signal.signal(15, lambda *a: sys.exit(3))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)"
    )
    failing = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert failing.stdout is not None and failing.stdout.readline() == "ready\n"  # its handler is set
    stop_process(failing, "bon-gateway", say)
    assert capsys.readouterr().out == "[demo] stopped bon-gateway (exit 3)\n"
