"""Spawned reward workers die with their owner and leave no socket directory behind
(issue 16, item 8): `bon-gateway serve` stopped with SIGINT, killed with SIGKILL once
serving, or killed while its worker still loads."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.fakes import unused_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # serve + a real worker: ~25 s each here

REPO = Path(__file__).resolve().parents[2]
GONE_WITHIN_S = 3.0  # "within a couple of seconds"; the worker's graceful stop is well under it


class Gateway:
    def __init__(self, tmp_path: Path, model: Path) -> None:
        self.tmpdir = tmp_path / "tmp"
        self.tmpdir.mkdir()
        self.http = f"http://127.0.0.1:{unused_port()}"
        self.log = tmp_path / "gateway.log"
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bon_gateway",
                    "serve",
                    "--generator-url",
                    f"http://127.0.0.1:{unused_port()}/v1",
                    "--generator-model",
                    "m",
                    "--reward-model",
                    f"tiny={model}",
                    "--device",
                    "cpu",
                    "--host",
                    "127.0.0.1",
                    "--http-port",
                    self.http.rsplit(":", 1)[1],
                    "--grpc-port",
                    str(unused_port()),
                ],
                cwd=REPO,
                # The pool's socket directory goes under TMPDIR: this test's own.
                env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(self.tmpdir)},
                stdout=sink,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def worker(self, timeout_s: float = 60.0) -> psutil.Process:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            children = psutil.Process(self.process.pid).children()
            if children:
                return children[0]
            time.sleep(0.05)
        pytest.fail("no worker spawned:\n" + self.output())

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.output()
            try:
                if httpx.get(f"{self.http}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        pytest.fail("gateway never became ready:\n" + self.output())

    def socket_dirs(self) -> list[str]:
        return sorted(p.name for p in self.tmpdir.glob("bon-workers-*"))


@pytest.fixture
def gateway(tmp_path: Path, tiny_llama_rm: Path) -> Iterator[Gateway]:
    gw = Gateway(tmp_path, tiny_llama_rm)
    try:
        yield gw
    finally:
        if gw.process.poll() is None:
            gw.process.kill()
            gw.process.wait()


def _gone(worker: psutil.Process, timeout_s: float = GONE_WITHIN_S) -> bool:
    try:
        worker.wait(timeout_s)
    except psutil.TimeoutExpired:
        worker.kill()
        return False
    return True


def test_sigint_stops_the_workers_and_removes_the_socket_dir(gateway: Gateway) -> None:
    worker = gateway.worker()
    gateway.wait_ready()
    assert len(gateway.socket_dirs()) == 1  # it is where the test looks
    gateway.process.send_signal(signal.SIGINT)  # the owner only, not its process group
    assert gateway.process.wait(60) == 0, gateway.output()
    assert _gone(worker), "worker outlived its owner"
    assert gateway.socket_dirs() == []
    # A clean run reads clean: the worker's lines forwarded once, with one timestamp.
    log = gateway.log.read_text(errors="replace")
    [serving] = [line for line in log.splitlines() if "phase=serving" in line]
    assert len(re.findall(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", serving)) == 1, serving
    assert " INFO bon_gateway.worker phase=serving " in serving and serving.endswith(" worker=tiny")
    for alarming in ("fork_posix", "Traceback", " ERROR "):
        assert alarming not in log, log[-4000:]


def test_sigkill_of_a_serving_owner_ends_its_worker(gateway: Gateway) -> None:
    worker = gateway.worker()
    gateway.wait_ready()
    gateway.process.kill()
    gateway.process.wait()
    assert _gone(worker), "worker outlived its owner by more than a couple of seconds"
    assert gateway.socket_dirs() == []  # the last worker out removed it


def test_sigkill_while_the_worker_loads_ends_it(gateway: Gateway) -> None:
    worker = gateway.worker()  # spawned, still importing torch / loading the model
    gateway.process.kill()
    gateway.process.wait()
    assert _gone(worker), "a loading worker outlived its owner"
