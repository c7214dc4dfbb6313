"""What the HTTP pipeline itself costs per request: the app that `build_app` makes
(request metrics, catch-all, guard, FastAPI routing, the route: body read and
validation, conversion, the JSON reply), driven in-process as an ASGI app, with
a stub engine that answers at once. No sockets, no uvicorn, no upstream: the
part of bench/gateway_overhead.py's figure that the HTTP front's code decides.

Each tree (`--gateway-src`, default this checkout) runs in its own process with
that tree first on its path; trees take turns, round by round.

    python bench/http_pipeline.py                                  # CPU time per request
    python bench/http_pipeline.py --gateway-src before=DIR --gateway-src after=.
    python bench/http_pipeline.py --instructions ...               # instructions per request

`--instructions` counts instructions under valgrind (callgrind): the count for
1,200 requests less the count for 200, over 1,000. Slow (about a minute per
tree), but the same on a busy machine as on a quiet one, where CPU time is not.
Writes bench/results/http_pipeline.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
BODY = {
    "model": "bench",
    "messages": [{"role": "user", "content": "Say one word."}],
    "seed": 7,
    "best_of": 4,
    "max_tokens": 16,
}


# -- the child: one tree, in-process ----------------------------------------------------------
def run_child(requests: int, reps: int, warm: int) -> None:
    """Drive the tree's app; print its CPU time per request (JSON)."""
    import asyncio

    import bon_gateway
    from bon_gateway.api.guard import Guard
    from bon_gateway.api.http_app import build_app
    from bon_gateway.config import GatewayConfig
    from bon_gateway.metrics import Metrics
    from bon_gateway.types import BonResult, ModelInfo, ScoredCandidate, Timings, Usage

    config = GatewayConfig.model_validate(
        {
            "server": {"max_best_of": 16, "limits": {"max_in_flight": 1024}},
            "generator": {"url": "http://127.0.0.1:9/v1", "model": "bench"},
        }
    )
    ranked = [
        ScoredCandidate(i, text, 0.0, rank=i + 1)
        for i, text in enumerate(["alpha", "beta", "gamma", "delta"])
    ]
    result = BonResult("bench", "bench", "noop", ranked, Usage(16, 4, 4), Timings())

    class Admitted:
        def __init__(self, request: Any) -> None:
            self.request = request

    class StubEngine:
        """The engine API of either tree (admit + run(admitted, deadline), or the older
        run(bon, timeout_s) + validate + resolve_reward_model), answering at once."""

        def __init__(self) -> None:
            self.config = config

        def admit(self, request: Any) -> Admitted:
            return Admitted(request)

        async def run(self, *args: Any, **kwargs: Any) -> BonResult:
            return result

        def validate(self, bon: Any) -> None:
            pass

        def resolve_reward_model(self, name: str | None) -> str:
            return "noop"

        def list_models(self) -> list[ModelInfo]:
            return [ModelInfo("noop", "reward")]

        def ready(self) -> bool:
            return True

    body = json.dumps(BODY, separators=(",", ":")).encode()
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"content-type", b"application/json"),
        (b"accept", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]

    async def one(app: Any) -> int:
        """One POST /v1/chat/completions as uvicorn hands it to the app."""
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/chat/completions",
            "raw_path": b"/v1/chat/completions",
            "root_path": "",
            "query_string": b"",
            "server": ("127.0.0.1", 8000),
            "client": ("127.0.0.1", 50000),
            "headers": headers,
            "state": {},
        }
        sent = False
        done = asyncio.Event()
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()  # the disconnect only comes once the response is out
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif not message.get("more_body", False):
                done.set()

        await app(scope, receive, send)
        return status

    package = str(Path(bon_gateway.__file__).resolve().parent)

    async def main() -> dict[str, Any]:
        app = build_app(StubEngine(), Metrics(), Guard.from_config(config.server, {}))  # type: ignore[arg-type]
        for _ in range(warm):
            if await one(app) != 200:
                raise RuntimeError("the app did not answer 200")
        per_rep = []
        for _ in range(reps):
            started = time.process_time()
            for _ in range(requests):
                await one(app)
            per_rep.append(1e6 * (time.process_time() - started) / requests)
        return {"cpu_us": per_rep, "package": package}

    try:
        import uvloop

        out = uvloop.run(main())
    except ImportError:
        out = asyncio.run(main())
    print(json.dumps(out), flush=True)


