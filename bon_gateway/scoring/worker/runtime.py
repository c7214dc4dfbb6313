"""One loaded reward model inside a worker: tokenize, plan, batch, run, reward.

With a prefix cache (the model entry's `prefix_cache_bytes`, see prefix_cache.py)
each request is planned against it (planning.py): cached prefixes are
continued, new shared prompts are computed once and kept, and with `keep` each
candidate's own sequence is kept too (a later partial of it continues it).
Open groups (OpenGroup) pin their prompt, computed in the background as soon
as the group opens, until they close or expire.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bon_gateway.config import RewardModelConfig
from bon_gateway.logs import log_phase
from bon_gateway.scoring.worker.adapters import Adapter
from bon_gateway.scoring.worker.batching import Batcher
from bon_gateway.scoring.worker.formatting import Encoded, InvalidInput
from bon_gateway.scoring.worker.forward import (
    BatchFigures,
    ContextLost,
    Forward,
    Group,
    Stem,
    common_prefix,
)
from bon_gateway.scoring.worker.packed import KVSpan
from bon_gateway.scoring.worker.planning import Plan, plan_group, shared_prompt_length, split_group
from bon_gateway.scoring.worker.prefix_cache import BLOCK_TOKENS, CacheEntry, PrefixCache, common_length
from bon_gateway.types import Message, RawInput

__all__ = ["BackendServerFigures", "GroupOutcome", "ModelRuntime", "OpenedGroup", "Scored", "split_group"]

#: plans tried per request when a stem it reads is lost; the last one runs without the cache
_PLANS = 3
#: open groups kept per model at most (beyond: the oldest is released, as if it expired)
MAX_OPEN_GROUPS = 10_000
#: seconds an open group lives when its OpenGroup gave no ttl
DEFAULT_GROUP_TTL_S = 300.0

log = logging.getLogger("bon_gateway.worker")


@dataclass(slots=True)
class GroupOutcome:
    logits: list[torch.Tensor]  # per candidate [positions, labels], fp32
    # The batch's figures ride on the first group of each batch only (None on the others),
    # so the gateway observes every batch exactly once.
    figures: BatchFigures | None
    reused_tokens: int
    compute_seconds: float
    kept: list[KVSpan | None] = field(default_factory=list)  # per candidate, with Group.keep


@dataclass(eq=False)
class OpenedGroup:
    """A request's group on this worker: the cache entries it pins until it closes."""

    id: str
    prompt_tokens: int
    entries: list[CacheEntry] = field(default_factory=list)
    open: bool = True
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class BackendServerFigures:
    """One HTTP backend server of a model (backend = "vllm" / "sglang"), for Info."""

    label: str  # host:port
    up: bool  # not ejected
    in_flight: int
    stats: Any  # http_backend.ServerStats (cumulative since this worker started)


@dataclass(slots=True)
class Scored:
    rewards: list[tuple[float, tuple[float, ...]]]
    tokens: list[int]
    prompt_tokens: int
    outcome: GroupOutcome
    queue_seconds: float


