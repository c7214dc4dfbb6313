"""tests/isolation.py: an unmarked test that starts a subprocess or a server fails,
naming itself and the marker; a marked one may. Inner pytest runs (pytester, in
this process) with the guard as their only plugin."""

from __future__ import annotations

import pytest

from tests.isolation import Guard

INNER_CONFTEST = """
pytest_plugins = ("tests.isolation",)
"""
INNER_INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"

UNMARKED = """
import asyncio
import multiprocessing
import socket
import subprocess
import sys

import grpc
import pytest


def test_popen():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_asyncio_subprocess():
    async def spawn():
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
        await process.wait()

    asyncio.run(spawn())


def test_multiprocessing():
    process = multiprocessing.get_context("spawn").Process(target=print)
    process.start()
    process.join()


def test_tcp_bind():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))


def test_unix_listen(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "s"))
        sock.listen()


def test_asyncio_server():
    async def serve():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        server.close()

    asyncio.run(serve())


def test_grpc_server():
    grpc.aio.server()


@pytest.fixture(scope="module")
def module_server():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock
    sock.close()


def test_uses_a_module_scoped_server(module_server):
    pass


def test_swallowed_in_a_thread():
    import threading

    def serve():
        try:
            socket.socket().bind(("127.0.0.1", 0))
        except BaseException:
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    thread.join()


def test_a_server_thread_that_never_starts():
    import threading

    started = threading.Event()

    def serve():
        try:
            socket.socket().bind(("127.0.0.1", 0))
        except BaseException:
            return  # a server thread that logs and gives up
        started.set()

    threading.Thread(target=serve).start()
    assert started.wait(0.5), "the server did not start"


def test_socketpair_and_event_loops_are_fine():
    left, right = socket.socketpair()
    left.close()
    right.close()
    asyncio.run(asyncio.sleep(0))
"""

MARKED = """
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_may_listen_and_spawn():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
"""

REFUSED = {
    "test_popen": "starts a subprocess (subprocess.Popen)",
    "test_asyncio_subprocess": "starts a subprocess (asyncio.create_subprocess_exec)",
    "test_multiprocessing": "starts a process (multiprocessing Process.start)",
    "test_tcp_bind": "binds a socket (socket.bind)",
    "test_unix_listen": "binds a socket (socket.bind)",
    "test_asyncio_server": "binds a socket (socket.bind)",
    "test_grpc_server": "starts a gRPC server (grpc.aio.server)",
    "test_uses_a_module_scoped_server": "binds a socket (socket.bind)",
    "test_swallowed_in_a_thread": "binds a socket (socket.bind)",
    "test_a_server_thread_that_never_starts": "binds a socket (socket.bind)",
}


def test_unmarked_tests_that_spawn_or_listen_fail_naming_the_test(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makeini(INNER_INI)
    pytester.makepyfile(test_unit=UNMARKED)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rA")
    text = result.stdout.str()
    # The module fixture's test errors at setup; the thread's swallowed refusal fails
    # its test at teardown (its call itself passed); a server thread's refusal is named
    # beside the failure it caused; socketpair and loops are fine.
    result.assert_outcomes(passed=2, failed=8, errors=2)
    for name, what in REFUSED.items():
        message = f"test_unit.py::{name} {what} but is not marked `integration`"
        assert message in text, f"{name}: {message!r} not in the output"
    assert "@pytest.mark.integration" in text
    assert "PASSED test_unit.py::test_socketpair_and_event_loops_are_fine" in text


def test_the_guard_patches_and_restores_the_entry_points() -> None:
    import asyncio
    import multiprocessing.process
    import socket
    import subprocess

    def entry_points() -> list[object]:
        return [
            socket.socket.bind,
            socket.socket.listen,
            subprocess.Popen._execute_child,  # type: ignore[attr-defined]
            asyncio.create_subprocess_exec,
            multiprocessing.process.BaseProcess.start,
        ]

    before = entry_points()
    guard = Guard("tests/x.py::test_y")
    guard.install()
    try:
        patched = entry_points()
        with pytest.raises(pytest.fail.Exception, match=r"tests/x\.py::test_y binds a socket"):
            socket.socket().bind(("127.0.0.1", 0))
        assert guard.violations and "mark it @pytest.mark.integration" in guard.violations[0]
    finally:
        guard.uninstall()
    assert all(new is not old for new, old in zip(patched, before, strict=True))
    assert entry_points() == before


@pytest.mark.integration
def test_marked_tests_may_listen_and_spawn(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makeini(INNER_INI)
    pytester.makepyfile(test_integration=MARKED)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
