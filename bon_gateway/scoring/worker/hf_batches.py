"""Batches on transformers' own forward: CUDA, and CPU backbones that are not packable.

Two kinds of work run here (forward.py decides which):

- plain groups (no cached context, nothing kept): as before the prefix cache,
  with transformers' own cache objects for the in-group shared prompt (so a
  sliding-window model past its window is exact too);
- rows that continue a context (spans of keys and values computed earlier, see
  packed.py's `KVSpan`) and may keep their own: the context is handed to the
  backbone as a DynamicCache built from the spans (a broadcast view when every
  row of the call shares it, else left-padded), with an attention mask over
  context + own tokens and positions continuing after the context.

On CPU, rows of equal length run together without a mask and only short rows
pad together (`split_rows`); on CUDA a call is one padded batch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch

from bon_gateway.scoring.worker.adapters import Adapter
from bon_gateway.scoring.worker.groups import BatchFigures, Group
from bon_gateway.scoring.worker.packed import Context, KVSpan, context_length

__all__ = ["SHORT_ROW_TOKENS", "ContextRow", "TransformersBatches", "split_rows"]

# Rows at most this long are padded into one call on CPU; longer rows never pad.
SHORT_ROW_TOKENS = 128

#: one row of a context call: its own token ids, what it continues, whether to keep its K/V
ContextRow = tuple[list[int], Context, bool]


def split_rows(lengths: Sequence[int], short: int = SHORT_ROW_TOKENS) -> list[list[int]]:
    """Indices of `lengths` in sub-batches: equal lengths together (no padding, no
    mask), and rows up to `short` tokens together whatever their lengths."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out: list[list[int]] = []
    for i in order:
        if out and (lengths[out[-1][0]] == lengths[i] or lengths[out[-1][0]] <= short):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def pad_right(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def pad_left(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def _context_key(context: Context) -> tuple[tuple[int, int], ...]:
    return tuple((id(span), n) for span, n in context)


def _attention_layers(cache: Any) -> list[Any]:
    layers: list[Any] = list(cache.layers)
    for layer in layers:
        # Recurrent (Mamba, linear-attention) state has no keys: such adapters set
        # supports_prefix_reuse False and never get here.
        if getattr(layer, "keys", None) is None:
            raise RuntimeError(f"prompt reuse needs attention KV layers, got {type(layer).__name__}")
    return layers


def _fresh_attention_layers(cache: Any) -> list[Any]:
    """The layers of a new DynamicCache, each a key/value layer that can be filled."""
    from transformers.cache_utils import DynamicLayer

    layers: list[Any] = list(cache.layers)
    for layer in layers:
        if not isinstance(layer, DynamicLayer):
            raise RuntimeError(f"prompt reuse needs attention KV layers, got {type(layer).__name__}")
    return layers


class TransformersBatches:
    """Runs groups and context rows on an adapter's backbone as transformers does."""

    def __init__(self, adapter: Adapter, device: torch.device, pad_id: int) -> None:
        self.adapter = adapter
        self.device = device
        self.pad_id = pad_id
        config = adapter.config
        # Sliding-window layers index their mask by cache slot: a left-padded context would
        # shift it, so contexts of such models are never padded (one call per context).
        self.sliding = bool(getattr(config, "sliding_window", None))

    # -- plain groups ------------------------------------------------------------------------
    def run_full(
        self, groups: Sequence[Group], figures: BatchFigures, short_rows: int | None
    ) -> list[list[torch.Tensor]]:
        """Per group, per row: hidden states at its positions [k, hidden]."""
        seqs = [s for g in groups for s in g.seqs]
        positions = [p for g in groups for p in g.positions]
        picked: list[torch.Tensor | None] = [None] * len(seqs)
        lengths = [len(s) for s in seqs]
        plan = [list(range(len(seqs)))] if short_rows is None else split_rows(lengths, short_rows)
        for part in plan:
            hidden = self._backbone([seqs[i] for i in part], figures)
            for row, i in enumerate(part):
                picked[i] = hidden[row, torch.tensor(positions[i], device=hidden.device)]
        figures.computed_tokens += sum(lengths)
        flat = [p for p in picked if p is not None]
        return _per_group(groups, flat)

    def _backbone(self, seqs: Sequence[Sequence[int]], figures: BatchFigures) -> torch.Tensor:
        """Last hidden states of right-padded `seqs`; no mask at all when nothing is padded."""
        ids, mask = pad_right(seqs, self.pad_id)
        figures.rows += ids.shape[0]
        figures.batch_tokens += ids.numel()
        padded = bool((mask == 0).any())
        hidden: torch.Tensor = self.adapter.backbone(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device) if padded else None,
            use_cache=False,
        ).last_hidden_state
        return hidden

    def run_reuse_split(
        self, groups: Sequence[Group], figures: BatchFigures, short_rows: int
    ) -> list[list[torch.Tensor]]:
        """CPU: per group, the prompt once (one row, no mask), then the candidates' own
        tokens in `split_rows` sub-batches, each on a broadcast view of the prompt's cache."""
        from transformers import DynamicCache

        backbone = self.adapter.backbone
        dev = self.device
        out: list[list[torch.Tensor]] = []
        for g in groups:
            width = g.prefix
            cache = DynamicCache(config=self.adapter.config)
            hp = backbone(
                input_ids=torch.tensor([g.seqs[0][:width]], device=dev),
                position_ids=torch.arange(width, device=dev).unsqueeze(0),
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
            figures.rows += 1
            figures.batch_tokens += width
            figures.computed_tokens += width + sum(len(s) - width for s in g.seqs)
            suffixes = [s[width:] for s in g.seqs]
            picked: list[torch.Tensor] = [hp.new_zeros((0, hp.shape[-1]))] * len(suffixes)
            for part in split_rows([len(x) for x in suffixes], short_rows):
                sids, smask = pad_right([suffixes[i] for i in part], self.pad_id)
                rows = len(part)
                mask = None
                if bool((smask == 0).any()):
                    mask = torch.cat([torch.ones((rows, width), dtype=torch.long), smask], dim=1).to(dev)
                spos = width + torch.arange(sids.shape[1]).unsqueeze(0).expand(rows, -1)
                hs = backbone(
                    input_ids=sids.to(dev),
                    attention_mask=mask,
                    position_ids=spos.to(dev),
                    past_key_values=_repeat_cache(cache, rows),
                    use_cache=True,
                ).last_hidden_state
                figures.rows += rows
                figures.batch_tokens += sids.numel()
                for row, i in enumerate(part):
                    vecs = [hs[row, p - width] if p >= width else hp[0, p] for p in g.positions[i]]
                    if vecs:
                        picked[i] = torch.stack(vecs)
            out.append(picked)
        return out

    def run_reuse(self, groups: Sequence[Group], figures: BatchFigures) -> list[list[torch.Tensor]]:
        """CUDA: every group's prompt in one left-padded call, then every row in one."""
        from transformers import DynamicCache

        backbone = self.adapter.backbone
        dev = self.device
        # 1. Each group's prefix once, left-padded so that every prefix ends at the same column
        #    and the suffixes can follow it in the cache.
        prefixes = [g.seqs[0][: g.prefix] for g in groups]
        pids, pmask = pad_left(prefixes, self.pad_id)
        width = pids.shape[1]
        ppos = (pmask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.adapter.config)
        hp = backbone(
            input_ids=pids.to(dev),
            attention_mask=pmask.to(dev),
            position_ids=ppos.to(dev),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        # 2. Repeat each group's cache rows once per candidate.
        row_group = [gi for gi, g in enumerate(groups) for _ in g.seqs]
        index = torch.tensor(row_group, device=dev)
        for layer in _attention_layers(cache):
            if len(groups) == 1:
                # One prompt: a broadcast view, no copy (the next pass concatenates anyway).
                rows = len(row_group)
                layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
                layer.values = layer.values.expand(rows, *layer.values.shape[1:])
            else:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
        # 3. The candidates' own tokens, right-padded; the mask covers prefix + suffix.
        suffixes = [s[g.prefix :] for g in groups for s in g.seqs]
        sids, smask = pad_right(suffixes, self.pad_id)
        mask = torch.cat([pmask[index.cpu()], smask], dim=1)
        starts = torch.tensor([groups[gi].prefix for gi in row_group]).unsqueeze(1)
        spos = starts + torch.arange(sids.shape[1]).unsqueeze(0)
        hs = backbone(
            input_ids=sids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=spos.to(dev),
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state
        figures.rows += sids.shape[0]
        figures.batch_tokens += pids.numel() + sids.numel()
        figures.computed_tokens += sum(len(p) for p in prefixes) + sum(len(s) for s in suffixes)
        # 4. Gather: positions inside the prefix come from the prefix pass.
        picked: list[torch.Tensor] = []
        r = 0
        for gi, g in enumerate(groups):
            for pos in g.positions:
                vecs = [hs[r, p - g.prefix] if p >= g.prefix else hp[gi, width - g.prefix + p] for p in pos]
                picked.append(torch.stack(vecs) if vecs else hs.new_zeros((0, hs.shape[-1])))
                r += 1
        return _per_group(groups, picked)

    # -- rows that continue contexts ---------------------------------------------------------
    def run_context_rows(
        self, rows: Sequence[ContextRow], figures: BatchFigures, short_rows: int | None
    ) -> list[tuple[torch.Tensor, KVSpan | None]]:
        """Per row: its last hidden states [len(ids), hidden] and, when kept, its own K/V."""
        out: list[tuple[torch.Tensor, KVSpan | None] | None] = [None] * len(rows)
        if short_rows is None and not self.sliding:
            calls = [list(range(len(rows)))]
        else:
            by_context: dict[tuple[tuple[int, int], ...], list[int]] = {}
            for i, (_, context, _) in enumerate(rows):
                by_context.setdefault(_context_key(context), []).append(i)
            calls = []
            for members in by_context.values():
                if short_rows is None:
                    calls.append(members)
                else:
                    parts = split_rows([len(rows[i][0]) for i in members], short_rows)
                    calls += [[members[j] for j in part] for part in parts]
        for call in calls:
            for i, result in zip(call, self._context_call([rows[i] for i in call], figures), strict=True):
                out[i] = result
        return [r for r in out if r is not None]

    def _context_call(
        self, rows: Sequence[ContextRow], figures: BatchFigures
    ) -> list[tuple[torch.Tensor, KVSpan | None]]:
        from transformers import DynamicCache

        dev = self.device
        count = len(rows)
        lengths = [context_length(context) for _, context, _ in rows]
        width_ctx = max(lengths)
        ids, own_mask = pad_right([r[0] for r in rows], self.pad_id)
        width = ids.shape[1]
        keep_any = any(keep for _, _, keep in rows)
        cache = DynamicCache(config=self.adapter.config)
        layers = _fresh_attention_layers(cache)
        if width_ctx > 0:
            keys, values = self._past(rows, lengths, width_ctx, len(layers))
            for layer, k, v in zip(layers, keys, values, strict=True):
                layer.lazy_initialization(k, v)
                layer.keys, layer.values = k, v
                if hasattr(layer, "cumulative_length"):  # sliding-window layers count their slots
                    layer.cumulative_length = width_ctx
        ctx_mask = torch.zeros((count, width_ctx), dtype=torch.long)
        for r, n in enumerate(lengths):
            ctx_mask[r, width_ctx - n :] = 1
        mask = torch.cat([ctx_mask, own_mask], dim=1)
        positions = torch.tensor(lengths).unsqueeze(1) + torch.arange(width).unsqueeze(0)
        hidden = self.adapter.backbone(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev) if bool((mask == 0).any()) else None,
            position_ids=positions.to(dev),
            past_key_values=cache if (width_ctx > 0 or keep_any) else None,
            use_cache=width_ctx > 0 or keep_any,
        ).last_hidden_state
        figures.rows += count
        figures.batch_tokens += ids.numel()
        figures.computed_tokens += sum(len(r[0]) for r in rows)
        out: list[tuple[torch.Tensor, KVSpan | None]] = []
        for r, (own, _, keep) in enumerate(rows):
            span = None
            if keep:
                end = width_ctx + len(own)
                span = KVSpan(
                    hidden[r, : len(own)].clone(),
                    [
                        layer.keys[r : r + 1, :, width_ctx:end].contiguous()
                        for layer in _attention_layers(cache)
                    ],
                    [
                        layer.values[r : r + 1, :, width_ctx:end].contiguous()
                        for layer in _attention_layers(cache)
                    ],
                )
            out.append((hidden[r, : len(own)], span))
        return out

    def _past(
        self, rows: Sequence[ContextRow], lengths: list[int], width: int, layers: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, the rows' contexts as one [rows, kv_heads, width, head_dim] tensor:
        a broadcast view when all rows share one context, else right-aligned (left-padded)."""
        contexts = [context for _, context, _ in rows]
        shared = len({_context_key(c) for c in contexts}) == 1
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for layer in range(layers):
            if shared:
                k = _joined(contexts[0], layer, keys=True)
                v = _joined(contexts[0], layer, keys=False)
                keys.append(k.expand(len(rows), *k.shape[1:]))
                values.append(v.expand(len(rows), *v.shape[1:]))
                continue
            k_all: torch.Tensor | None = None
            v_all: torch.Tensor | None = None
            for r, (context, n) in enumerate(zip(contexts, lengths, strict=True)):
                if n == 0:
                    continue
                k = _joined(context, layer, keys=True)
                v = _joined(context, layer, keys=False)
                if k_all is None or v_all is None:
                    k_all = k.new_zeros((len(rows), k.shape[1], width, k.shape[3]))
                    v_all = v.new_zeros((len(rows), v.shape[1], width, v.shape[3]))
                k_all[r, :, width - n :] = k[0]
                v_all[r, :, width - n :] = v[0]
            assert k_all is not None and v_all is not None
            keys.append(k_all)
            values.append(v_all)
        return keys, values


def _joined(context: Context, layer: int, *, keys: bool) -> torch.Tensor:
    parts = [(span.keys if keys else span.values)[layer][:, :, :n] for span, n in context]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _per_group(groups: Sequence[Group], flat: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    out: list[list[torch.Tensor]] = []
    k = 0
    for g in groups:
        out.append(list(flat[k : k + len(g.seqs)]))
        k += len(g.seqs)
    return out


def _repeat_cache(cache: Any, rows: int) -> Any:
    """A copy of a one-row cache whose attention layers are `rows`-row broadcast views
    (no copy: the next pass concatenates its own keys into new tensors)."""
    clone = copy.copy(cache)
    clone.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in _attention_layers(clone):
        layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
        layer.values = layer.values.expand(rows, *layer.values.shape[1:])
    return clone
