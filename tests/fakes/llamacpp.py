"""A real llama.cpp server (llama-cpp-python) on the SmolLM2 GGUF, for integration tests."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from tests.fakes.upstream import unused_port


@contextlib.contextmanager
def llama_cpp_server(log_dir: Path, *, start_timeout_s: float = 120.0) -> Iterator[str]:
    """Start `python -m llama_cpp.server` on 127.0.0.1; yield its base URL (…/v1); always stop it."""
    from bon_gateway.smollm2 import smollm2_gguf_path

    port = unused_port()
    log = log_dir / "llama-server.log"
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf_path()),
            "--host", "127.0.0.1", "--port", str(port), "--n_threads", "1",
            # Its default stops a stream when another request arrives (see FACTS.md).
            "--interrupt_requests", "False"]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError("llama.cpp server exited:\n" + log.read_text(errors="replace")[-3000:])
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError("llama.cpp server never answered:\n" + tail)
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
