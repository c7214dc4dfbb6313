"""How one request's candidates become batch groups, given the worker's prefix cache.

Pure planning over the cache (no model, no I/O): for each candidate the longest
cached prefix is looked up; a candidate whose own earlier sequence (a previous
partial) covers more than the prompt continues it alone; the others share one
context: the longest cached part of their shared prompt, plus a stem computing
the rest of it once, reserved in the cache (so a request that arrives while it
is computed waits for it instead of computing it again). Without room in the
cache, the shared prompt is computed once in the batch and dropped, as it was
before the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from bon_gateway.scoring.worker.groups import Group, Stem, batch_cost
from bon_gateway.scoring.worker.prefix_cache import BLOCK_TOKENS, CacheEntry, Match, PrefixCache

__all__ = ["Plan", "plan_group", "split_group"]


@dataclass(slots=True)
class Plan:
    # Stems to compute and keep in the cache, each with its (pending) entry: queued first,
    # for whoever needs them (not cancelled with this request).
    prefills: list[tuple[Stem, CacheEntry]] = field(default_factory=list)
    # The row groups and the candidate indices each holds.
    parts: list[tuple[Group, list[int]]] = field(default_factory=list)


def plan_group(
    cache: PrefixCache, group: Group, shared_len: int, *, keep: bool, max_batch_tokens: int
) -> Plan:
    """Groups for `group` (as tokenized, prefix = the candidates' common prefix) whose
    rows continue what the cache holds. `shared_len`: the prompt all candidates share
    (their common prefix; for one candidate, its prompt tokens)."""
    seqs = group.seqs
    plan = Plan()
    matches = [cache.match(s, len(s) - 1) for s in seqs]
    alone = [i for i, m in enumerate(matches) if m is not None and m.length > shared_len]
    shared = [i for i in range(len(seqs)) if i not in set(alone)]
    if shared:
        found = [m for i in shared if (m := matches[i]) is not None]
        best = max(found, key=lambda m: m.length, default=None)
        base = None
        if best is not None and min(best.length, shared_len) >= BLOCK_TOKENS:
            base = Match(best.entry, min(best.length, shared_len))
        context = base.context if base is not None else ()
        start = base.length if base is not None else 0
        prefix = 0
        # A lone candidate computes a short tail of its prompt itself: an entry for a few
        # tokens would cost a stem pass and a chain link for next to nothing.
        if shared_len - start >= (1 if len(shared) > 1 else BLOCK_TOKENS):
            entry = cache.reserve(seqs[shared[0]][:shared_len], base)
            if entry is not None:
                stem = Stem(seqs[shared[0]][start:shared_len], context, entry.span)
                plan.prefills.append((stem, entry))
                context = entry.parts
            elif len(shared) > 1:
                prefix = shared_len  # no room: computed once in the batch, then dropped
        rows = Group(
            seqs=[seqs[i] for i in shared],
            positions=[group.positions[i] for i in shared],
            prefix=prefix,
            context=context,
            keep=keep,
        )
        for part, indices in split_group(rows, max_batch_tokens):
            plan.parts.append((part, [shared[i] for i in indices]))
    for i in alone:
        m = matches[i]
        assert m is not None
        plan.parts.append((Group([seqs[i]], [group.positions[i]], context=m.context, keep=keep), [i]))
    return plan


def split_group(group: Group, max_batch_tokens: int) -> list[tuple[Group, list[int]]]:
    """Parts of a group that each fit the token budget (one row at least), with their indices.

    Candidates are taken in length order so each part pads little; every part keeps the
    group's context (a part of one row has no in-batch prefix to share).
    """
    if batch_cost([group]) <= max_batch_tokens or len(group.seqs) == 1:
        return [(group, list(range(len(group.seqs))))]
    order = sorted(range(len(group.seqs)), key=lambda i: len(group.seqs[i]))
    parts: list[tuple[Group, list[int]]] = []
    current: list[int] = []

    def make(indices: list[int]) -> Group:
        seqs = [group.seqs[i] for i in indices]
        prefix = min(group.prefix, min(len(s) for s in seqs) - 1) if len(seqs) > 1 else 0
        return Group(
            seqs=seqs,
            positions=[group.positions[i] for i in indices],
            prefix=max(prefix, 0),
            context=group.context,
            keep=group.keep,
        )

    for i in order:
        if current and batch_cost([make([*current, i])]) > max_batch_tokens:
            parts.append((make(current), current))
            current = []
        current.append(i)
    parts.append((make(current), current))
    return parts


def shared_prompt_length(seqs: Sequence[Sequence[int]], prefix: int, prompt_tokens: int) -> int:
    """The prompt a request's candidates share: their common prefix, or for a single
    candidate its prompt tokens (leaving it one own token)."""
    if len(seqs) > 1:
        return prefix
    return max(0, min(prompt_tokens, len(seqs[0]) - 1))
