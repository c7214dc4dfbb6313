"""Reward-worker memory over many varied requests (issue 13, finding 11).

A WorkerPool (the gateway's own, in this process) spawns one worker process per
reward model of the tests' tiny checkpoints (Llama and Qwen2 sequence classifiers,
prefix cache on, --prefix-cache-mib each; a Qwen3 one with prefix_cache_bytes = 0) and gets --requests
requests, --concurrency at a time, drawn at random (seeded):

- model: one of the three;
- prompt: 5 to --max-prompt-words words; "reuse on" requests take one of 24 fixed
  prompts (the prefix cache finds them), "reuse off" ones a fresh prompt each;
- candidates: 1 to 8 answers of 1 to --max-answer-words words;
- a third of them as a scoring group (open_group: the prompt kept on the worker,
  each candidate scored as a partial then whole, close), the rest plain `score`.

Every --sample-every requests it reads each worker's VmRSS from /proc. Warm-up is
the first --warmup fraction of the run; the figure is the largest RSS after warm-up
against the RSS at its end (+15 % is the target), per worker.

    python bench/worker_rss.py                 # 10,000 requests
    python bench/worker_rss.py --quick         # 1,500 requests, to try a change
    python bench/worker_rss.py --worker-env MALLOC_ARENA_MAX=2   # workers' environment

Writes bench/results/worker_rss{,-TAG}.{md,json,png} (--tag names a variant).

Figures (2026-12-03, shared 2-core machine, 10,000 requests, 64 MiB caches; growth after
the 1,000-request warm-up, llama / qwen2 / qwen3-nocache):
- before (a1850d1: oneDNN's and ideep's per-shape caches at 1,024 entries): ~1 MiB per
  request per worker, +106 / +106 / +91 % within 600 requests, still climbing;
- those caches bounded to 16 (the worker's default now): +11.3 / +16.9 / +2.1 %, levelled
  off at 786 / 789 / 594 MiB;
- plus MALLOC_ARENA_MAX=2 (the pool's default for spawned workers now): +12.7 / +11.8 /
  +1.4 %, levelled off at 691 / 703 / 518 MiB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from soak import rss_mib  # noqa: E402

from bon_gateway.config import GatewayConfig  # noqa: E402
from bon_gateway.metrics import Metrics  # noqa: E402
from bon_gateway.scoring.pool import WorkerPool  # noqa: E402
from bon_gateway.types import Deadline, Message  # noqa: E402

RESULTS = REPO / "bench" / "results"
WORDS = (
    "the of and to in is that for it as with was on be by at this had not are but from or have an they "
    "which one you were all her she there would their we him been has when who will more no if out so "
    "said what up its about into than them can only other new some could time these two may then do "
    "first any my now such like our over man me even most made after also did many before must through "
    "391 17 23 340 51 step total answer therefore because add multiply divide equals"
).split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def config(cache_mib: int) -> GatewayConfig:
    from tests.fixtures import checkpoints

    cache = cache_mib << 20
    entries: list[dict[str, Any]] = [
        {"name": "llama", "path": str(checkpoints.tiny_llama_rm()), "prefix_cache_bytes": cache},
        {"name": "qwen2", "path": str(checkpoints.tiny_qwen2_rm()), "prefix_cache_bytes": cache},
        {"name": "qwen3-nocache", "path": str(checkpoints.tiny_qwen3_rm()), "prefix_cache_bytes": 0},
    ]
    return GatewayConfig.model_validate(
        {
            "server": {"log_level": "WARNING", "limits": {"max_queued_groups": 100_000}},
            "generator": {"url": "http://127.0.0.1:9", "model": "none"},
            "reward_models": entries,
        }
    )


async def one_request(
    pool: WorkerPool, rng: random.Random, prompts: list[str], args: argparse.Namespace
) -> None:
    model = rng.choice(["llama", "qwen2", "qwen3-nocache"])
    reuse = rng.random() < 0.5
    prompt = rng.choice(prompts) if reuse else text(rng, rng.randint(5, args.max_prompt_words))
    messages = (Message("system", "You are a careful tutor."), Message("user", prompt))
    answers = [text(rng, rng.randint(1, args.max_answer_words)) for _ in range(rng.randint(1, 8))]
    deadline = Deadline.after(300)
    if rng.random() < 1 / 3:
        group = pool.open_group(model, messages, deadline=deadline)
        try:
            await group.opened()
            await group.score([a[: len(a) // 2] for a in answers], deadline=deadline)  # partials
            await group.score(answers, deadline=deadline)
        finally:
            await group.close()
    else:
        await pool.score(model, messages, answers, deadline=deadline)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    for pair in args.worker_env:  # the pool's workers inherit this process's environment
        key, _, value = pair.partition("=")
        os.environ[key] = value
    rng = random.Random(args.seed)
    prompts = [text(rng, rng.randint(5, args.max_prompt_words)) for _ in range(24)]
    pool = WorkerPool(config(args.prefix_cache_mib), Metrics(), start_timeout_s=300)
    await pool.start()
    samples: list[dict[str, Any]] = []
    try:
        pids = {name: pool.workers(name)[0].proc.pid for name in ("llama", "qwen2", "qwen3-nocache")}  # type: ignore[union-attr]

        def sample(done: int) -> None:
            row = {"done": done, "t": round(time.monotonic() - started, 1)}
            row.update({name: round(rss_mib(pid), 1) for name, pid in pids.items()})
            # what the worker's prefix cache holds (its last reply's figure): bounded by its budget
            row.update(
                {f"{name}_cache": round(pool.workers(name)[0].cache_bytes / 2**20, 1) for name in pids}
            )
            samples.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)

        started = time.monotonic()
        sample(0)
        done = 0
        next_sample = args.sample_every
        queue = iter(range(args.requests))
        failures = 0

        async def client() -> None:
            nonlocal done, next_sample, failures
            for _ in queue:
                try:
                    await one_request(pool, rng, prompts, args)
                except Exception as err:  # counted: the figure is memory, but failures must be seen
                    failures += 1
                    print(f"request failed: {type(err).__name__}: {err}", flush=True)
                done += 1
                if done >= next_sample:
                    next_sample += args.sample_every
                    sample(done)

        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        if samples[-1]["done"] != done:
            sample(done)
        seconds = time.monotonic() - started
    finally:
        await pool.aclose()
    warm = int(args.requests * args.warmup)
    figures: dict[str, Any] = {}
    for name in pids:
        after = [s[name] for s in samples if s["done"] >= warm]
        at_warm = after[0]
        figures[name] = {
            "start_mib": samples[0][name],
            "warm_mib": at_warm,
            "max_after_warm_mib": max(after),
            "end_mib": samples[-1][name],
            "cache_end_mib": samples[-1][f"{name}_cache"],
            "growth_after_warm_pct": round(100 * (max(after) - at_warm) / at_warm, 1),
        }
    return {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "warmup_requests": warm,
        "failures": failures,
        "seconds": round(seconds, 1),
        "worker_env": args.worker_env,
        "prefix_cache_mib": args.prefix_cache_mib,
        "workers": figures,
        "samples": samples,
    }


def table(result: dict[str, Any], tag: str) -> str:
    lines = [
        f"# Worker RSS{f' ({tag})' if tag else ''}: {result['requests']:,} varied requests, "
        f"concurrency {result['concurrency']}, {result['seconds']:.0f} s, {result['failures']} failed",
        "",
        f"Worker environment: {' '.join(result['worker_env']) or '(as the gateway)'}; prefix cache "
        f"{result['prefix_cache_mib']} MiB (llama, qwen2). Warm-up: the first "
        f"{result['warmup_requests']:,} requests. Growth = (largest RSS after warm-up - RSS at warm-up) "
        "/ RSS at warm-up; target <= +15 %.",
        "",
        "| worker | start MiB | after warm-up MiB | max after warm-up MiB | end MiB | growth "
        "| prefix cache at end |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, f in result["workers"].items():
        lines.append(
            f"| {name} | {f['start_mib']:.0f} | {f['warm_mib']:.0f} | {f['max_after_warm_mib']:.0f} "
            f"| {f['end_mib']:.0f} | {f['growth_after_warm_pct']:+.1f} % | {f['cache_end_mib']:.0f} MiB |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path, tag: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    done = [s["done"] for s in result["samples"]]
    for name in result["workers"]:
        ax.plot(done, [s[name] for s in result["samples"]], label=name)
    ax.axvline(result["warmup_requests"], color="gray", linestyle=":", label="end of warm-up")
    ax.set_xlabel("requests done")
    ax.set_ylabel("worker RSS (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"reward-worker RSS{f' ({tag})' if tag else ''}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="1,500 requests")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-prompt-words", type=int, default=600)
    parser.add_argument("--max-answer-words", type=int, default=400)
    # The tiny models' keys and values take ~1.3 KB a token: the default 256 MiB budget fills
    # only after ~2,000 of these requests, past the warm-up; 64 MiB fills within it.
    parser.add_argument("--prefix-cache-mib", type=int, default=64)
    parser.add_argument("--sample-every", type=int, default=100)
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the run")
    parser.add_argument("--worker-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tag", default="", help="a name for this variant (output file suffix)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.requests = 1_500
        args.sample_every = min(args.sample_every, 50)
    result = asyncio.run(run(args))
    stem = "worker_rss" + (f"-{args.tag}" if args.tag else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = table(result, args.tag)
    (args.out / f"{stem}.md").write_text(md)
    plot(result, args.out / f"{stem}.png", args.tag)
    print(md)
    print(f"wrote {args.out}/{stem}.{{md,json,png}}")


if __name__ == "__main__":
    main()
