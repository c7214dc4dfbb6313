"""Shared bits of the scoring tests."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bon_gateway.config import GatewayConfig, RewardModelConfig
from bon_gateway.types import Message

MESSAGES = (
    Message("system", "You are a careful math tutor."),
    Message("user", "What is 17 * 23? Explain briefly."),
)
MESSAGE_DICTS = [{"role": m.role, "content": m.content} for m in MESSAGES]


def mixed_candidates() -> list[str]:
    """8 answers from 1 token to ~300 tokens."""
    long = " ".join(f"step {i}: add {i * 7} to the running total." for i in range(30))
    return [
        "391",
        "17 * 23 = 391.",
        "",
        "Let me think. 17 * 20 = 340 and 17 * 3 = 51, so the total is 391.",
        long,
        "I am not sure, maybe 401?",
        long[: len(long) // 3] + " Therefore 391.",
        "The answer is 391 because 23 * 17 = 23 * 10 + 23 * 7 = 230 + 161 = 391. " * 3,
    ]


def gateway_config(*entries: dict[str, Any]) -> GatewayConfig:
    return GatewayConfig(reward_models=tuple(RewardModelConfig.model_validate(e) for e in entries))


@contextmanager
def no_torch_check() -> Iterator[None]:
    yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def remote_worker_process(
    name: str, path: Path, *flags: str, check_exit: bool = True
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`bon-gateway worker --listen 127.0.0.1:PORT --reward-model NAME=PATH FLAGS...`:
    yields (address, process); stopped with SIGTERM, which must exit 0 after serving
    (unless `check_exit` is False: a test that kills it)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bon_gateway",
            "worker",
            "--listen",
            f"127.0.0.1:{port}",
            "--reward-model",
            f"{name}={path}",
            *flags,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield f"127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    if not check_exit:
        return
    assert proc.returncode == 0, err.decode()[-2000:]
    assert b"phase=serving" in err and b"phase=stopped" in err