class ModelRuntime:
    def __init__(
        self,
        entry: RewardModelConfig,
        adapter: Adapter,
        *,
        prefix_reuse: bool = True,
        max_queue_tokens: int | None = None,
    ) -> None:
        self.entry = entry
        # Bounded queue: beyond this many waiting tokens new groups are refused (RESOURCE_EXHAUSTED)
        # instead of piling up until memory or deadlines run out.
        self.max_queue_tokens = max_queue_tokens or 64 * entry.max_batch_tokens
        self.adapter = adapter
        device = next(adapter.model.parameters()).device
        self.forward = Forward(adapter, device)
        packed = self.forward.packed
        log_phase(
            log,
            "plan",
            model=entry.name,
            batches="packed" if packed else "transformers",
            linears="onednn-fused" if packed and packed.linear.onednn else "torch",
        )
        self.prefix_reuse = prefix_reuse and adapter.supports_prefix_reuse
        config = adapter.config
        dtype = next(adapter.model.parameters()).dtype
        self.cache = (
            PrefixCache(entry.prefix_cache_bytes, kv_bytes_per_token(config, dtype))
            if self.prefix_reuse and entry.prefix_cache_bytes > 0
            else None
        )
        # A sliding window only matters past its length: sequences within it are cached.
        window = getattr(config, "sliding_window", None)
        self.cache_limit: int | None = int(window) - 1 if window else None
        self.groups: OrderedDict[str, OpenedGroup] = OrderedDict()
        self.batcher: Batcher[GroupOutcome] = Batcher(
            self._run_batch, max_batch_tokens=entry.max_batch_tokens, max_wait_ms=entry.max_wait_ms
        )

    @property
    def device(self) -> str:
        return str(self.forward.device)

    def prepare(
        self,
        messages: Sequence[Message],
        candidates: Sequence[str],
        steps: Sequence[Sequence[str]],
        raw: Sequence[RawInput] = (),
        truncate_prompt_tokens: int = 0,
    ) -> tuple[Group, int]:
        """Tokenize a group (chat candidates, or raw inputs given as text or ids);
        InvalidInput / InputTooLong names the candidate and the limit."""
        encoded = (
            [self._encode_raw(r, truncate_prompt_tokens, what=f"input[{i}]") for i, r in enumerate(raw)]
            if raw
            else [
                self.adapter.encode(messages, answer, steps[i] if steps else (), what=f"candidates[{i}]")
                for i, answer in enumerate(candidates)
            ]
        )
        seqs: list[list[int]] = []
        positions: list[list[int]] = []
        prompt_tokens = 0
        for enc in encoded:
            seqs.append(enc.ids)
            positions.append(enc.positions)
            prompt_tokens = max(prompt_tokens, enc.prompt_tokens)
        prefix = common_prefix(seqs) if self.prefix_reuse else 0
        return Group(seqs=seqs, positions=positions, prefix=prefix), prompt_tokens

    def _encode_raw(self, raw: RawInput, truncate_prompt_tokens: int, *, what: str) -> Encoded:
        ids = list(raw.token_ids) if raw.token_ids else self.adapter.tok.raw_ids(raw.text)
        vocab = int(getattr(self.adapter.config, "vocab_size", 0) or 0)
        if vocab and any(not 0 <= t < vocab for t in ids):
            bad = next(t for t in ids if not 0 <= t < vocab)
            raise InvalidInput(
                f"{what}: token id {bad} is outside the vocabulary (0-{vocab - 1})", param=what
            )
        if truncate_prompt_tokens > 0:
            ids = ids[-truncate_prompt_tokens:]  # vLLM keeps the last k tokens
        return self.adapter.encode_raw(ids, what=what)

    def backend_servers(self) -> list[BackendServerFigures]:
        """The HTTP servers that run this model (none: it runs in this process)."""
        return []

    async def aclose_backend(self) -> None:
        pass

    def caching(self) -> bool:
        return self.prefix_reuse and self.cache is not None

    def _cacheable(self, seqs: Sequence[Sequence[int]]) -> bool:
        return self.cache_limit is None or all(len(s) <= self.cache_limit for s in seqs)

    def _run_batch(self, groups: list[Group]) -> list[GroupOutcome]:
        started = time.perf_counter()
        results, figures = self.forward.run_batch(groups)
        seconds = time.perf_counter() - started
        log_phase(
            log,
            "batch",
            logging.DEBUG,
            model=self.entry.name,
            groups=len(groups),
            rows=figures.rows,
            tokens=figures.batch_tokens,
            seconds=seconds,
        )
        # The figures go with the first group that has candidates: stems answer no request.
        reporter = next((i for i, g in enumerate(groups) if g.seqs), None)
        return [
            GroupOutcome(r.logits, figures if i == reporter else None, r.reused_tokens, seconds, r.kept)
            for i, r in enumerate(results)
        ]

    def overloaded(self, group: Group) -> bool:
        queued = self.batcher.queued_tokens
        return queued > 0 and queued + group.real_tokens > self.max_queue_tokens

    # -- planning ----------------------------------------------------------------------------
    def _plan(self, group: Group, prompt_tokens: int, *, keep: bool, cached: bool) -> Plan:
        budget = self.entry.max_batch_tokens
        if not cached or self.cache is None or not self._cacheable(group.seqs):
            plain = Group(seqs=group.seqs, positions=group.positions, prefix=group.prefix)
            return Plan(parts=split_group(plain, budget))
        shared = shared_prompt_length(group.seqs, group.prefix, prompt_tokens)
        if shared == 0 and len(group.seqs) == 1:
            shared = self._unknown_prompt_length(group.seqs[0])
        return plan_group(self.cache, group, shared, keep=keep, max_batch_tokens=budget)

    def _unknown_prompt_length(self, seq: Sequence[int]) -> int:
        """What to share of a lone input with no known prompt (raw ids with no assistant-turn
        header), found by the longest common prefix with what is cached, as vLLM's
        automatic prefix caching finds blocks. When that covers most of it, it is another
        sample of a prompt cached before: it continues it, and its own tail (its answer,
        which no later input shares) is not kept. Otherwise all of it but its last token is
        kept, so the next sample of its prompt continues it (or, arriving while it is
        computed, waits for it)."""
        assert self.cache is not None
        match = self.cache.match(seq, len(seq) - 1)
        matched = match.length if match is not None else 0
        return matched if 2 * matched >= len(seq) else len(seq) - 1

    def _prefill(self, stem: Stem, entry: CacheEntry) -> None:
        """Queue a stem for the cache: it runs whoever asked first goes away (others may read it)."""
        future = self.batcher.enqueue(Group(seqs=[], positions=[], stem=stem))
        cache = self.cache

        def done(f: asyncio.Future[Any]) -> None:
            if f.cancelled() or f.exception() is not None:
                if cache is not None:
                    cache.discard(entry)

        future.add_done_callback(done)

    async def score(
        self,
        group: Group,
        prompt_tokens: int,
        activation: str,
        *,
        keep: bool = False,
        owner: OpenedGroup | None = None,
    ) -> Scored:
        """Score a tokenized group; with `keep`, each candidate's sequence stays in the cache
        (pinned by `owner` while it is open)."""
        for attempt in range(_PLANS):
            cached = self.caching() and attempt < _PLANS - 1
            plan = self._plan(group, prompt_tokens, keep=keep, cached=cached)
            # Queued before anything is awaited: a request planned after this one that reads
            # these stems finds them queued (and runs in their batch, or after it).
            for stem, entry in plan.prefills:
                self._prefill(stem, entry)
            futures = [self.batcher.enqueue(part) for part, _ in plan.parts]
            try:
                done = await asyncio.gather(*futures)
            except ContextLost:
                for f in futures:
                    f.cancel()
                log_phase(log, "replan", logging.DEBUG, model=self.entry.name, attempt=attempt)
                continue
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
            break
        else:  # pragma: no cover - the last plan reads no stem, so it cannot lose one
            raise ContextLost("no plan could score the group")
        by_index: dict[int, torch.Tensor] = {}
        kept: dict[int, KVSpan | None] = {}
        for (_, indices), (outcome, _) in zip(plan.parts, done, strict=True):
            by_index.update(zip(indices, outcome.logits, strict=True))
            if outcome.kept:
                kept.update(zip(indices, outcome.kept, strict=True))
        if keep and cached and self.cache is not None:
            self._keep(group, plan, kept, owner)
        figures = [o.figures for o, _ in done]
        outcome = GroupOutcome(
            [by_index[i] for i in range(len(group.seqs))],
            next((f for f in figures if f is not None), None),
            sum(o.reused_tokens for o, _ in done),
            sum(o.compute_seconds for o, _ in done),
        )
        queued = max(q for _, q in done)
        rewards = [self.adapter.reward(lg, activation) for lg in outcome.logits]
        return Scored(rewards, [len(s) for s in group.seqs], prompt_tokens, outcome, queued)

    def _keep(
        self, group: Group, plan: Plan, kept: dict[int, KVSpan | None], owner: OpenedGroup | None
    ) -> None:
        assert self.cache is not None
        pin = owner is not None and owner.open
        for part, indices in plan.parts:
            for i in indices:
                span = kept.get(i)
                if span is None:
                    continue
                entry = self.cache.insert(group.seqs[i], part.context, span, pin=pin)
                if entry is not None and pin and owner is not None:
                    owner.entries.append(entry)

    # -- groups ------------------------------------------------------------------------------
    async def open_group(self, messages: Sequence[Message], ttl_s: float) -> tuple[OpenedGroup, bool]:
        """Tokenize and check the prompt (InputTooLong names `messages`), pin it in the cache
        and queue its computation; returns the group and whether its prompt is kept."""
        ids, longest = await asyncio.to_thread(self.prompt_ids, messages)
        # A prompt at the limit is cut differently for each candidate: nothing to share.
        return self.open_group_ids(ids, ttl_s, keep=longest < self.adapter.max_length)

    def open_group_ids(self, ids: list[int], ttl_s: float, *, keep: bool = True) -> tuple[OpenedGroup, bool]:
        """A group whose candidates start with `ids` (their prompt, tokenized): pinned in the
        cache, its computation queued (not awaited)."""
        group = OpenedGroup(id=secrets.token_hex(8), prompt_tokens=len(ids))
        kept = False
        cache = self.cache
        if (
            keep
            and self.caching()
            and cache is not None
            and len(ids) >= BLOCK_TOKENS
            and self._cacheable([ids])
        ):
            match = cache.match(ids, len(ids))
            if match is not None and match.length == len(ids):
                cache.pin(match.entry)
                group.entries.append(match.entry)
                kept = True
            else:
                entry = cache.reserve(ids, match, pin=True)
                if entry is not None:
                    start = match.length if match is not None else 0
                    context = match.context if match is not None else ()
                    self._prefill(Stem(ids[start:], context, entry.span), entry)
                    group.entries.append(entry)
                    kept = True
        self.groups[group.id] = group
        ttl = ttl_s if ttl_s > 0 else DEFAULT_GROUP_TTL_S
        group.timer = asyncio.get_running_loop().call_later(ttl, self.close_group, group.id)
        while len(self.groups) > MAX_OPEN_GROUPS:
            self.close_group(next(iter(self.groups)))
        return group, kept

    def prompt_ids(self, messages: Sequence[Message]) -> tuple[list[int], int]:
        """The token ids every candidate's sequence starts with, and the length of the
        shortest candidate's (one-letter) sequence. InputTooLong (naming `messages`) when even
        an empty answer does not fit the model.

        The prompt is what two different one-letter answers share: a template token that
        the answer's first characters could merge with is left out, never guessed.
        """
        self.adapter.encode(messages, "", (), what="messages")
        a = self.adapter.encode(messages, "a", (), what="messages")
        b = self.adapter.encode(messages, "b", (), what="messages")
        n = common_length(a.ids, b.ids, min(len(a.ids), len(b.ids)) - 1)
        return a.ids[:n], len(a.ids)

    def group(self, group_id: str) -> OpenedGroup | None:
        return self.groups.get(group_id) if group_id else None

    def close_group(self, group_id: str) -> bool:
        """Release a group's pins (its entries stay cached, unpinned); False if unknown."""
        group = self.groups.pop(group_id, None)
        if group is None:
            return False
        group.open = False
        if group.timer is not None:
            group.timer.cancel()
        if self.cache is not None:
            for entry in group.entries:
                self.cache.unpin(entry)
        group.entries.clear()
        return True


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes the cache holds per token: every layer's keys and values, and the last hidden state."""
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    hidden = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    elem = torch.empty((), dtype=dtype).element_size()
    return (2 * int(config.num_hidden_layers) * kv_heads * head_dim + hidden) * elem
