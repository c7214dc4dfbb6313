"""Fit the verifier's head: L2-regularised logistic regression (plus an optional within-problem
pairwise term), no intercept, deterministic.

The head is `LlamaForSequenceClassification.score`, a Linear without bias, so the fitted
model is exactly what is served: P(correct) = sigmoid(w . h), h the final-norm hidden
state at the pooled token. No intercept is needed in practice: that token is always the
"\\n" after `<|im_end|>`, whose hidden state has large components shared by every
solution, and a weight on them acts as the bias (the script's cross-validation reports
the with-intercept fit next to it, to show what is lost).

Features are divided by their per-dimension standard deviation over the training rows
(not centred: centring would need a bias) so one L2 strength fits every dimension; the
scale is folded back into the served weight. Newton's method in float64 from zeros, on
one thread: the same features give the same head, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

Array = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class FittedHead:
    weight: Array  # [hidden]: score.weight[0], applied to the raw hidden state
    bias: float  # 0.0 unless fitted with an intercept (not servable as score.weight)
    l2: float
    pairwise: float = 0.0

    def logits(self, features: npt.NDArray[np.floating]) -> Array:
        result: Array = features.astype(np.float64) @ self.weight + self.bias
        return result


@contextmanager
def _one_thread() -> Iterator[None]:
    # float64 reductions split over threads can round differently from run to run.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def feature_scale(features: npt.NDArray[np.floating]) -> Array:
    std = features.astype(np.float64).std(axis=0)
    floor = 1e-6 * float(std.max()) if std.size else 1.0
    result: Array = np.maximum(std, floor)
    return result


def fit_logistic(
    features: npt.NDArray[np.floating],
    labels: npt.NDArray[np.bool_],
    *,
    l2: float,
    pairwise: float = 0.0,
    groups: npt.NDArray[np.int64] | None = None,
    intercept: bool = False,
    max_steps: int = 100,
) -> FittedHead:
    """Minimise mean log loss + pairwise * mean pair loss + l2/2 * |w|^2.

    The pair loss is log(1 + exp(-(z_c - z_i))) over every (correct c, incorrect i) pair of
    solutions in one group (problem): a Bradley-Terry term that only sees differences
    within a problem, which is what reranking uses; the pointwise term keeps sigmoid(z)
    a probability of being correct. w lives in the scaled space; a bias is not penalised.

    Newton's method with a backtracking line search: the objective is smooth and strictly
    convex, so it converges in a few dozen steps to the unique minimum, to float64 precision."""
    scale = feature_scale(features)
    with _one_thread():
        x = torch.from_numpy(features.astype(np.float64) / scale)
        if intercept:
            x = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
        y = torch.from_numpy(labels.astype(np.float64))
        n, d = x.shape
        penalty = torch.full((d,), float(l2), dtype=torch.float64)
        if intercept:
            penalty[-1] = 0.0
        pairs = _pair_differences(x, labels, groups) if pairwise > 0 else x[:0]

        def objective(w: torch.Tensor) -> torch.Tensor:
            z = x @ w
            loss = torch.nn.functional.softplus(z).mean() - (y * z).mean() + 0.5 * (penalty * w * w).sum()
            if len(pairs):
                loss = loss + pairwise * torch.nn.functional.softplus(-(pairs @ w)).mean()
            return loss

        w = torch.zeros(d, dtype=torch.float64)
        loss = objective(w)
        for _ in range(max_steps):
            p = torch.sigmoid(x @ w)
            gradient = x.T @ (p - y) / n + penalty * w
            hessian = (x.T * (p * (1 - p))) @ x / n + torch.diag(penalty)
            if len(pairs):
                q = torch.sigmoid(pairs @ w)
                gradient = gradient - pairwise * pairs.T @ (1 - q) / len(pairs)
                hessian = hessian + pairwise * (pairs.T * (q * (1 - q))) @ pairs / len(pairs)
            step = torch.linalg.solve(hessian, gradient)
            size = 1.0
            while True:
                candidate = w - size * step
                candidate_loss = objective(candidate)
                if candidate_loss <= loss or size < 1e-8:
                    break
                size /= 2
            converged = float((size * step).abs().max()) < 1e-12 or float(loss - candidate_loss) < 1e-15
            w, loss = candidate, candidate_loss
            if converged:
                break
        found = w.numpy().copy()
    weight = found[: len(scale)] / scale
    return FittedHead(weight=weight, bias=float(found[-1]) if intercept else 0.0, l2=l2, pairwise=pairwise)


def _pair_differences(
    x: torch.Tensor, labels: npt.NDArray[np.bool_], groups: npt.NDArray[np.int64] | None
) -> torch.Tensor:
    if groups is None:
        raise ValueError("pairwise > 0 needs the groups (problem of each row)")
    pairs: list[tuple[int, int]] = []
    for group in np.unique(groups).tolist():
        rows = np.flatnonzero(groups == group)
        pairs += [(c, i) for c in rows[labels[rows]].tolist() for i in rows[~labels[rows]].tolist()]
    if not pairs:
        return x[:0]
    index = torch.tensor(pairs)
    return x[index[:, 0]] - x[index[:, 1]]


def grouped_folds(groups: npt.NDArray[np.int64], folds: int, seed: int) -> npt.NDArray[np.int64]:
    """Fold number of every row; all rows of one group (problem) in the same fold."""
    unique = np.unique(groups)
    order = np.random.default_rng(seed).permutation(len(unique))
    fold_of_group = dict(zip(unique[order].tolist(), (np.arange(len(unique)) % folds).tolist(), strict=True))
    return np.array([fold_of_group[g] for g in groups.tolist()], dtype=np.int64)


def log_loss(logits: Array, labels: npt.NDArray[np.bool_]) -> float:
    y = labels.astype(np.float64)
    # log(1 + exp(-|z|)) + max(z, 0) - y z, stable for large |z|
    return float(np.mean(np.logaddexp(0.0, logits) - y * logits))


def roc_auc(scores: npt.NDArray[np.floating], labels: npt.NDArray[np.bool_]) -> float:
    """Probability that a random correct solution outscores a random incorrect one (ties 1/2)."""
    positives = int(labels.sum())
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def average_ranks(values: Array) -> Array:
    """1-based ranks, ties sharing their average rank (scipy's rankdata 'average')."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks
