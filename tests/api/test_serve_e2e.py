"""`bon-gateway serve` end to end: real worker processes scoring with a tiny
random-weight reward model, a fake upstream with fixed texts, the openai SDK
and a gRPC channel as clients. Rewards must equal the reference forward pass."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest

from bon_gateway.v1 import best_of_n_pb2 as pb
from bon_gateway.v1 import best_of_n_pb2_grpc as pb_grpc
from tests.fakes import FakeUpstream, unused_port

# slow: `bon-gateway serve` with real reward workers takes ~25 s to start here.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TOL = 1e-4
QUESTION = [{"role": "user", "content": "What is 17 * 23? Explain briefly."}]
# Very different lengths, so ranking and padding are both exercised.
TEXTS = (
    "391",
    "17 * 23 = 391.",
    "Let me think. 17 * 20 = 340 and 17 * 3 = 51, so the total is 391.",
    "I am not sure, maybe 401?",
    " ".join(f"step {i}: add {i * 7} to the running total." for i in range(20)),
)

Reference = Callable[[Path, list[dict[str, str]], str], float]


@dataclass
class Served:
    http: str
    grpc_target: str
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def served(tiny_llama_rm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("serve") / "gateway.log"
    http_port, grpc_port = unused_port(), unused_port()
    with FakeUpstream(TEXTS) as upstream, log.open("wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bon_gateway",
                "serve",
                "--generator-url",
                upstream.url,
                "--generator-model",
                "fake-generator",
                "--reward-model",
                f"tiny={tiny_llama_rm}",
                "--device",
                "cpu",
                "--host",
                "127.0.0.1",
                "--http-port",
                str(http_port),
                "--grpc-port",
                str(grpc_port),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
        served = Served(f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", process, log)
        try:
            _wait_ready(served)
            yield served
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _wait_ready(served: Served, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if served.process.poll() is not None:
            pytest.fail("gateway exited:\n" + served.log.read_text(errors="replace")[-4000:])
        try:
            if httpx.get(f"{served.http}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail("gateway never became ready:\n" + served.log.read_text(errors="replace")[-4000:])


def _expected(path: Path, reference: Reference) -> dict[str, float]:
    return {text: reference(path, QUESTION, text) for text in TEXTS}


def test_openai_sdk_best_first_with_reference_rewards(
    served: Served, tiny_llama_rm: Path, reference_outcome_reward: Reference
) -> None:
    expected = _expected(tiny_llama_rm, reference_outcome_reward)
    client = openai.OpenAI(base_url=f"{served.http}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model="fake-generator",
        messages=QUESTION,  # type: ignore[arg-type]
        seed=0,
        n=2,
        extra_body={"best_of": len(TEXTS), "return_candidates": True},
    )
    best = max(TEXTS, key=lambda t: expected[t])
    assert reply.choices[0].message.content == best
    assert reply.model_extra is not None and reply.model_extra["reward_model"] == "tiny"
    candidates = reply.model_extra["candidates"]
    assert sorted(c["text"] for c in candidates) == sorted(TEXTS)
    for candidate in candidates:
        assert candidate["reward"] == pytest.approx(expected[candidate["text"]], abs=TOL)
    rewards = [c["reward"] for c in candidates]
    assert rewards == sorted(rewards, reverse=True)
    for choice in reply.choices:
        assert choice.model_extra["reward"] == pytest.approx(expected[choice.message.content], abs=TOL)  # type: ignore[index]


def test_grpc_same_ranking_and_score(
    served: Served, tiny_llama_rm: Path, reference_outcome_reward: Reference
) -> None:
    expected = _expected(tiny_llama_rm, reference_outcome_reward)
    ranked = sorted(TEXTS, key=lambda t: -expected[t])
    messages = [pb.ChatMessage(**m) for m in QUESTION]
    with grpc.insecure_channel(served.grpc_target) as channel:
        stub = pb_grpc.BestOfNStub(channel)
        reply = stub.Generate(
            pb.GenerateRequest(
                messages=messages,
                best_of=len(TEXTS),
                return_candidates=True,
                sampling=pb.SamplingParams(seed=0),
            ),
            timeout=120,
        )
        assert [c.text for c in reply.candidates] == ranked
        scored = stub.Score(pb.ScoreRequest(messages=messages, candidates=list(TEXTS)), timeout=120)
    assert [d.index for d in scored.data] == list(range(len(TEXTS)))
    for text, item in zip(TEXTS, scored.data, strict=True):
        assert item.reward == pytest.approx(expected[text], abs=TOL)
    assert TEXTS[scored.selected_index] == ranked[0]


def test_rewards_endpoint_matches_reference(
    served: Served, tiny_llama_rm: Path, reference_outcome_reward: Reference
) -> None:
    expected = _expected(tiny_llama_rm, reference_outcome_reward)
    body = {"messages": QUESTION, "candidates": list(TEXTS)}
    reply = httpx.post(f"{served.http}/v1/rewards", json=body, timeout=120).json()
    assert reply["model"] == "tiny"
    got = [d["reward"] for d in reply["data"]]
    assert got == pytest.approx([expected[t] for t in TEXTS], abs=TOL)


def test_sigterm_exits_zero(served: Served) -> None:
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(60) == 0, served.log.read_text(errors="replace")[-4000:]
    text = served.log.read_text(errors="replace")
    for phase in ("phase=workers_starting", "phase=http_listening", "phase=stopped", "phase=closed"):
        assert phase in text, phase


def test_a_pool_that_cannot_start_stops_the_gateway(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bon_gateway",
            "serve",
            "--reward-model",
            f"broken={missing}",
            "--generator-url",
            f"http://127.0.0.1:{unused_port()}/v1",
            "--host",
            "127.0.0.1",
            "--http-port",
            "0",
            "--grpc-port",
            "0",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode != 0
    assert "phase=workers_failed" in result.stderr
    assert "phase=closed" in result.stderr  # both fronts were shut down on the way out


def test_a_taken_grpc_port_fails_start_up_with_one_line(tmp_path: Path) -> None:
    # gRPC's default SO_REUSEPORT would let a second gateway bind the same port and
    # take part of its traffic; the taken port must stop start-up instead.
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "bon_gateway",
                "serve",
                "--generator-url",
                "http://127.0.0.1:9/v1",
                "--host",
                "127.0.0.1",
                "--http-port",
                "0",
                "--grpc-port",
                str(port),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    line = next(line for line in result.stderr.splitlines() if line.startswith("bon-gateway: "))
    assert f"cannot listen for gRPC on 127.0.0.1:{port}" in line and "grpc_port" in line
