"""Backbone -> hidden states -> gather positions -> head, for a batch of groups.

A group is one request's candidates. When a group shares a token prefix (its
prompt), the prefix runs once with `use_cache=True`, the cache is repeated for
every candidate and only the candidates' own tokens run after it; otherwise
the full sequences run right-padded. Both give the scores of one unpadded
sequence (fp32: within ~1e-6) because:

- the 2-D attention mask always covers everything the queries may see
  (prefix + own tokens), with pads masked out;
- position ids are given explicitly: left-padded prefixes count from their
  first real token, suffixes continue after their own prefix;
- hidden states are read at the positions the adapter names, and the head runs
  in fp32 on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bon_gateway.scoring.worker.adapters import Adapter


@dataclass(slots=True)
class Group:
    """One request's candidates, tokenized."""

    seqs: list[list[int]]
    positions: list[list[int]]  # per candidate: where to read hidden states
    prefix: int = 0  # leading tokens shared by all seqs, computed once (0: full recompute)

    @property
    def real_tokens(self) -> int:
        return sum(len(s) for s in self.seqs)

    @property
    def max_len(self) -> int:
        return max(len(s) for s in self.seqs)

    @property
    def max_suffix(self) -> int:
        return max(len(s) for s in self.seqs) - self.prefix


@dataclass(slots=True)
class BatchFigures:
    rows: int = 0
    batch_tokens: int = 0  # tokens the backbone ran, padding included
    real_tokens: int = 0
    reused_tokens: int = 0  # prompt tokens not recomputed
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def padded_tokens(self) -> int:
        return self.batch_tokens - (self.real_tokens - self.reused_tokens)


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
    """Tokens the backbone runs for these groups in one batch (padding included)."""
    full = [g for g in groups if g.prefix == 0]
    reuse = [g for g in groups if g.prefix > 0]
    cost = 0
    if full:
        cost += sum(len(g.seqs) for g in full) * max(g.max_len for g in full)
    if reuse:
        cost += len(reuse) * max(g.prefix for g in reuse)
        cost += sum(len(g.seqs) for g in reuse) * max(g.max_suffix for g in reuse)
    return cost


def _pad_right(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def _pad_left(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


class Forward:
    """Runs batches of groups through one adapter's backbone and head."""

    def __init__(self, adapter: Adapter, device: torch.device) -> None:
        self.adapter = adapter
        self.device = device
        pad = adapter.config.pad_token_id
        # Any id works for padding (masked out); the pad id keeps pooled positions meaningful.
        self.pad_id = int(pad) if pad is not None else 0

    @torch.inference_mode()
    def run(self, groups: Sequence[Group]) -> tuple[list[list[torch.Tensor]], BatchFigures]:
        """Per group, per candidate: fp32 logits [positions, labels]."""
        figures = BatchFigures(real_tokens=sum(g.real_tokens for g in groups))
        out: dict[int, list[torch.Tensor]] = {}
        full = [i for i, g in enumerate(groups) if g.prefix == 0]
        reuse = [i for i, g in enumerate(groups) if g.prefix > 0]
        if full:
            for i, logits in zip(full, self._run_full([groups[i] for i in full], figures), strict=True):
                out[i] = logits
        if reuse:
            for i, logits in zip(reuse, self._run_reuse([groups[i] for i in reuse], figures), strict=True):
                out[i] = logits
        return [out[i] for i in range(len(groups))], figures

    def _split(self, groups: Sequence[Group], gathered: torch.Tensor) -> list[list[torch.Tensor]]:
        logits = self.adapter.head(gathered.float())
        result: list[list[torch.Tensor]] = []
        k = 0
        for g in groups:
            per: list[torch.Tensor] = []
            for pos in g.positions:
                per.append(logits[k: k + len(pos)])
                k += len(pos)
            result.append(per)
        return result

    def _run_full(self, groups: Sequence[Group], figures: BatchFigures) -> list[list[torch.Tensor]]:
        seqs = [s for g in groups for s in g.seqs]
        ids, mask = _pad_right(seqs, self.pad_id)
        figures.rows += ids.shape[0]
        figures.batch_tokens += ids.numel()
        hidden = self.adapter.backbone(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False
        ).last_hidden_state
        rows = [r for r, pos in enumerate(p for g in groups for p in g.positions) for _ in pos]
        cols = [c for g in groups for pos in g.positions for c in pos]
        gathered = hidden[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)]
        return self._split(groups, gathered)

    def _run_reuse(self, groups: Sequence[Group], figures: BatchFigures) -> list[list[torch.Tensor]]:
        from transformers import DynamicCache

        backbone = self.adapter.backbone
        dev = self.device
        # 1. Each group's prefix once, left-padded so that every prefix ends at the same column
        #    and the suffixes can follow it in the cache.
        prefixes = [g.seqs[0][: g.prefix] for g in groups]
        pids, pmask = _pad_left(prefixes, self.pad_id)
        width = pids.shape[1]
        ppos = (pmask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.adapter.config)
        hp = backbone(
            input_ids=pids.to(dev), attention_mask=pmask.to(dev), position_ids=ppos.to(dev),
            past_key_values=cache, use_cache=True,
        ).last_hidden_state
        # 2. Repeat each group's cache rows once per candidate.
        row_group = [gi for gi, g in enumerate(groups) for _ in g.seqs]
        index = torch.tensor(row_group, device=dev)
        layers: list[Any] = list(cache.layers)
        for layer in layers:
            # Only attention layers can be repeated; recurrent (Mamba, linear-attention) state
            # cannot continue a left-padded prefix: such adapters set supports_prefix_reuse False.
            if getattr(layer, "keys", None) is None:
                raise RuntimeError(f"prompt reuse needs attention KV layers, got {type(layer).__name__}")
            if len(groups) == 1:
                # One prompt: a broadcast view, no copy (the next pass concatenates anyway).
                rows = len(row_group)
                layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
                layer.values = layer.values.expand(rows, *layer.values.shape[1:])
            else:
                layer.keys = layer.keys.index_select(0, index)
                layer.values = layer.values.index_select(0, index)
        # 3. The candidates' own tokens, right-padded; the mask covers prefix + suffix.
        suffixes = [s[g.prefix:] for g in groups for s in g.seqs]
        sids, smask = _pad_right(suffixes, self.pad_id)
        mask = torch.cat([pmask[index.cpu()], smask], dim=1)
        starts = torch.tensor([groups[gi].prefix for gi in row_group]).unsqueeze(1)
        spos = starts + torch.arange(sids.shape[1]).unsqueeze(0)
        hs = backbone(
            input_ids=sids.to(dev), attention_mask=mask.to(dev), position_ids=spos.to(dev),
            past_key_values=cache, use_cache=True,
        ).last_hidden_state
        figures.rows += sids.shape[0]
        figures.batch_tokens += pids.numel() + sids.numel()
        figures.reused_tokens += sum((len(g.seqs) - 1) * g.prefix for g in groups)
        # 4. Gather: positions inside the prefix come from the prefix pass.
        picked: list[torch.Tensor] = []
        r = 0
        for gi, g in enumerate(groups):
            for pos in g.positions:
                for p in pos:
                    if p >= g.prefix:
                        picked.append(hs[r, p - g.prefix])
                    else:
                        picked.append(hp[gi, width - g.prefix + p])
                r += 1
        return self._split(groups, torch.stack(picked))
