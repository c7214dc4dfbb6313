"""The GSM8K verifier's quality table, on the held-out third, through a live /v1/rewards.

    python bench/gsm8k_verifier.py                       # starts a gateway from config/local.toml
    python bench/gsm8k_verifier.py --url http://127.0.0.1:8080 --model gsm8k-verifier

Problems with line index i % 3 == 0 of example_model_solutions.jsonl (440; the head
was trained on the others). Each problem goes to POST /v1/rewards once, with its four
model-written solutions as candidates and `selection = weighted_vote`: the rewards
(sigmoid, the model entry's activation) are the worker's, and the weighted-vote winner
is the gateway's own (checked against the in-process `vote_locally` with the same
rewards). Best-of-4 is the highest of those rewards (ties: the first candidate).
Correctness is math-verify against the reference answer, as in bench/gsm8k_rewards.py.

Every accuracy has a 95 % bootstrap interval (problems resampled, --bootstrap times,
--seed); the two targets are paired differences over the same resamples. The ROC AUC
is over all held-out solutions (correct vs incorrect). Writes a markdown table and a
PNG (accuracy by method; reward histograms of correct vs incorrect solutions).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
from gsm8k import MODELS, Problem, is_right, load_gsm8k_candidates, vote_locally
from gsm8k_rewards import score_problem, start_gateway

from bon_gateway.engine.answers import extract_answer
from bon_gateway.engine.selection import group_by_answer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


@dataclass(slots=True)
class Scored:
    problem: Problem
    rewards: list[float]
    right: list[bool]  # per solution, math-verify against the reference
    gateway_vote_right: bool
    gateway_matches_local: bool


async def score_all(url: str, model: str, problems: list[Problem], concurrency: int) -> list[Scored]:
    gate = asyncio.Semaphore(concurrency)
    out: list[Scored] = []
    async with httpx.AsyncClient(timeout=600) as client:

        async def one(problem: Problem) -> Scored:
            async with gate:
                body = await score_problem(client, url, model, problem, "weighted_vote")
            rewards = [float(item["reward"]) for item in body["data"]]  # type: ignore[index, union-attr]
            selected = body.get("selected_answer")
            local = vote_locally(problem, "weighted_vote", rewards)
            return Scored(
                problem=problem,
                rewards=rewards,
                right=[is_right(extract_answer(s.text), problem) for s in problem.solutions],
                gateway_vote_right=is_right(selected if isinstance(selected, str) else None, problem),
                gateway_matches_local=local.selected.index == body["selected_index"],
            )

        from tqdm import tqdm

        with tqdm(total=len(problems), unit="problem") as bar:
            for done in asyncio.as_completed([one(p) for p in problems]):
                out.append(await done)
                bar.update(1)
    out.sort(key=lambda s: s.problem.index)
    return out


def per_problem(scored: list[Scored]) -> dict[str, npt.NDArray[np.float64]]:
    """Each method's correctness per problem (a fraction for the expected-value rows)."""
    rows: dict[str, list[float]] = {"random pick (mean single accuracy)": []}
    rows.update({f"{m} (single model)": [] for m in MODELS})
    rows.update(
        {
            "majority vote (ties: first candidate)": [],
            "majority vote (ties split evenly)": [],
            "Best-of-4 by the verifier": [],
            "weighted vote by the verifier": [],
            "oracle (any solution right)": [],
        }
    )
    for s in scored:
        rows["random pick (mean single accuracy)"].append(float(np.mean(s.right)))
        for m, ok in zip(MODELS, s.right, strict=True):
            rows[f"{m} (single model)"].append(float(ok))
        plain = vote_locally(s.problem, "majority_vote")
        rows["majority vote (ties: first candidate)"].append(
            float(is_right(plain.selected_answer, s.problem))
        )
        rows["majority vote (ties split evenly)"].append(_majority_tie_split(s))
        best = int(np.argmax(s.rewards))  # first of equal maxima, as the gateway's argmax
        rows["Best-of-4 by the verifier"].append(float(s.right[best]))
        rows["weighted vote by the verifier"].append(float(s.gateway_vote_right))
        rows["oracle (any solution right)"].append(float(any(s.right)))
    return {name: np.array(values) for name, values in rows.items()}


