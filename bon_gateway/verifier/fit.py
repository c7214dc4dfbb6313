"""Fit the verifier's head: L2-regularised logistic regression, no intercept, deterministic.

The head is `LlamaForSequenceClassification.score`, a Linear without bias, so the fitted
model is exactly what is served: P(correct) = sigmoid(w . h), h the final-norm hidden
state at the pooled token. No intercept is needed in practice: that token is always the
"\\n" after `<|im_end|>`, whose hidden state has large components shared by every
solution, and a weight on them acts as the bias (the script's cross-validation reports
the with-intercept fit next to it, to show what is lost).

Features are divided by their per-dimension standard deviation over the training rows
(not centred: centring would need a bias) so one L2 strength fits every dimension; the
scale is folded back into the served weight. Full-batch L-BFGS in float64 from zeros,
on one thread: the same features give the same head, bit for bit.
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
    intercept: bool = False,
    max_iter: int = 1000,
) -> FittedHead:
    """Minimise mean log loss + l2/2 * |w|^2 (w in the scaled space; the bias is not penalised)."""
    scale = feature_scale(features)
    with _one_thread():
        x = torch.from_numpy(features.astype(np.float64) / scale)
        y = torch.from_numpy(labels.astype(np.float64))
        params = torch.zeros(x.shape[1] + (1 if intercept else 0), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [params],
            lr=1.0,
            max_iter=max_iter,
            tolerance_grad=1e-10,
            tolerance_change=1e-14,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            w = params[: x.shape[1]]
            z = x @ w + (params[-1] if intercept else 0.0)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z, y) + 0.5 * l2 * (w @ w)
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        optimizer.step(closure)  # type: ignore[no-untyped-call]
        found = params.detach().numpy().copy()
    weight = found[: x.shape[1]] / scale
    return FittedHead(weight=weight, bias=float(found[-1]) if intercept else 0.0, l2=l2)


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
