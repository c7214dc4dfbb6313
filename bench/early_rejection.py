"""Speculative rejection against best-of-N on real generation: llama.cpp + the GSM8K verifier.

    python bench/early_rejection.py                      # 50 questions, N 4 8 16, alphas 0.5 0.75
    python bench/early_rejection.py --questions 5 --ns 4 8   # a quick look
    python bench/early_rejection.py --resume             # continue an interrupted run
    python bench/early_rejection.py --ns 16 --generator-nice 0 10   # generator niced, A/B

What runs: `--upstreams` llama-cpp-python servers on the SmolLM2-135M-Instruct GGUF
(one thread each, `--interrupt_requests False`; llama-cpp-python serialises requests
per process, so one process per concurrent candidate stands in for a batching server
such as vLLM), one `bon-gateway serve` balancing over them with the trained GSM8K
verifier (config/local.toml's model) as the reward model, rewards as raw logits. Each question goes
to POST /v1/chat/completions once per configuration, one request at a time, in an
order rotated per question (A/B alternation on a shared machine):

- best_of_n and speculative_rejection (every alpha, --checkpoints) at every N, all
  for real: best-of-4 cannot be read off best-of-16's first four candidates, because
  llama-cpp-python's output for one seed changes once a process has the prompt cached
  (its last prompt token is then evaluated alone: other rounding, another sample).

Per configuration: generator tokens (the gateway's usage.completion_tokens: the
upstream's chunk count, one token per chunk on llama-cpp-python, rejected candidates'
tokens up to their cancel included), the upstream processes' CPU seconds (what a
cancelled stream really saved there), wall seconds, the winner's final reward, and
whether the winner's answer is right (math-verify). Every request is a line of
bench/results/early_rejection.jsonl; the summary is early_rejection.md and the
reward-vs-tokens plot early_rejection.png.

Overshoot: the tokens a request generated beyond what its candidates account for
(finished ones: their length; rejected ones: their length at the checkpoint that
sank them), that is, tokens generated between a candidate reaching its checkpoint
and its cancel taking effect: the wait for the checkpoint's first `min_peers`
arrivals, then the scoring of its partial text. On this 2-core machine the reward worker shares the
cores with the generating processes, so each decision waits for CPU;
`--generator-nice 0 10` runs every configuration at both niceness levels of the
llama.cpp processes, alternating (a generator on its own accelerator does not slow
the reward worker).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
from gsm8k import Problem, is_right, load_gsm8k_candidates
from gsm8k_rewards import _toml as toml_text
from gsm8k_rewards import free_port

from bon_gateway.engine.answers import extract_answer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
VERIFIER = REPO / ".cache" / "models" / "gsm8k-verifier"
INSTRUCTION = "Solve this step by step, one step per line. End with the line 'A: <number>'."


@dataclass(frozen=True, slots=True)
class Config:
    strategy: str  # best_of_n | speculative_rejection
    n: int
    alpha: float | None = None
    nice: int = 0  # of the llama.cpp processes during this configuration's requests

    @property
    def key(self) -> str:
        key = (
            f"best_of_n/N={self.n}"
            if self.alpha is None
            else f"speculative_rejection/N={self.n}/alpha={self.alpha}"
        )
        return key if not self.nice else f"{key}/nice={self.nice}"


def renice(processes: list[psutil.Process], nice: int) -> None:
    """Every thread of the servers to `nice` (Linux niceness is per thread)."""
    for process in processes:
        for thread in process.threads():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.setpriority(os.PRIO_PROCESS, thread.id, nice)


# -- the servers ----------------------------------------------------------------


@contextlib.contextmanager
def llama_servers(count: int, log_dir: Path) -> Iterator[list[tuple[str, psutil.Process]]]:
    """`count` llama-cpp-python servers on free loopback ports; always stopped."""
    from bon_gateway.smollm2 import smollm2_gguf_path

    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for i in range(count):
            port = free_port()
            with (log_dir / f"llama-{i}.log").open("wb") as sink:
                flags = f"--host 127.0.0.1 --port {port} --n_threads 1 --interrupt_requests False"
                argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf_path())]
                procs.append(subprocess.Popen([*argv, *flags.split()], stdout=sink, stderr=subprocess.STDOUT))
            urls.append(f"http://127.0.0.1:{port}/v1")
        for url, proc in zip(urls, procs, strict=True):
            wait_ready(f"{url}/models", proc, 180)
        print(f"phase=upstreams count={count} ready", flush=True)
        yield [(url, psutil.Process(proc.pid)) for url, proc in zip(urls, procs, strict=True)]
    finally:
        stop_processes(procs)


@contextlib.contextmanager
def gateway(upstreams: list[str], max_tokens: int, log_dir: Path) -> Iterator[str]:
    """`bon-gateway serve` balancing over the upstreams, the GSM8K verifier as its RM."""
    http_port = free_port()
    config = {
        # A loaded machine must not cut a best-of-16 short: the deadline is not what is measured.
        "server": {
            "host": "127.0.0.1",
            "http_port": http_port,
            "grpc_port": free_port(),
            "request_timeout_s": 3600.0,
        },
        "generator": {
            "urls": upstreams,
            "model": "smollm2-135m-instruct",
            "mode": "parallel",
            "timeout_s": 900.0,
            "retries": 1,
        },
        "reward_models": [
            # Raw logits, not config/local.toml's sigmoid: the sigmoid saturates at 1.0 for
            # many answers, which would hide the differences between winners (same ranking).
            {"name": "gsm8k-verifier", "path": str(VERIFIER), "activation": "none", "workers": 1}
        ],
    }
    config_file = log_dir / "gateway.toml"
    config_file.write_text(toml_text(config), encoding="utf-8")  # type: ignore[arg-type]
    with (log_dir / "gateway.log").open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bon_gateway", "serve", "--config", str(config_file)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{http_port}"
        wait_ready(f"{url}/ready", proc, 300)
        print("phase=gateway ready", flush=True)
        yield url
    finally:
        stop_processes([proc])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll `url` until it answers 200; fail if `proc` exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} (logs: {url})")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise TimeoutError(f"{url} never answered 200")


def stop_processes(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each, SIGKILL after 30 s; then whatever is left of their process trees (vLLM's
    engine core outlives an API server stopped while it starts)."""
    trees: list[psutil.Process] = []
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            trees += psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(trees, timeout=10)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