def _majority_tie_split(s: Scored) -> float:
    """Expected accuracy of a majority vote that breaks ties between answers at random."""
    plain = vote_locally(s.problem, "majority_vote")  # fills every candidate's answer
    groups = group_by_answer(plain.ranked)
    if not groups:
        return float(np.mean(s.right))  # no answer anywhere: a random pick
    top = max(len(g) for g in groups)
    tied = [g for g in groups if len(g) == top]
    return float(np.mean([s.right[g[0].index] for g in tied]))


def bootstrap(
    values: dict[str, npt.NDArray[np.float64]], resamples: int, seed: int
) -> tuple[dict[str, tuple[float, float]], npt.NDArray[np.int64]]:
    n = len(next(iter(values.values())))
    picks = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    intervals = {}
    for name, v in values.items():
        means = v[picks].mean(axis=1)
        intervals[name] = (float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5)))
    return intervals, picks


def roc_auc(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.bool_]) -> float:
    pos, neg = scores[labels], scores[~labels]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def report(scored: list[Scored], model: str, resamples: int, seed: int, seconds: float) -> tuple[str, dict]:  # type: ignore[type-arg]
    values = per_problem(scored)
    intervals, picks = bootstrap(values, resamples, seed)
    n = len(scored)
    rewards = np.array([r for s in scored for r in s.rewards])
    labels = np.array([ok for s in scored for ok in s.right])
    auc = roc_auc(rewards, labels)
    aucs = []
    for row in picks[: min(resamples, 2000)]:  # AUC bootstrap over problems
        r = np.concatenate([scored[i].rewards for i in row])
        y = np.concatenate([scored[i].right for i in row]).astype(bool)
        aucs.append(roc_auc(r, y))
    auc_ci = (float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5)))
    targets = [
        ("Best-of-4 by the verifier", "random pick (mean single accuracy)", 0.05),
        ("weighted vote by the verifier", "majority vote (ties: first candidate)", 0.0),
        ("weighted vote by the verifier", "majority vote (ties split evenly)", 0.0),
    ]
    lines = [
        "# GSM8K verifier: held-out third, through /v1/rewards",
        "",
        f"{n} problems (line index i % 3 == 0), 4 real model solutions each; reward model `{model}` "
        f"(sigmoid rewards); 95 % intervals: bootstrap over problems, {resamples} resamples, seed {seed}.",
        "",
        "| method | accuracy | 95 % CI |",
        "|---|---|---|",
    ]
    for name, v in values.items():
        lo, hi = intervals[name]
        lines.append(f"| {name} | {100 * v.mean():.1f} % | {100 * lo:.1f} - {100 * hi:.1f} |")
    lines += ["", "| target | difference | 95 % CI | met |", "|---|---|---|---|"]
    for a, b, margin in targets:
        diff = values[a] - values[b]
        d = diff[picks].mean(axis=1)
        lo, hi = np.percentile(d, 2.5), np.percentile(d, 97.5)
        met = "yes" if diff.mean() >= margin else "no"
        lines.append(
            f"| {a} - {b} >= {100 * margin:.0f} points | {100 * diff.mean():+.1f} points | "
            f"{100 * lo:+.1f} - {100 * hi:+.1f} | {met} |"
        )
    same = sum(s.gateway_matches_local for s in scored)
    flag_agree = np.mean(
        [ok == sol.is_correct for s in scored for ok, sol in zip(s.right, s.problem.solutions, strict=True)]
    )
    lines += [
        "",
        f"ROC AUC of the verifier's reward, correct vs incorrect solutions: {auc:.3f} "
        f"(95 % CI {auc_ci[0]:.3f} - {auc_ci[1]:.3f}; {int(labels.sum())} correct, "
        f"{int((~labels).sum())} incorrect).",
        "",
        f"Gateway weighted-vote selection equal to the in-process vote with the same rewards: {same}/{n}. "
        f"math-verify correctness agrees with the dataset's is_correct on {100 * flag_agree:.1f} % "
        "of solutions. "
        f"Scoring took {seconds:.0f} s (a shared machine: not a timing).",
        "",
    ]
    figures = {"values": values, "intervals": intervals, "rewards": rewards, "labels": labels, "auc": auc}
    return "\n".join(lines), figures


