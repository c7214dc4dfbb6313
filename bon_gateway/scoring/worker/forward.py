"""Backbone -> hidden states -> gather positions -> head, for a batch of groups.

A group is one request's candidates (groups.py). Rows may continue keys and
values computed once: the group's shared prompt (computed once in the batch),
a stem of this batch, or a prefix kept in the worker's cache (a `KVSpan` chain,
see prefix_cache.py); only the rows' own tokens run after it. Every way gives
the scores of one unpadded sequence (fp32: within ~1e-6) because:

- the attention of a row always covers everything it may see (context + own
  tokens), with pads masked out;
- position ids are given explicitly: rows continue after their context, and
  left-padded prefixes count from their first real token;
- hidden states are read at the positions the adapter names (inside a context
  from the span that holds them), and the head runs in fp32 on them.

A batch runs in two stages: first every stem (keys and values to keep), then
every row. On CPU a batch is not one padded tensor: a big matmul gains nothing
from more rows there, while padding costs its tokens and an explicit attention
mask moves SDPA off its fused causal kernel (measured in
bench/score_throughput.py: the padded batch ran slower than one sequence at a
time). Llama-family backbones run packed instead (packed.py: rows end to end, no
padding, each context attended once for all the rows that share it). Other
backbones, and CUDA, run on transformers (hf_batches.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bon_gateway.scoring.worker.adapters import Adapter
from bon_gateway.scoring.worker.groups import (
    BatchFigures,
    ContextLost,
    Group,
    GroupResult,
    Stem,
    batch_cost,
    common_prefix,
)
from bon_gateway.scoring.worker.hf_batches import (
    SHORT_ROW_TOKENS,
    ContextRow,
    TransformersBatches,
    split_rows,
)
from bon_gateway.scoring.worker.packed import (
    Context,
    KVSpan,
    PackedDecoder,
    context_hidden,
    context_length,
    packing_limit,
)

__all__ = [
    "SHORT_ROW_TOKENS",
    "BatchFigures",
    "ContextLost",
    "Forward",
    "Group",
    "GroupResult",
    "Stem",
    "batch_cost",
    "common_prefix",
    "split_rows",
]


@dataclass(slots=True)
class _Row:
    group: int
    ids: list[int]  # own tokens
    context: Context
    keep: bool


class Forward:
    """Runs batches of groups through one adapter's backbone and head."""

    def __init__(self, adapter: Adapter, device: torch.device) -> None:
        self.adapter = adapter
        self.device = device
        pad = adapter.config.pad_token_id
        # Any id works for padding (masked out); the pad id keeps pooled positions meaningful.
        self.pad_id = int(pad) if pad is not None else 0
        # Rows up to this many tokens pad together; None: one padded batch (see the module docstring).
        self.short_rows: int | None = SHORT_ROW_TOKENS if device.type == "cpu" else None
        # CPU, Llama-family backbones: packed rows, no padding, shared context attention.
        limit = packing_limit(adapter.backbone) if device.type == "cpu" else None
        self.packed = PackedDecoder(adapter.backbone) if limit is not None else None
        self.packing_limit = limit or 0
        self.hf = TransformersBatches(adapter, device, self.pad_id)

    @torch.inference_mode()
    def run(self, groups: Sequence[Group]) -> tuple[list[list[torch.Tensor]], BatchFigures]:
        """Per group, per candidate: fp32 logits [positions, labels]."""
        results, figures = self.run_batch(groups)
        return [r.logits for r in results], figures

    @torch.inference_mode()
    def run_batch(self, groups: Sequence[Group]) -> tuple[list[GroupResult], BatchFigures]:
        """Per group: logits, kept spans and reused tokens; stems' spans are filled in place."""
        figures = BatchFigures(real_tokens=sum(g.real_tokens for g in groups))
        provided = {id(g.stem.span) for g in groups if g.stem is not None}
        for g in groups:
            # batching.py runs a group only after, or in the batch of, the stems it reads (a stem
            # only after those it continues: stems run together, in one stage).
            if any(g.computes_stem or id(span) not in provided for span in g.waiting_on()):
                raise ContextLost("a group's context was not computed before its batch")
        packed = self.packed is not None and all(g.max_len <= self.packing_limit for g in groups)
        plain = [] if packed else [i for i, g in enumerate(groups) if g.plain]
        hidden: dict[int, list[torch.Tensor]] = {}
        kept: dict[int, list[KVSpan | None]] = {}
        reused: dict[int, int] = {}
        if plain:
            for i, per in zip(plain, self._run_plain([groups[i] for i in plain], figures), strict=True):
                hidden[i] = per
                kept[i] = [None] * len(per)
                g = groups[i]
                reused[i] = (len(g.seqs) - 1) * g.prefix if g.prefix > 0 else 0
        rest = [i for i in range(len(groups)) if i not in set(plain)]
        if rest:
            self._run_staged(groups, rest, packed, figures, hidden, kept, reused)
        results: list[GroupResult] = []
        picked = [h for i in range(len(groups)) for h in hidden.get(i, [])]
        logits = self._head(picked)
        k = 0
        for i, g in enumerate(groups):
            per = logits[k : k + len(g.seqs)]
            k += len(g.seqs)
            results.append(GroupResult(per, kept.get(i, [None] * len(g.seqs)), reused.get(i, 0)))
        figures.reused_tokens = sum(r.reused_tokens for r in results)
        return results, figures

    def _head(self, picked: list[torch.Tensor]) -> list[torch.Tensor]:
        if not picked:
            return []
        logits = self.adapter.head(torch.cat(picked).float())
        out: list[torch.Tensor] = []
        k = 0
        for p in picked:
            out.append(logits[k : k + p.shape[0]])
            k += p.shape[0]
        return out

    def _run_plain(self, groups: list[Group], figures: BatchFigures) -> list[list[torch.Tensor]]:
        """Groups without contexts, on transformers, as before the prefix cache."""
        out: dict[int, list[torch.Tensor]] = {}
        full = [i for i, g in enumerate(groups) if g.prefix == 0]
        reuse = [i for i, g in enumerate(groups) if g.prefix > 0]
        if full:
            done = self.hf.run_full([groups[i] for i in full], figures, self.short_rows)
            out.update(zip(full, done, strict=True))
        if reuse:
            chosen = [groups[i] for i in reuse]
            if self.short_rows is None:
                done = self.hf.run_reuse(chosen, figures)
            else:
                done = self.hf.run_reuse_split(chosen, figures, self.short_rows)
            out.update(zip(reuse, done, strict=True))
        return [out[i] for i in range(len(groups))]

    def _run_staged(
        self,
        groups: Sequence[Group],
        indices: list[int],
        packed: bool,
        figures: BatchFigures,
        hidden: dict[int, list[torch.Tensor]],
        kept: dict[int, list[KVSpan | None]],
        reused: dict[int, int],
    ) -> None:
        """Stage 1: every stem (a stem group's, or a group's in-batch prefix); stage 2: every row."""
        stems: list[Stem] = []
        rows: list[_Row] = []
        for i in indices:
            g = groups[i]
            if g.stem is not None:
                stems.append(g.stem)
                continue
            context = g.context
            if g.prefix > g.context_tokens:  # the group's own shared prefix, dropped after the batch
                stem = Stem(g.seqs[0][g.context_tokens : g.prefix], g.context)
                stems.append(stem)
                context = (*context, (stem.span, g.prefix - g.context_tokens))
            rows += [_Row(i, s[g.prefix :], context, g.keep) for s in g.seqs]
        # Rows that share a context run next to each other: one attention call per span slice.
        order = sorted(range(len(rows)), key=lambda r: tuple(id(span) for span, _ in rows[r].context))
        row_items: list[ContextRow] = [(rows[r].ids, rows[r].context, rows[r].keep) for r in order]
        stem_items: list[ContextRow] = [(s.ids, s.context, True) for s in stems]
        if packed and stems:
            # One pass: the stems first, filled layer by layer, and the rows that continue them.
            done = self._packed([*stem_items, *row_items], [s.span for s in stems], figures)
            done_rows = done[len(stems) :]
        else:
            for stem, (_, span) in zip(stems, self._rows(stem_items, packed, figures), strict=True):
                assert span is not None
                stem.span.fill(span)
            done_rows = self._rows(row_items, packed, figures)
        for stem in stems:
            stem.span.unpaid = len(stem.ids)
        by_row = dict(zip(order, done_rows, strict=True))
        k = 0
        for i in indices:
            g = groups[i]
            if g.stem is not None:
                hidden[i], kept[i], reused[i] = [], [], 0
                continue
            per_hidden: list[torch.Tensor] = []
            per_kept: list[KVSpan | None] = []
            saved = 0
            for pos in g.positions:
                row = rows[k]
                own, span = by_row[k]
                start = context_length(row.context)
                vecs = [own[p - start] if p >= start else context_hidden(row.context, p) for p in pos]
                per_hidden.append(torch.stack(vecs) if vecs else own.new_zeros((0, own.shape[-1])))
                per_kept.append(span)
                saved += _charge(row.context)
                k += 1
            hidden[i], kept[i], reused[i] = per_hidden, per_kept, saved

    def _rows(
        self, rows: list[ContextRow], packed: bool, figures: BatchFigures
    ) -> list[tuple[torch.Tensor, KVSpan | None]]:
        if not rows:
            return []
        if packed:
            return self._packed(rows, [], figures)
        return self.hf.run_context_rows(rows, figures, self.short_rows)

    def _packed(
        self, rows: list[ContextRow], fills: list[KVSpan], figures: BatchFigures
    ) -> list[tuple[torch.Tensor, KVSpan | None]]:
        """Packed rows; the first len(fills) compute those spans (see PackedDecoder.run_rows)."""
        assert self.packed is not None
        targets: list[KVSpan | None] = [*fills, *([None] * (len(rows) - len(fills)))]
        hidden, spans = self.packed.run_rows(
            [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], targets
        )
        figures.rows += len(rows)
        tokens = sum(len(r[0]) for r in rows)
        figures.batch_tokens += tokens
        figures.computed_tokens += tokens
        return list(zip(hidden, spans, strict=True))


def _charge(context: Context) -> int:
    """Tokens a row did not compute thanks to its context, less what it pays for spans
    computed for it (the first readers of a fresh stem pay for its tokens)."""
    saved = 0
    for span, n in context:
        pay = min(span.unpaid, n)
        span.unpaid -= pay
        saved += n - pay
    return saved
