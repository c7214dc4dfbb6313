"""A worker's bounded cache of prompt keys and values, found by token prefix.

What is kept: `KVSpan`s (packed.py), each computed once. An entry is a token
sequence from position 0 whose keys and values are a chain of spans: its
parent's first positions plus the span it added itself. So a group's prompt,
a longer prompt that continues it (the next turn of a conversation), and each
kept candidate of the group (which continues the prompt, and whose later
partial continues it in turn) share the prompt's keys and values instead of
holding copies.

- Lookup: the entry with the longest common token prefix with a sequence, used
  for that many positions (any sequence that starts with a cached prefix reuses
  it, also when the entry is longer: keys and values of the first positions do
  not depend on what follows them). Entries are indexed by a chained hash of
  every whole block of `BLOCK_TOKENS` tokens, and the candidates of the deepest
  block found are compared token by token, so a hash collision can only shorten
  a match.
- Pending entries: an entry is reserved when its stem is queued; a request that
  finds it waits for that stem (or runs in its batch) instead of computing it
  again. A stem whose batch fails or is dropped takes its entry with it.
- Budget: every entry's bytes (pinned ones too) count against `budget_bytes`.
  Room is made by evicting the least recently used entries that nothing pins,
  no other entry continues, and no batch is computing; when that is not enough,
  nothing is cached (the work runs uncached, never fails).
- Pins: an open group pins its prompt (and its kept candidates) until it closes
  or expires; unpinned, they stay as ordinary LRU entries.

Single-threaded: only the worker's event loop calls it. Span states change in the
batch thread (pending -> ready), which the cache reads when it next looks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from bon_gateway.scoring.worker.packed import (
    FAILED,
    PENDING,
    READY,
    Context,
    KVSpan,
    context_length,
    truncate_context,
)

__all__ = ["BLOCK_TOKENS", "CacheEntry", "Match", "PrefixCache", "common_length"]

#: tokens per index block: a shorter prefix is never cached or matched
BLOCK_TOKENS = 16
#: how many of the deepest block's entries a lookup compares token by token
_COMPARED = 32


def common_length(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    """Length of the common prefix of `a` and `b`, at most `limit` (slices compare in C)."""
    hi = min(len(a), len(b), limit)
    if hi <= 0:
        return 0
    if a[:hi] == b[:hi]:
        return hi
    lo = 0  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _block_keys(ids: Sequence[int], upto: int) -> list[int]:
    """Chained hashes of ids[:k * BLOCK_TOKENS] for every whole block within `upto` tokens."""
    keys: list[int] = []
    h = 0
    for k in range(BLOCK_TOKENS, upto + 1, BLOCK_TOKENS):
        h = hash((h, tuple(ids[k - BLOCK_TOKENS : k])))
        keys.append(h)
    return keys


@dataclass(eq=False)
class CacheEntry:
    ids: list[int]
    parts: Context  # keys and values of every position of `ids`; the last part is `span`
    span: KVSpan  # what this entry added itself (its bytes)
    parent: CacheEntry | None
    nbytes: int
    children: int = 0
    pins: int = 0
    keys: list[int] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.span.state == READY


@dataclass(frozen=True, slots=True)
class Match:
    """An entry sharing `length` leading tokens with the sequence looked up."""

    entry: CacheEntry
    length: int

    @property
    def context(self) -> Context:
        return truncate_context(self.entry.parts, self.length)


class PrefixCache:
    def __init__(self, budget_bytes: int, bytes_per_token: int) -> None:
        self.budget_bytes = budget_bytes
        self.bytes_per_token = max(1, bytes_per_token)  # estimate for pending spans
        self.used_bytes = 0
        self._lru: OrderedDict[int, CacheEntry] = OrderedDict()  # least recently used first
        self._index: dict[int, list[CacheEntry]] = {}
        self._owner: dict[int, CacheEntry] = {}  # id(span) -> the entry that added it
        self._pending: list[CacheEntry] = []

    # -- figures -----------------------------------------------------------------------------
    @property
    def entries(self) -> int:
        return len(self._lru)

    @property
    def pinned_bytes(self) -> int:
        return sum(e.nbytes for e in self._lru.values() if e.pins)

    # -- lookup ------------------------------------------------------------------------------
    def match(self, ids: Sequence[int], limit: int) -> Match | None:
        """The entry sharing the longest prefix with `ids` (at most `limit` tokens), or None
        when none shares a whole block. Pending entries match too (their stem is queued)."""
        self._settle()
        found: list[CacheEntry] = []
        for key in _block_keys(ids, min(len(ids), limit)):
            level = self._index.get(key)
            if not level:
                break
            found = level
        best: Match | None = None
        for entry in found[-_COMPARED:]:
            if entry.span.state == FAILED:
                continue
            n = common_length(entry.ids, ids, limit)
            if n >= BLOCK_TOKENS and (best is None or n > best.length):
                best = Match(entry, n)
        if best is not None:
            self._touch(best.entry)
        return best

    # -- adding ------------------------------------------------------------------------------
    def reserve(self, ids: Sequence[int], base: Match | None, *, pin: bool = False) -> CacheEntry | None:
        """A pending entry for `ids`, continuing `base` (its first base.length tokens): the
        caller computes ids[base.length:] into its span. None when there is no room."""
        start = base.length if base is not None else 0
        if len(ids) - start <= 0:
            return None
        context = base.context if base is not None else ()
        return self._add(list(ids), context, KVSpan.pending(), (len(ids) - start) * self.bytes_per_token, pin)

    def insert(
        self, ids: Sequence[int], context: Context, span: KVSpan, *, pin: bool = False
    ) -> CacheEntry | None:
        """An entry for `ids` = `context` + `span` (computed: a kept candidate). None when there
        is no room or the context is not all cached (a span no entry holds cannot be accounted)."""
        if span.state != READY or span.length != len(ids) - context_length(context):
            return None
        return self._add(list(ids), context, span, span.nbytes, pin)

    def _add(
        self, ids: list[int], context: Context, span: KVSpan, nbytes: int, pin: bool
    ) -> CacheEntry | None:
        self._settle()
        if len(ids) < BLOCK_TOKENS or self.budget_bytes <= 0:
            return None
        parent = self._owner.get(id(context[-1][0])) if context else None
        if context and (parent is None or parent.span.state == FAILED):
            return None
        if not self._make_room(nbytes):
            return None
        length = len(ids) - context_length(context)
        entry = CacheEntry(ids, (*context, (span, length)), span, parent, nbytes)
        entry.keys = _block_keys(ids, len(ids))
        for key in entry.keys:
            self._index.setdefault(key, []).append(entry)
        self._owner[id(span)] = entry
        self._lru[id(entry)] = entry
        if parent is not None:
            parent.children += 1
        if pin:
            entry.pins += 1
        if span.state == PENDING:
            self._pending.append(entry)
        self.used_bytes += nbytes
        self._touch(entry)
        return entry

    # -- pins and removal --------------------------------------------------------------------
    def pin(self, entry: CacheEntry) -> None:
        entry.pins += 1
        self._touch(entry)

    def unpin(self, entry: CacheEntry) -> None:
        entry.pins = max(0, entry.pins - 1)

    def discard(self, entry: CacheEntry) -> None:
        """Remove an entry (its stem failed), with every entry that continues it."""
        if id(entry) not in self._lru:
            return
        for child in [e for e in self._lru.values() if e.parent is entry]:
            self.discard(child)
        self._remove(entry)

    def clear(self) -> None:
        for entry in list(self._lru.values()):
            self.discard(entry)

    # -- internals ---------------------------------------------------------------------------
    def _touch(self, entry: CacheEntry | None) -> None:
        # The entry, then its ancestors: a parent always counts as used after the entries
        # that continue it (it cannot be evicted before them anyway).
        while entry is not None and id(entry) in self._lru:
            self._lru.move_to_end(id(entry))
            entry = entry.parent

    def _make_room(self, nbytes: int) -> bool:
        """Evict least recently used entries until `nbytes` more fit; evicts nothing when
        that is impossible (pinned, continued or pending entries stay)."""
        excess = self.used_bytes + nbytes - self.budget_bytes
        if excess <= 0:
            return True
        if nbytes > self.budget_bytes:
            return False
        victims: list[CacheEntry] = []
        chosen: set[int] = set()
        gone_children: dict[int, int] = {}  # entries whose children are chosen: parents may follow
        freed = 0
        progress = True
        while freed < excess and progress:
            progress = False
            for entry in self._lru.values():  # least recently used first
                if id(entry) in chosen or entry.pins or not entry.ready:
                    continue
                if entry.children - gone_children.get(id(entry), 0) > 0:
                    continue
                victims.append(entry)
                chosen.add(id(entry))
                freed += entry.nbytes
                if entry.parent is not None:
                    gone_children[id(entry.parent)] = gone_children.get(id(entry.parent), 0) + 1
                progress = True
                if freed >= excess:
                    break
        if freed < excess:
            return False
        for entry in victims:
            self._remove(entry)
        return True

    def _remove(self, entry: CacheEntry) -> None:
        self._lru.pop(id(entry), None)
        for key in entry.keys:
            level = self._index.get(key)
            if level is not None:
                level[:] = [e for e in level if e is not entry]
                if not level:
                    del self._index[key]
        self._owner.pop(id(entry.span), None)
        if entry in self._pending:
            self._pending.remove(entry)
        if entry.parent is not None:
            entry.parent.children -= 1
        self.used_bytes -= entry.nbytes

    def _settle(self) -> None:
        """Account pending entries whose span a batch has filled (or failed) since."""
        for entry in list(self._pending):
            if entry.span.state == READY:
                self._pending.remove(entry)
                actual = entry.span.nbytes
                self.used_bytes += actual - entry.nbytes
                entry.nbytes = actual
            elif entry.span.state == FAILED:
                self.discard(entry)