# -- the driver ---------------------------------------------------------------------------------
def _child(
    src: Path, requests: int, reps: int, warm: int, valgrind: bool
) -> tuple[dict[str, Any], int | None]:
    """(the child's JSON line, callgrind's instruction count or None)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, __file__, "_run", str(src), str(requests), str(reps), str(warm)]
    if valgrind:
        command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{src}: {done.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(lines[-1])
    if Path(out["package"]) != src / "bon_gateway":
        raise RuntimeError(f"{src}: imported bon_gateway from {out['package']}")
    count = re.search(r"Collected : (\d+)", done.stderr)
    return out, int(count.group(1)) if count else None


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_run":
        sys.path.insert(0, sys.argv[2])  # the tree under test, ahead of this script's folder
        run_child(int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gateway_overhead import GatewayVersion

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gateway-src", action="append", type=GatewayVersion.parse, metavar="[LABEL=]DIR")
    parser.add_argument("--instructions", action="store_true", help="count instructions under valgrind")
    parser.add_argument("--rounds", type=int, default=3, help="CPU time: rounds of all trees in turn")
    parser.add_argument("--output", type=Path, default=RESULTS / "http_pipeline")
    args = parser.parse_args()
    versions: list[GatewayVersion] = args.gateway_src or [GatewayVersion("checkout", ROOT)]
    if len({v.label for v in versions}) != len(versions):
        parser.error("--gateway-src labels must be distinct")
    if args.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions needs valgrind")
    rows: dict[str, dict[str, Any]] = {}
    for version in versions:
        rows[version.label] = {"src": str(version.src), "commit": version.commit(), "cpu_us": []}
    if args.instructions:
        for version in versions:
            print(f"{version.label}: counting ...", flush=True)
            _, small = _child(version.src, 200, 1, 100, valgrind=True)
            _, large = _child(version.src, 1200, 1, 100, valgrind=True)
            assert small is not None and large is not None
            rows[version.label]["instructions_per_request"] = (large - small) / 1000
    else:
        for r in range(args.rounds):
            for version in versions if r % 2 == 0 else versions[::-1]:
                out, _ = _child(version.src, 3000, 3, 500, valgrind=False)
                rows[version.label]["cpu_us"].extend(out["cpu_us"])
        for row in rows.values():
            row["cpu_us_per_request"] = min(row["cpu_us"])
    key, unit = (
        ("instructions_per_request", "instructions / request")
        if args.instructions
        else ("cpu_us_per_request", "CPU µs / request (best rep)")
    )
    first = rows[versions[0].label][key]
    lines = [
        "# HTTP pipeline cost (bench/http_pipeline.py)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {os.cpu_count()} CPUs · Python "
        f"{platform.python_version()} · load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
        "",
        f"| Tree | Commit | {unit} | / {versions[0].label} |",
        "|---|---|---|---|",
        *[
            f"| {label} | {row['commit']} | {row[key]:,.0f} | {row[key] / first:.2f} |"
            for label, row in rows.items()
        ],
        "",
        "One non-streamed POST /v1/chat/completions (best_of=4) at a time through build_app's app, "
        "stub engine; "
        + (
            "Ir(1,200 requests) - Ir(200), / 1,000." if args.instructions else "3 x 3,000 requests per round."
        ),
    ]
    text = "\n".join(lines) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".md").write_text(text, encoding="utf-8")
    args.output.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