# -- one request ----------------------------------------------------------------


def upstream_cpu_s(processes: list[psutil.Process]) -> float:
    return float(sum(p.cpu_times().user + p.cpu_times().system for p in processes))


def ask(
    client: httpx.Client,
    url: str,
    problem: Problem,
    config: Config,
    args: argparse.Namespace,
    processes: list[psutil.Process],
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": f"{problem.question}\n\n{INSTRUCTION}"}],
        "best_of": config.n,
        "seed": args.seed,
        "temperature": args.temperature,
        "top_p": 0.95,
        "max_tokens": args.max_tokens,
        "return_candidates": True,
        "strategy": config.strategy,
    }
    if config.alpha is not None:
        body |= {"rejection_rate": config.alpha, "checkpoints": args.checkpoints}
    cpu_before, started = upstream_cpu_s(processes), time.perf_counter()
    reply = client.post(f"{url}/v1/chat/completions", json=body)
    wall = time.perf_counter() - started
    time.sleep(0.2)  # a cancelled stream's server notices the disconnect within a chunk
    cpu = upstream_cpu_s(processes) - cpu_before
    reply.raise_for_status()
    data = reply.json()
    candidates = data["candidates"]
    return {
        "question": problem.index,
        "config": config.key,
        "strategy": config.strategy,
        "n": config.n,
        "alpha": config.alpha,
        "nice": config.nice,
        "tokens": data["usage"]["completion_tokens"],
        "upstream_cpu_s": cpu,
        "wall_s": wall,
        "candidates": [
            {k: c.get(k) for k in ("index", "text", "reward", "tokens", "finish_reason", "rejected_at")}
            for c in candidates
        ],
    }


