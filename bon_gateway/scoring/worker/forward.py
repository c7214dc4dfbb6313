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

On CPU a batch is not one padded tensor: a big matmul gains nothing from more
rows there, while padding costs its tokens and an explicit attention mask moves
SDPA off its fused causal kernel (measured in bench/score_throughput.py: the
padded batch ran slower than one sequence at a time). Llama-family backbones
run packed instead (packed.py: rows end to end, no padding, each shared prompt
attended once for all its candidates). Other CPU backbones run rows of equal
length together without a mask, and only short rows, where the per-call
overhead is what counts, are padded together (`split_rows`). On CUDA the batch
stays one padded tensor: there more rows is what makes the matmuls fast.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from bon_gateway.scoring.worker.adapters import Adapter
from bon_gateway.scoring.worker.packed import PackedDecoder, PromptCache, packing_limit


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


# Rows at most this long are padded into one call on CPU; longer rows never pad.
SHORT_ROW_TOKENS = 128


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
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


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
        # CPU, Llama-family backbones: packed rows, no padding, shared prompt attention.
        limit = packing_limit(adapter.backbone) if device.type == "cpu" else None
        self.packed = PackedDecoder(adapter.backbone) if limit is not None else None
        self.packing_limit = limit or 0

    @torch.inference_mode()
    def run(self, groups: Sequence[Group]) -> tuple[list[list[torch.Tensor]], BatchFigures]:
        """Per group, per candidate: fp32 logits [positions, labels]."""
        figures = BatchFigures(real_tokens=sum(g.real_tokens for g in groups))
        if self.packed is not None and all(g.max_len <= self.packing_limit for g in groups):
            return self._run_packed(self.packed, groups, figures), figures
        out: dict[int, list[torch.Tensor]] = {}
        full = [i for i, g in enumerate(groups) if g.prefix == 0]
        reuse = [i for i, g in enumerate(groups) if g.prefix > 0]
        if full:
            for i, logits in zip(full, self._run_full([groups[i] for i in full], figures), strict=True):
                out[i] = logits
        if reuse:
            run_reuse = self._run_reuse if self.short_rows is None else self._run_reuse_split
            for i, logits in zip(reuse, run_reuse([groups[i] for i in reuse], figures), strict=True):
                out[i] = logits
        return [out[i] for i in range(len(groups))], figures

    def _split(self, groups: Sequence[Group], gathered: torch.Tensor) -> list[list[torch.Tensor]]:
        logits = self.adapter.head(gathered.float())
        result: list[list[torch.Tensor]] = []
        k = 0
        for g in groups:
            per: list[torch.Tensor] = []
            for pos in g.positions:
                per.append(logits[k : k + len(pos)])
                k += len(pos)
            result.append(per)
        return result

    def _run_packed(
        self, decoder: PackedDecoder, groups: Sequence[Group], figures: BatchFigures
    ) -> list[list[torch.Tensor]]:
        """All groups in one packed run (see packed.py): each shared prompt once, then
        every candidate's own tokens end to end, with no padding."""
        prompts: list[PromptCache] = []
        rows: list[list[int]] = []
        prompt_of: list[int] = []
        for g in groups:
            if g.prefix > 0:
                prompts.append(decoder.prompt(g.seqs[0][: g.prefix]))
                figures.rows += 1
                figures.batch_tokens += g.prefix
                figures.reused_tokens += (len(g.seqs) - 1) * g.prefix
            for s in g.seqs:
                rows.append(s[g.prefix :])
                prompt_of.append(len(prompts) - 1 if g.prefix > 0 else -1)
        hidden = decoder.run(rows, prompt_of, prompts)
        figures.rows += len(rows)
        figures.batch_tokens += sum(len(r) for r in rows)
        picked: list[torch.Tensor] = []
        k = 0
        for g in groups:
            before = prompts[prompt_of[k]].hidden if g.prefix > 0 else None
            for pos in g.positions:
                for p in pos:
                    picked.append(hidden[k][p - g.prefix] if p >= g.prefix or before is None else before[p])
                k += 1
        width = hidden[0].shape[-1]
        return self._split(groups, torch.stack(picked) if picked else hidden[0].new_zeros((0, width)))

    def _run_full(self, groups: Sequence[Group], figures: BatchFigures) -> list[list[torch.Tensor]]:
        seqs = [s for g in groups for s in g.seqs]
        positions = [p for g in groups for p in g.positions]
        picked: list[torch.Tensor | None] = [None] * len(seqs)
        lengths = [len(s) for s in seqs]
        plan = [list(range(len(seqs)))] if self.short_rows is None else split_rows(lengths, self.short_rows)
        for part in plan:
            hidden = self._backbone([seqs[i] for i in part], figures)
            for row, i in enumerate(part):
                picked[i] = hidden[row, torch.tensor(positions[i], device=hidden.device)]
        return self._split(groups, torch.cat([p for p in picked if p is not None]))

    def _backbone(self, seqs: Sequence[Sequence[int]], figures: BatchFigures) -> torch.Tensor:
        """Last hidden states of right-padded `seqs`; no mask at all when nothing is padded."""
        ids, mask = _pad_right(seqs, self.pad_id)
        figures.rows += ids.shape[0]
        figures.batch_tokens += ids.numel()
        padded = bool((mask == 0).any())
        hidden: torch.Tensor = self.adapter.backbone(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device) if padded else None,
            use_cache=False,
        ).last_hidden_state
        return hidden

    def _run_reuse_split(self, groups: Sequence[Group], figures: BatchFigures) -> list[list[torch.Tensor]]:
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
            figures.reused_tokens += (len(g.seqs) - 1) * width
            suffixes = [s[width:] for s in g.seqs]
            picked: list[torch.Tensor] = [hp.new_zeros((0, hp.shape[-1]))] * len(suffixes)
            for part in split_rows([len(x) for x in suffixes], self.short_rows or 0):
                sids, smask = _pad_right([suffixes[i] for i in part], self.pad_id)
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
            out.extend(self._split([g], torch.cat(picked)))
        return out

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
            input_ids=pids.to(dev),
            attention_mask=pmask.to(dev),
            position_ids=ppos.to(dev),
            past_key_values=cache,
            use_cache=True,
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
        suffixes = [s[g.prefix :] for g in groups for s in g.seqs]
        sids, smask = _pad_right(suffixes, self.pad_id)
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


def _repeat_cache(cache: Any, rows: int) -> Any:
    """A copy of a one-row cache whose attention layers are `rows`-row broadcast views
    (no copy: the next pass concatenates its own keys into new tensors)."""
    clone = copy.copy(cache)
    clone.layers = [copy.copy(layer) for layer in cache.layers]
    for layer in clone.layers:
        # Recurrent (Mamba, linear-attention) state has no keys: such adapters set
        # supports_prefix_reuse False and never get here.
        if getattr(layer, "keys", None) is None:
            raise RuntimeError(f"prompt reuse needs attention KV layers, got {type(layer).__name__}")
        layer.keys = layer.keys.expand(rows, *layer.keys.shape[1:])
        layer.values = layer.values.expand(rows, *layer.values.shape[1:])
    return clone
