"""What a batch is made of: groups of candidate rows, and stems (prefixes to compute and keep).

A group is one request's candidates (or the part of them that shares one
context). Its rows may continue a *context*: keys and values computed before,
by an earlier batch (the worker's prefix cache: a shared prompt, a candidate's
earlier partial) or by a stem of this batch. A stem group has no rows: it
computes tokens once, continuing its own context, into a `KVSpan` that later
rows attend to (a request's prompt, sent when the request opens a group).

`prefix` keeps its first meaning for groups without a context: the leading
tokens all rows share, computed once in the batch and dropped after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from bon_gateway.scoring.worker.packed import READY, Context, KVSpan, context_length

__all__ = [
    "BatchFigures",
    "ContextLost",
    "Group",
    "GroupResult",
    "Stem",
    "batch_cost",
    "common_prefix",
]


class ContextLost(RuntimeError):
    """A group's context will never be computed (its stem's batch failed or was dropped):
    the request plans it again."""


@dataclass(slots=True)
class Stem:
    """Tokens to run once, continuing `context`, into `span` (pending until its batch ran)."""

    ids: list[int]
    context: Context = ()
    span: KVSpan = field(default_factory=KVSpan.pending)


@dataclass(slots=True)
class Group:
    """One request's candidates, tokenized (or, with `stem`, a prefix to compute and keep)."""

    seqs: list[list[int]]
    positions: list[list[int]]  # per candidate: where to read hidden states
    # Leading tokens shared by all seqs that no row computes itself: the first
    # context_tokens come from `context`, the rest are computed once in the batch
    # (0: full recompute).
    prefix: int = 0
    context: Context = ()
    keep: bool = False  # return each row's own keys and values (for the prefix cache)
    stem: Stem | None = None

    def __post_init__(self) -> None:
        self.prefix = max(self.prefix, self.context_tokens)

    @property
    def context_tokens(self) -> int:
        return context_length(self.context)

    @property
    def real_tokens(self) -> int:
        stem = len(self.stem.ids) if self.stem is not None else 0
        return sum(len(s) for s in self.seqs) + stem

    @property
    def max_len(self) -> int:
        if self.stem is not None:
            return context_length(self.stem.context) + len(self.stem.ids)
        return max(len(s) for s in self.seqs)

    @property
    def max_suffix(self) -> int:
        if self.stem is not None:
            return len(self.stem.ids)
        return max(len(s) for s in self.seqs) - self.prefix

    @property
    def plain(self) -> bool:
        """No context, stem or kept rows: the group as it was before the prefix cache."""
        return not self.context and self.stem is None and not self.keep

    @property
    def computes_stem(self) -> bool:
        """Whether this group runs a stem in its batch (its own, or its in-batch prefix)."""
        return self.stem is not None or self.prefix > self.context_tokens

    def waiting_on(self) -> list[KVSpan]:
        """Spans this group reads that are not computed yet."""
        context = self.stem.context if self.stem is not None else self.context
        return [span for span, _ in context if span.state != READY]


@dataclass(slots=True)
class GroupResult:
    logits: list[torch.Tensor]  # per row [positions, labels], fp32
    kept: list[KVSpan | None]  # per row, with Group.keep: its own keys and values
    reused_tokens: int  # context tokens its rows did not compute, less the stems it paid for


@dataclass(slots=True)
class BatchFigures:
    rows: int = 0
    batch_tokens: int = 0  # tokens the backbone ran, padding included
    real_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens not recomputed
    computed_tokens: int = 0  # tokens the backbone had to run (stems and rows' own), no padding
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def padded_tokens(self) -> int:
        return self.batch_tokens - self.computed_tokens


def common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """Longest common token prefix, leaving every sequence at least one own token."""
    if len(seqs) < 2:
        return 0
    limit = min(len(s) for s in seqs) - 1
    first = seqs[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in seqs[1:]):
        n += 1
    return n


def batch_cost(groups: Sequence[Group]) -> int:
    """Tokens the backbone runs for these groups in one batch (padding included): the
    stems in one padded call, rows without a prefix in one, rows after one in another."""
    full = [g for g in groups if g.prefix == 0 and g.stem is None]
    after = [g for g in groups if g.prefix > 0 and g.stem is None]
    stems = [g.prefix - g.context_tokens for g in after if g.prefix > g.context_tokens]
    stems += [len(g.stem.ids) for g in groups if g.stem is not None]
    cost = 0
    if full:
        cost += sum(len(g.seqs) for g in full) * max(g.max_len for g in full)
    if stems:
        cost += len(stems) * max(stems)
    if after:
        cost += sum(len(g.seqs) for g in after) * max(g.max_suffix for g in after)
    return cost