def winner(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The best finished candidate (ties: the lower index, as the gateway ranks)."""
    finished = [c for c in candidates if c["finish_reason"] != "rejected"]
    return max(finished, key=lambda c: (c["reward"], -c["index"]))


# -- the run ----------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=50)
    parser.add_argument("--ns", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--upstreams", type=int, default=None, help="llama.cpp servers (default: max N)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the .jsonl")
    parser.add_argument(
        "--cancel-probe", action="store_true", help="only measure what llama.cpp does when a stream closes"
    )
    parser.add_argument(
        "--generator-nice",
        type=int,
        nargs="+",
        default=[0],
        help="niceness levels of the llama.cpp processes; each configuration runs at each (A/B)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "early_rejection")
    args = parser.parse_args()
    # A terminated run still stops its servers (the `with` blocks' cleanup runs).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not (VERIFIER / "config.json").exists():
        subprocess.run([sys.executable, "-m", "bon_gateway.verifier"], check=True, cwd=REPO)
    # Held-out problems (line index % 3 == 0; the verifier head was trained on the others).
    problems = [p for p in load_gsm8k_candidates() if p.index % 3 == 0][: args.questions]
    raw = args.out.with_suffix(".jsonl")
    if args.cancel_probe:
        cancel_probe(problems[0], args.out.with_name(args.out.name + "_cancel.md"))
        return
    if args.report_only:
        report([json.loads(line) for line in raw.read_text().splitlines()], problems, args)
        return
    big = max(args.ns)
    configs = [Config("best_of_n", n, None, nice) for n in args.ns for nice in args.generator_nice] + [
        Config("speculative_rejection", n, a, nice)
        for n in args.ns
        for a in args.alphas
        for nice in args.generator_nice
    ]
    raw.parent.mkdir(parents=True, exist_ok=True)
    done: set[tuple[int, str]] = set()
    if args.resume and raw.exists():
        done = {(r["question"], r["config"]) for r in map(json.loads, raw.read_text().splitlines())}
    elif raw.exists():
        raw.unlink()
    log_dir = Path(tempfile.mkdtemp(prefix="early-rejection-"))
    with (
        llama_servers(args.upstreams or big, log_dir) as servers,
        gateway([u for u, _ in servers], args.max_tokens, log_dir) as url,
        httpx.Client(timeout=1800) as client,
        raw.open("a", encoding="utf-8") as sink,
    ):
        processes = [p for _, p in servers]
        total = len(problems) * len(configs)
        started = time.monotonic()
        for q, problem in enumerate(problems):
            order = configs[q % len(configs) :] + configs[: q % len(configs)]
            for config in order:
                if (problem.index, config.key) in done:
                    continue
                renice(processes, config.nice)
                row = ask(client, url, problem, config, args, processes)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
            elapsed = time.monotonic() - started
            print(
                f"phase=progress questions={q + 1}/{len(problems)} "
                f"requests={(q + 1) * len(configs)}/{total} elapsed_s={elapsed:.0f}",
                flush=True,
            )
    rows = [json.loads(line) for line in raw.read_text().splitlines()]
    report(rows, problems, args)


def cancel_probe(problem: Problem, path: Path) -> None:
    """One llama.cpp server: a 200-token stream read to its end, then the same stream closed
    after 10 chunks; the server's CPU seconds during each and in the 3 s after the close."""
    with tempfile.TemporaryDirectory() as tmp, llama_servers(1, Path(tmp)) as [(url, server)]:
        body = {
            "model": "smollm2",
            "messages": [{"role": "user", "content": problem.question}],
            "max_tokens": 200,
            "temperature": 0.8,
            "seed": 1,
            "stream": True,
            "stop": [],
        }
        figures: dict[str, float] = {}
        with httpx.Client(timeout=300) as client:
            client.post(f"{url}/chat/completions", json={**body, "stream": False, "max_tokens": 8})  # warm
            before = upstream_cpu_s([server])
            chunks = 0
            with client.stream("POST", f"{url}/chat/completions", json=body) as reply:
                for line in reply.iter_lines():
                    chunks += line.startswith("data: {")
            figures["full_chunks"], figures["full_cpu_s"] = chunks, upstream_cpu_s([server]) - before
            before = upstream_cpu_s([server])
            chunks = 0
            with client.stream("POST", f"{url}/chat/completions", json={**body, "seed": 2}) as reply:
                for line in reply.iter_lines():
                    chunks += line.startswith("data: {")
                    if chunks == 10:
                        break
            closed = upstream_cpu_s([server])
            figures["closed_cpu_s"] = closed - before
            time.sleep(3)
            figures["after_close_cpu_s"] = upstream_cpu_s([server]) - closed
            started = time.perf_counter()
            client.post(f"{url}/chat/completions", json={**body, "stream": False, "max_tokens": 1})
            figures["next_request_s"] = time.perf_counter() - started
    text = (
        "# llama-cpp-python when a candidate's stream is closed\n\n"
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average "
        f"{os.getloadavg()[0]:.2f}; `python bench/early_rejection.py --cancel-probe`\n\n"
        "| stream | server CPU s |\n|---|---|\n"
        f"| read to the end ({figures['full_chunks']:.0f} chunks) | {figures['full_cpu_s']:.2f} |\n"
        f"| closed after 10 chunks: until the close | {figures['closed_cpu_s']:.2f} |\n"
        f"| closed after 10 chunks: the 3 s after it | {figures['after_close_cpu_s']:.2f} |\n\n"
        f"The next request (1 token) was answered in {figures['next_request_s']:.2f} s.\n"
    )
    path.write_text(text, encoding="utf-8")
    print(text)


# -- the report -------------------------------------------------------------------


def report(rows: list[dict[str, Any]], problems: list[Problem], args: argparse.Namespace) -> None:
    by_index = {p.index: p for p in problems}
    # Questions every configuration has answered (an interrupted run leaves partial ones).
    configs = {r["config"] for r in rows}
    complete = {
        q
        for q in by_index
        if all(any(r["question"] == q and r["config"] == c for r in rows) for c in configs)
    }
    rows = [r for r in rows if r["question"] in complete]
    questions = len(complete)
    summary: dict[str, dict[str, Any]] = {}
    for key in sorted({r["config"] for r in rows}):
        group = [r for r in rows if r["config"] == key]
        winners = [winner(r["candidates"]) for r in group]
        summary[key] = {
            "strategy": group[0]["strategy"],
            "n": group[0]["n"],
            "alpha": group[0]["alpha"],
            "nice": group[0].get("nice", 0),
            "questions": len(group),
            "tokens": statistics.mean(r["tokens"] for r in group),
            "overshoot": statistics.mean(
                r["tokens"] - sum(c["tokens"] or 0 for c in r["candidates"]) for r in group
            ),
            "reward": statistics.mean(w["reward"] for w in winners),
            "right": statistics.mean(
                is_right(extract_answer(w["text"]), by_index[r["question"]])
                for r, w in zip(group, winners, strict=True)
            ),
            "wall_s": statistics.mean(r["wall_s"] for r in group),
            "cpu_s": statistics.mean(r["upstream_cpu_s"] for r in group),
        }
    bon = {
        nice: sorted(
            (s for s in summary.values() if s["alpha"] is None and s["nice"] == nice),
            key=lambda s: s["tokens"],
        )
        for nice in {s["nice"] for s in summary.values()}
    }
    nice_flags = " --generator-nice " + " ".join(map(str, args.generator_nice)) if len(bon) > 1 else ""
    lines = [
        f"# Speculative rejection vs best-of-N ({questions} GSM8K questions, llama.cpp SmolLM2-135M, "
        f"GSM8K verifier)",
        "",
        f"checkpoints {args.checkpoints}, max_tokens {args.max_tokens}, temperature {args.temperature}, "
        f"seed {args.seed}; `python bench/early_rejection.py "
        f"--questions {args.questions} --ns {' '.join(map(str, args.ns))} "
        f"--alphas {' '.join(map(str, args.alphas))}{nice_flags}`",
        "",
        "| strategy | N | alpha | generator nice | tokens / question | x best-of-N | overshoot "
        "| x best-of-N without overshoot | upstream CPU s | wall s "
        "| winner reward | winner right | reward vs best-of-N at equal tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in sorted(summary.values(), key=lambda s: (s["n"], s["alpha"] or 0.0, s["nice"])):
        same_n = summary[Config("best_of_n", s["n"], None, s["nice"]).key]
        ratio = s["tokens"] / same_n["tokens"]
        versus = ""
        if s["alpha"] is not None:
            at = bon_reward_at(bon[s["nice"]], s["tokens"])
            versus = f"{s['reward'] - at:+.4f} ({'above' if s['reward'] > at else 'below'})"
        lines.append(
            f"| {s['strategy']} | {s['n']} | {s['alpha'] if s['alpha'] is not None else '-'} | {s['nice']} "
            f"| {s['tokens']:.0f} | {ratio:.2f} | {s['overshoot']:.0f} "
            f"| {(s['tokens'] - s['overshoot']) / same_n['tokens']:.2f} "
            f"| {s['cpu_s']:.2f} | {s['wall_s']:.2f} "
            f"| {s['reward']:.4f} | {s['right']:.1%} | {versus} |"
        )
    lines += [
        "",
        "'reward vs best-of-N at equal tokens': the winner's mean reward minus best-of-N's curve "
        "(same generator nice) interpolated (linearly in tokens; flat beyond its ends) at the same "
        "mean tokens. 'overshoot': tokens per question generated after a candidate reached the "
        "checkpoint that rejected it, before its cancel took effect (see the module docstring).",
    ]
    text = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)
    plot(summary, args.out.with_suffix(".png"))


def bon_reward_at(bon: list[dict[str, Any]], tokens: float) -> float:
    xs = [s["tokens"] for s in bon]
    ys = [s["reward"] for s in bon]
    if tokens <= xs[0]:
        return float(ys[0])
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if tokens <= x1:
            return float(y0 + (y1 - y0) * (tokens - x0) / (x1 - x0))
    return float(ys[-1])


def plot(summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines: dict[str, list[dict[str, Any]]] = {}
    for s in summary.values():
        label = "best_of_n" if s["alpha"] is None else f"speculative_rejection alpha={s['alpha']}"
        label += f" (generator nice {s['nice']})" if s["nice"] else ""
        lines.setdefault(label, []).append(s)
    for label, points in sorted(lines.items()):
        points.sort(key=lambda s: s["tokens"])
        ax.plot([p["tokens"] for p in points], [p["reward"] for p in points], marker="o", label=label)
        for p in points:
            ax.annotate(f"N={p['n']}", (p["tokens"], p["reward"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("generator tokens per question (mean)")
    ax.set_ylabel("winner's final reward (mean raw logit)")
    ax.set_title("Reward vs generator tokens: GSM8K, SmolLM2-135M on llama.cpp")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