def plot(figures: dict, path: Path, model: str) -> None:  # type: ignore[type-arg]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values, intervals = figures["values"], figures["intervals"]
    names = list(values)
    means = [100 * values[k].mean() for k in names]
    errs = np.array(
        [[m - 100 * intervals[k][0], 100 * intervals[k][1] - m] for k, m in zip(names, means, strict=True)]
    ).T
    colors = ["tab:orange" if "verifier" in k else "tab:gray" for k in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.35, 1]})
    y = np.arange(len(names))[::-1]
    left.barh(y, means, xerr=errs, color=colors, capsize=3)
    left.set_yticks(y, names, fontsize=8)
    left.set_xlabel("accuracy on the held-out third (%), 95 % bootstrap CI")
    left.set_title(f"GSM8K, {len(values[names[0]])} held-out problems x 4 solutions")
    for yi, m, name in zip(y, means, names, strict=True):  # right of the interval, not on it
        left.text(100 * intervals[name][1] + 1, yi, f"{m:.1f}", va="center", fontsize=8)
    left.set_xlim(0, 100)
    rewards, labels = figures["rewards"], figures["labels"]
    bins = np.linspace(0, 1, 31)
    right.hist(rewards[labels], bins=bins, alpha=0.6, label=f"correct ({labels.sum()})", color="tab:green")
    right.hist(
        rewards[~labels], bins=bins, alpha=0.6, label=f"incorrect ({(~labels).sum()})", color="tab:red"
    )
    right.set_xlabel(f"{model} reward (sigmoid)")
    right.set_ylabel("solutions")
    right.set_title(f"rewards of held-out solutions (ROC AUC {figures['auc']:.3f})")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def local_entry(config: Path, model: str) -> dict[str, object]:
    """The model's entry from the local config; its relative path resolved against the repository."""
    data = tomllib.loads(config.read_text(encoding="utf-8"))
    entry = next(e for e in data["reward_models"] if e["name"] == model)
    path = Path(entry["path"])
    return {**entry, "path": str(path if path.is_absolute() else REPO / path)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running gateway (else one is started from --config)")
    parser.add_argument("--model", default="gsm8k-verifier")
    parser.add_argument("--config", type=Path, default=REPO / "config" / "local.toml")
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N held-out problems only")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--bootstrap", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "gsm8k_verifier.md")
    parser.add_argument("--plot", type=Path, default=RESULTS / "gsm8k_verifier.png")
    args = parser.parse_args()
    problems = [p for p in load_gsm8k_candidates(args.data) if p.index % 3 == 0][: args.limit]
    proc = None
    if args.url:
        url = args.url.rstrip("/")
    else:
        from bon_gateway.verifier.assemble import assemble_verifier

        entry = local_entry(args.config, args.model)
        if args.model == "gsm8k-verifier":
            assemble_verifier(Path(str(entry["path"])))  # a fresh clone: build it on first use
        extra = {k: v for k, v in entry.items() if k not in ("name", "path", "kind", "steps")}
        proc, url = start_gateway(args.model, str(entry["path"]), str(entry.get("kind", "auto")), "\n", extra)
    try:
        started = time.perf_counter()
        scored = asyncio.run(score_all(url, args.model, problems, args.concurrency))
        seconds = time.perf_counter() - started
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    text, figures = report(scored, args.model, args.bootstrap, args.seed, seconds)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    text += f"\nCommand: `{command}`\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    plot(figures, args.plot, args.model)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
