"""The prefix cache's bookkeeping: longest-prefix lookup, chains without copies, LRU under a
byte budget, pins, pending entries (no model: spans of made-up tensors)."""

from __future__ import annotations

import torch

from bon_gateway.scoring.worker.packed import FAILED, KVSpan, context_length
from bon_gateway.scoring.worker.prefix_cache import BLOCK_TOKENS, PrefixCache, common_length

# A made-up span: one layer, one head of width 2; 24 bytes per position (hidden + keys + values).
PER_TOKEN = 24


def span(n: int) -> KVSpan:
    return KVSpan(torch.zeros(n, 2), [torch.zeros(1, 1, n, 2)], [torch.zeros(1, 1, n, 2)])


def ids(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def add(cache: PrefixCache, seq: list[int], base_len: int = 0, *, pin: bool = False):  # type: ignore[no-untyped-def]
    """Cache `seq` continuing its cached first `base_len` tokens (as a kept candidate)."""
    context = ()
    if base_len:
        m = cache.match(seq, base_len)
        assert m is not None and m.length == base_len
        context = m.context
    entry = cache.insert(seq, context, span(len(seq) - base_len), pin=pin)
    return entry


def test_common_length() -> None:
    a = list(range(100))
    assert common_length(a, a, 1000) == 100
    assert common_length(a, a, 37) == 37
    for cut in (0, 1, 15, 16, 63, 99):
        b = [*a[:cut], -1, *a[cut + 1 :]]
        assert common_length(a, b, 1000) == cut
    assert common_length(a, a[:10], 1000) == 10
    assert common_length([], a, 10) == 0


def test_longest_prefix_is_found_and_used_in_part() -> None:
    cache = PrefixCache(1 << 20, PER_TOKEN)
    prompt = ids(40)
    add(cache, prompt)
    longer = add(cache, prompt + ids(30, 5000), base_len=40)
    assert longer is not None
    # Starts like `longer` for 55 tokens, then differs: its first 55 positions are reused.
    query = prompt + ids(15, 5000) + [7, 8, 9]
    m = cache.match(query, len(query) - 1)
    assert m is not None and m.entry is longer and m.length == 55
    assert context_length(m.context) == 55
    # The longer entry continues the prompt's span: the same tensors, no copy.
    assert m.context[0][0] is cache.match(prompt, 40).entry.span  # type: ignore[union-attr]
    assert [n for _, n in m.context] == [40, 15]
    # Limits are honoured (a row keeps at least one own token), and a match is a whole block at least.
    assert cache.match(prompt, 39).length == 39  # type: ignore[union-attr]
    assert cache.match([*ids(BLOCK_TOKENS - 1), 1, 2, 3], 100) is None
    assert cache.match(ids(40, 9000), 100) is None


def test_lru_eviction_within_the_budget() -> None:
    cache = PrefixCache(3 * 40 * PER_TOKEN, PER_TOKEN)
    seqs = [ids(40, 1000 * (k + 1)) for k in range(4)]
    for s in seqs[:3]:
        assert add(cache, s) is not None
    assert cache.used_bytes == 3 * 40 * PER_TOKEN
    assert cache.match(seqs[0], 40) is not None  # used: now the most recent
    assert add(cache, seqs[3]) is not None
    assert cache.entries == 3 and cache.used_bytes <= cache.budget_bytes
    assert cache.match(seqs[1], 40) is None  # the least recently used went
    assert all(cache.match(s, 40) is not None for s in (seqs[0], seqs[2], seqs[3]))


def test_pins_and_parents_stay_and_a_full_cache_refuses() -> None:
    cache = PrefixCache(2 * 40 * PER_TOKEN, PER_TOKEN)
    pinned = add(cache, ids(40, 1000), pin=True)
    parent = add(cache, ids(20, 2000))
    child = add(cache, ids(20, 2000) + ids(20, 3000), base_len=20)
    assert pinned is not None and parent is not None and child is not None
    assert child.parent is parent and parent.children == 1
    # Room for one more 20-token entry: the child goes (a leaf), never its parent first.
    assert add(cache, ids(20, 4000)) is not None
    assert cache.match(ids(20, 2000) + ids(20, 3000), 40).length == 20  # type: ignore[union-attr]
    assert parent.children == 0
    # Everything left is pinned or needed: a 60-token entry cannot fit; nothing fails.
    cache.pin(parent)
    assert add(cache, ids(60, 5000)) is None
    assert cache.pinned_bytes >= 60 * PER_TOKEN
    cache.unpin(pinned)
    assert add(cache, ids(40, 6000)) is not None  # the unpinned prompt made room
    assert cache.match(ids(40, 1000), 40) is None


def test_pending_entries_match_settle_and_fail() -> None:
    cache = PrefixCache(1 << 20, PER_TOKEN)
    prompt = ids(48)
    entry = cache.reserve(prompt, None)
    assert entry is not None and not entry.ready
    assert cache.used_bytes == 48 * PER_TOKEN  # the estimate, until it is computed
    # A request arriving now finds the pending prompt (and would wait for it).
    m = cache.match([*prompt, 1, 2], 49)
    assert m is not None and m.entry is entry and m.length == 48
    # Continuing a pending entry is allowed (that stem runs in a later batch).
    longer = cache.reserve(prompt + ids(20, 7000), m)
    assert longer is not None and longer.parent is entry
    entry.span.fill(KVSpan(torch.zeros(48, 4), [torch.zeros(1, 1, 48, 2)], [torch.zeros(1, 1, 48, 2)]))
    cache.match(prompt, 48)  # settles
    assert entry.nbytes == 48 * 32
    # The longer stem failed: it goes, with nothing else.
    longer.span.state = FAILED
    assert cache.match(prompt + ids(20, 7000), 68).entry is entry  # type: ignore[union-attr]
    assert cache.entries == 1 and entry.children == 0
    assert cache.used_bytes == 48 * 32


def test_zero_budget_caches_nothing() -> None:
    cache = PrefixCache(0, PER_TOKEN)
    assert add(cache, ids(40)) is None
    assert cache.reserve(ids(40), None) is None
    assert cache.entries == 0 and cache.used_bytes == 0
