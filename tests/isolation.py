"""Unit tests stay unit tests: a test without the `integration` marker that starts
a subprocess or a server fails at once.

`make test-fast` runs `-m "not integration and not slow"` and promises no
servers and no subprocesses; this keeps the promise true as tests are added.
For every test WITHOUT the marker, from the start of its setup to the end of its
teardown, these entry points raise (and record) a failure naming the test:

- processes: `subprocess.Popen` (so `run`, `check_output`, ...),
  `asyncio.create_subprocess_exec` / `_shell`, `multiprocessing` `Process.start`
  (so pools and ProcessPoolExecutor);
- listening: `socket.socket.bind` and `.listen` (TCP, UDP and Unix sockets;
  `socket.socketpair`, which event loops use, does neither), and the `grpc.server`
  / `grpc.aio.server` factories (gRPC binds in C, not through Python's socket).

The guard is on from the start of the setup phase, not only in the test body:
most servers here start in module-scoped fixtures, which pytest sets up before
any function-scoped (even autouse) fixture, so the patching is done by
runtest hooks (tests/conftest.py loads this module as a plugin).

A failure is raised where the call is made (a `pytest.fail` exception, a
BaseException, so `except Exception` in the code under test does not swallow
it); if something still swallows it (a server thread, a supervisor loop), the
test fails at teardown with the same message.
"""

from __future__ import annotations

import asyncio
import multiprocessing.process
import socket
import subprocess
from collections.abc import Callable, Generator
from typing import Any

import pytest

__all__ = ["ISOLATION_MARKER", "Guard"]

ISOLATION_MARKER = "integration"

_guard_key = pytest.StashKey["Guard"]()
_call_passed_key = pytest.StashKey[bool]()


class Guard:
    """Patches the process and listening entry points for one unmarked test."""

    def __init__(self, nodeid: str) -> None:
        self.nodeid = nodeid
        self.violations: list[str] = []
        self._patch = pytest.MonkeyPatch()

    def message(self, what: str) -> str:
        return (
            f"{self.nodeid} {what} but is not marked `{ISOLATION_MARKER}`: mark it "
            f"@pytest.mark.{ISOLATION_MARKER} (or `pytestmark = pytest.mark.{ISOLATION_MARKER}` "
            "at the top of its module); `make test-fast` runs only unmarked tests, "
            "which start no servers and no subprocesses (tests/isolation.py)"
        )

    def _refuse(self, what: str) -> None:
        text = self.message(what)
        self.violations.append(text)
        pytest.fail(text, pytrace=True)

    def _refusing(self, what: str) -> Callable[..., Any]:
        def refuse(*_args: Any, **_kwargs: Any) -> Any:
            self._refuse(what)

        return refuse

    def _refusing_async(self, what: str) -> Callable[..., Any]:
        async def refuse(*_args: Any, **_kwargs: Any) -> Any:
            self._refuse(what)

        return refuse

    def install(self) -> None:
        patch = self._patch
        # Popen.__init__ calls _execute_child to spawn; refusing there lets Popen
        # clean up its pipes as it does for any failed spawn.
        patch.setattr(
            subprocess.Popen, "_execute_child", self._refusing("starts a subprocess (subprocess.Popen)")
        )
        for name in ("create_subprocess_exec", "create_subprocess_shell"):
            what = f"starts a subprocess (asyncio.{name})"
            patch.setattr(asyncio, name, self._refusing_async(what))
            patch.setattr(asyncio.subprocess, name, self._refusing_async(what))
        patch.setattr(
            multiprocessing.process.BaseProcess,
            "start",
            self._refusing("starts a process (multiprocessing Process.start)"),
        )
        patch.setattr(socket.socket, "bind", self._refusing("binds a socket (socket.bind)"))
        patch.setattr(socket.socket, "listen", self._refusing("listens on a socket (socket.listen)"))
        try:
            import grpc
            import grpc.aio
        except ImportError:  # pragma: no cover - grpcio is a dependency
            return
        patch.setattr(grpc, "server", self._refusing("starts a gRPC server (grpc.server)"))
        patch.setattr(grpc.aio, "server", self._refusing("starts a gRPC server (grpc.aio.server)"))

    def uninstall(self) -> None:
        self._patch.undo()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    if item.get_closest_marker(ISOLATION_MARKER) is None:
        guard = Guard(item.nodeid)
        item.stash[_guard_key] = guard
        guard.install()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_call_passed_key] = report.passed
    guard = item.stash.get(_guard_key, None)
    if guard is not None and guard.violations and report.failed:
        # A refusal in a server thread often surfaces as something else ("did not
        # start" after a wait): say what caused it next to that failure.
        if guard.violations[0] not in report.longreprtext:
            report.sections.append(("tests/isolation.py", "\n".join(guard.violations)))
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    guard = item.stash.get(_guard_key, None)
    try:
        result = yield
    finally:
        if guard is not None:
            guard.uninstall()
    # A refusal swallowed on the way (a server thread, a retry loop) still fails the
    # test; one that already failed it is not reported twice.
    if guard is not None and guard.violations and item.stash.get(_call_passed_key, False):
        pytest.fail(guard.violations[0], pytrace=False)
    return result
