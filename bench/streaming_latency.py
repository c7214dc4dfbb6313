"""What a best-of-N request costs after its slowest candidate: the streaming engine vs the old one.

    python bench/streaming_latency.py --gateway-src before=/path/to/old/tree --gateway-src after=.
    python bench/streaming_latency.py --quick            # this checkout only, fewer requests

Each tree's real gateway (`bon-gateway serve`, its own reward worker: the GSM8K
verifier, SmolLM2-135M) runs against one streaming upstream (its own process,
aiohttp): candidate `seed` streams a real GSM8K solution word by word over a fixed
duration (within --spread, default 0.3-1.2 s, a function of the seed), so candidates finish at different
times and the slowest one's generation time is known. Requests alternate between the
trees, one at a time. Per request:

- tail = end-to-end latency - the slowest candidate's stream duration: what the
  gateway spends after the last token (the old engine scores all N candidates then;
  the streaming one has scored the others already and only the last is left);
- one = a POST /v1/rewards of one candidate of that length alone on the same gateway
  ("So, " + its text: new tokens; the streaming tree's worker may still hold the prompt);
- all = a POST /v1/rewards of all N candidates (what the old engine pays at the end).

Target (issue 15, section 2): tail <= one + 5 ms. Writes streaming_latency.{md,json}
and a PNG (tail by tree, with one and all) under bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from early_rejection import stop_processes, wait_ready
from gateway_overhead import GatewayVersion, free_port
from gsm8k import load_gsm8k_candidates
from gsm8k_rewards import _toml as toml_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
VERIFIER = ROOT / ".cache" / "models" / "gsm8k-verifier"
SPREAD_S = [0.3, 1.2]  # --spread: the shortest and longest stream
QUESTIONS = load_gsm8k_candidates()[:64]


def duration(seed: int) -> float:
    """Deterministic per seed, within SPREAD_S: the stream's length in time."""
    low, high = SPREAD_S
    return low + (high - low) * (((seed * 2654435761) % 1000) / 999)


def solution(seed: int) -> str:
    problem = QUESTIONS[(seed // 4) % len(QUESTIONS)]
    return problem.solutions[seed % 4].text


def question(request: int) -> str:
    return QUESTIONS[request % len(QUESTIONS)].question


# -- the upstream (own process) -------------------------------------------------------------
def run_upstream(port: int) -> None:
    from aiohttp import web

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seed = int(body.get("seed", 0))
        words = solution(seed).split(" ")
        if not body.get("stream"):  # the old engine's calls: the whole answer at the end
            await asyncio.sleep(duration(seed))
            message = {"role": "assistant", "content": solution(seed)}
            usage = {"prompt_tokens": 1, "completion_tokens": len(words), "total_tokens": len(words) + 1}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return web.json_response({"id": f"s{seed}", "object": "chat.completion", "created": 0,
                                      "model": "bench", "choices": [choice], "usage": usage})  # fmt: skip
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": f"s{seed}", "object": "chat.completion.chunk", "created": 0, "model": "bench"}
        pause = duration(seed) / len(words)
        started = time.perf_counter()
        for i, word in enumerate(words):
            text = word if i == 0 else " " + word
            delta = {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
            await response.write(b"data: " + json.dumps(base | delta).encode() + b"\n\n")
            # Paced against the start, so the stream's duration does not drift with load.
            await asyncio.sleep(max(0.0, started + pause * (i + 1) - time.perf_counter()))
        end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await response.write(b"data: " + json.dumps(base | end).encode() + b"\n\ndata: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    print("ready", flush=True)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


@contextlib.contextmanager
def upstream() -> Iterator[str]:
    port = free_port()
    spread = [str(x) for x in SPREAD_S]
    process = subprocess.Popen(
        [sys.executable, __file__, "_upstream", str(port), *spread], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        if not process.stdout.readline().startswith(b"ready"):
            raise RuntimeError("the upstream did not start")
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):  # "ready" is printed just before the socket is bound
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{url}/v1/chat/completions", json={"seed": 0}, timeout=5).read()
                break
            time.sleep(0.1)
        yield f"{url}/v1"
    finally:
        process.terminate()
        process.wait(15)


@contextlib.contextmanager
def gateway(version: GatewayVersion, upstream_url: str, log_dir: Path) -> Iterator[str]:
    """`bon-gateway serve` from the version's tree, the verifier as its reward model."""
    http_port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "http_port": http_port, "grpc_port": free_port()},
        "generator": {"url": upstream_url, "model": "bench", "mode": "parallel"},
        "reward_models": [{"name": "verifier", "path": str(VERIFIER), "workers": 1}],
    }
    config_file = log_dir / f"{version.label}.toml"
    config_file.write_text(toml_text(config), encoding="utf-8")  # type: ignore[arg-type]
    with (log_dir / f"{version.label}.log").open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "bon_gateway", "serve", "--config", str(config_file)],
            env={**os.environ, "PYTHONPATH": str(version.src)},
            cwd=version.src,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_ready(f"{url}/ready", process, 300)
        print(f"phase=gateway version={version.label} ready", flush=True)
        yield url
    finally:
        stop_processes([process])


# -- the driver -----------------------------------------------------------------------------
def one_request(client: httpx.Client, url: str, request: int, n: int) -> dict[str, float]:
    seed = 10_000 + request * n
    messages = [{"role": "user", "content": question(request)}]
    body = {"model": "bench", "messages": messages, "best_of": n, "seed": seed, "reward_model": "verifier"}
    started = time.perf_counter()
    reply = client.post(f"{url}/v1/chat/completions", json=body)
    e2e = time.perf_counter() - started
    reply.raise_for_status()
    if reply.json()["usage"]["candidates_generated"] != n:
        raise RuntimeError("the gateway dropped candidates")
    seeds = [seed + i for i in range(n)]
    slowest = max(seeds, key=duration)
    # A text the worker has not seen (the prompt it may have kept; not this candidate's own
    # tokens, which the request just scored): what scoring one more candidate costs.
    one = _rewards(client, url, messages, ["So, " + solution(slowest)])
    every = _rewards(client, url, messages, [solution(s) for s in seeds])
    return {
        "e2e": e2e,
        "slowest": duration(slowest),
        "tail": e2e - duration(slowest),
        "one": one,
        "all": every,
    }


def _rewards(client: httpx.Client, url: str, messages: list[dict[str, str]], texts: list[str]) -> float:
    started = time.perf_counter()
    reply = client.post(
        f"{url}/v1/rewards", json={"model": "verifier", "messages": messages, "candidates": texts}
    )
    reply.raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_upstream":
        SPREAD_S[:] = [float(sys.argv[3]), float(sys.argv[4])]
        run_upstream(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gateway-src", action="append", type=GatewayVersion.parse, metavar="[LABEL=]DIR")
    parser.add_argument("--ns", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--requests", type=int, default=24, help="per tree and N")
    parser.add_argument("--spread", type=float, nargs=2, default=SPREAD_S, metavar=("MIN_S", "MAX_S"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "streaming_latency")
    args = parser.parse_args()
    SPREAD_S[:] = args.spread
    versions: list[GatewayVersion] = args.gateway_src or [GatewayVersion("checkout", ROOT)]
    requests = 4 if args.quick else args.requests
    if not (VERIFIER / "config.json").exists():
        subprocess.run([sys.executable, "-m", "bon_gateway.verifier"], check=True, cwd=ROOT)
    log_dir = Path(tempfile.mkdtemp(prefix="streaming-latency-"))
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        upstream_url = stack.enter_context(upstream())
        urls = {v.label: stack.enter_context(gateway(v, upstream_url, log_dir)) for v in versions}
        client = stack.enter_context(httpx.Client(timeout=300))
        for n in args.ns:
            for url in urls.values():  # warm-up: first-request costs, not measured
                one_request(client, url, 999, n)
            for request in range(requests):
                order = list(urls) if request % 2 == 0 else list(reversed(urls))
                for label in order:
                    rows.append({"version": label, "n": n, **one_request(client, urls[label], request, n)})
            print(f"phase=measured n={n} requests={requests * len(urls)}", flush=True)
    report(rows, versions, args)


def report(rows: list[dict[str, Any]], versions: list[GatewayVersion], args: argparse.Namespace) -> None:
    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.1f}"

    lines = [
        "# Latency after the slowest candidate: streaming engine vs the old one",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; reward model: the GSM8K verifier "
        "(SmolLM2-135M) on CPU; candidates: real GSM8K solutions streamed over "
        f"{SPREAD_S[0]}-{SPREAD_S[1]} s. "
        "Medians in ms.",
        "",
        "| tree (commit) | N | requests | e2e | slowest stream | tail = e2e - slowest "
        "| one = score 1 alone | all = score N | tail - one | target tail <= one + 5 ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for version in versions:
        for n in args.ns:
            group = [r for r in rows if r["version"] == version.label and r["n"] == n]
            tails = [r["tail"] for r in group]
            excess = [r["tail"] - r["one"] for r in group]
            met = statistics.median(excess) <= 0.005
            lines.append(
                f"| {version.label} ({version.commit()}) | {n} | {len(group)} "
                f"| {ms([r['e2e'] for r in group])} "
                f"| {ms([r['slowest'] for r in group])} | {ms(tails)} | {ms([r['one'] for r in group])} "
                f"| {ms([r['all'] for r in group])} | {ms(excess)} | {'met' if met else 'not met'} |"
            )
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text, encoding="utf-8")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    print(text)
    plot(rows, versions, args)


def plot(rows: list[dict[str, Any]], versions: list[GatewayVersion], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.ns), figsize=(5 * len(args.ns), 4), squeeze=False)
    for ax, n in zip(axes[0], args.ns, strict=True):
        labels, data = [], []
        for version in versions:
            group = [r for r in rows if r["version"] == version.label and r["n"] == n]
            for key in ("tail", "one", "all"):
                labels.append(f"{version.label}\n{key}")
                data.append([r[key] * 1000 for r in group])
        ax.boxplot(data, tick_labels=labels)
        ax.set_title(f"N = {n}")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("After the slowest candidate (tail) vs scoring one / all candidates")
    fig.tight_layout()
    path = args.out.with_suffix(".png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
