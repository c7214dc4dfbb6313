"""Packed (varlen) runs of Llama-family decoders on CPU, prompt attention shared.

transformers runs a batch as one padded [rows, width] tensor with a 4-D mask.
On CPU that is the slow way: padding costs its tokens, and a mask takes SDPA
off its fused causal kernel. Here the rows of a batch are packed end to end
into one [tokens, hidden] stream instead, as flash-attn's varlen kernels do on
GPUs:

- every matmul (q, k, v, o, MLP) runs once over all tokens of all rows, with no
  padding at all;
- attention runs per row on its slice of the stream, causal, on torch's fused
  CPU flash kernel (which takes grouped KV heads as they are);
- rows that continue keys and values computed before (a request's shared
  prompt, a prefix kept in the worker's cache, a candidate's earlier partial:
  a row's *context*, one or more `KVSpan`s) see each span through one more
  attention call, made once for the queries of all adjacent rows that share it,
  without copying the span per row; the partial results are merged exactly
  through their log-sum-exp ("cascade" attention).

The layers themselves are transformers' own modules (norms, projections, rotary
embedding, MLP), called in the order the model calls them, so a packed run
gives the hidden states of one unpadded sequence (fp32: within ~1e-5).
Backbones other than the plain Llama family (Gemma2's soft-capping, Jamba's
Mamba layers, sliding windows shorter than the input) stay on transformers.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

#: backbone classes whose decoder layers follow LlamaDecoderLayer's structure exactly
PACKABLE_BACKBONES = ("LlamaModel", "MistralModel", "Qwen2Model", "Qwen3Model")

#: tokens per packed run. Past a few thousand tokens a layer's activations (the MLP's
#: [tokens, intermediate] above all) leave the CPU caches and every elementwise pass goes
#: to memory. SmolLM2, fp32, the 8 candidates (~1,200 tokens each) of the first request of
#: bench/score_throughput.py's workload, timed side by side on a shared machine: 438 tok/s
#: in one run, 501 one row at a time, 509 in runs of <= 2,048 tokens, 455 of <= 4,096.
CHUNK_TOKENS = 2048


def packing_limit(backbone: Any) -> int | None:
    """How long a row may be in a packed run of `backbone` (None: not packable at all).

    A sliding window only matters past its length, so rows up to it are exact here.
    """
    if type(backbone).__name__ not in PACKABLE_BACKBONES:
        return None
    for layer in getattr(backbone, "layers", ()):
        attn = getattr(layer, "self_attn", None)
        if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            return None
    window = getattr(backbone.config, "sliding_window", None)
    return int(window) if window else 1 << 30


PENDING, READY, FAILED = "pending", "ready", "failed"


@dataclass(slots=True, eq=False)
class KVSpan:
    """Consecutive positions run once, kept for the rows that continue them (a shared
    prompt, a cached prefix, a kept candidate): per layer their keys and values
    [1, kv_heads, n, head_dim] after rotary (the layout of transformers' caches), and
    their last hidden states [n, hidden] (a head may read positions inside a span).

    A span can be created `pending` and filled by the batch that computes it; rows
    that continue it wait for that batch (or run in it, after it: see batching.py).
    """

    hidden: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    state: str = READY
    # Tokens computed for this span that no reader has been charged for yet: the first
    # rows that read it count them against their reuse (BatchFigures.reused_tokens).
    unpaid: int = 0

    @classmethod
    def pending(cls) -> KVSpan:
        return cls(hidden=torch.empty(0), keys=[], values=[], state=PENDING)

    def fill(self, computed: KVSpan, *, unpaid: int = 0) -> None:
        self.hidden, self.keys, self.values = computed.hidden, computed.keys, computed.values
        self.unpaid = unpaid
        self.state = READY

    @property
    def length(self) -> int:
        return int(self.hidden.shape[0]) if self.state == READY else 0

    @property
    def nbytes(self) -> int:
        tensors = [self.hidden, *self.keys, *self.values]
        return sum(t.numel() * t.element_size() for t in tensors)


#: what a row continues: spans and how many of their leading positions, in order (the row's
#: positions start after all of them)
Context = tuple[tuple[KVSpan, int], ...]


def context_length(context: Context) -> int:
    return sum(n for _, n in context)


def truncate_context(context: Context, length: int) -> Context:
    """The first `length` positions of `context`."""
    out: list[tuple[KVSpan, int]] = []
    left = length
    for span, n in context:
        if left <= 0:
            break
        out.append((span, min(n, left)))
        left -= n
    return tuple(out)


def context_hidden(context: Context, position: int) -> torch.Tensor:
    """The last hidden state at `position` (< context_length) of a context."""
    offset = 0
    for span, n in context:
        if position < offset + n:
            return span.hidden[position - offset]
        offset += n
    raise IndexError(f"position {position} is past the context ({offset} positions)")


@dataclass(slots=True)
class _Row:
    start: int  # offset in the packed stream
    length: int
    context: Context


class PackedDecoder:
    """Runs packed rows through a Llama-family backbone (see the module docstring)."""

    def __init__(self, backbone: Any, chunk_tokens: int = CHUNK_TOKENS) -> None:
        self.backbone = backbone
        self.chunk_tokens = chunk_tokens
        # transformers' own rotary application for this family (same function for all four).
        module = sys.modules[type(backbone.layers[0].self_attn).__module__]
        self._apply_rotary = module.apply_rotary_pos_emb
        self._flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        self.linear = FusedLinear(onednn=onednn_linear_works())
        # LlamaMLP and its copies: down(silu(gate(x)) * up(x)), which FusedLinear fuses.
        mlp = backbone.layers[0].mlp
        self._gated_silu = getattr(backbone.config, "hidden_act", None) == "silu" and all(
            hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")
        )

    @torch.inference_mode()
    def prompt(self, ids: Sequence[int]) -> KVSpan:
        """Run one prompt alone, keeping its keys and values for the rows that continue it."""
        _, kept = self.run_rows([ids], [()], keep=[True])
        span = kept[0]
        assert span is not None
        return span

    @torch.inference_mode()
    def run(
        self, rows: Sequence[Sequence[int]], prompt_of: Sequence[int], prompts: Sequence[KVSpan]
    ) -> list[torch.Tensor]:
        """Last hidden states of each row, [len(row), hidden]; row i continues the whole of
        `prompts[prompt_of[i]]`, or stands alone when prompt_of[i] is -1 (see run_rows)."""
        contexts = [((prompts[p], prompts[p].length),) if p >= 0 else () for p in prompt_of]
        hidden, _ = self.run_rows(rows, contexts)
        return hidden

    @torch.inference_mode()
    def run_rows(
        self,
        rows: Sequence[Sequence[int]],
        contexts: Sequence[Context],
        keep: Sequence[bool] = (),
        fills: Sequence[KVSpan | None] = (),
    ) -> tuple[list[torch.Tensor], list[KVSpan | None]]:
        """Last hidden states of each row, [len(row), hidden], and for the rows with `keep`
        their own keys and values (a KVSpan, to be continued later).

        Row i continues `contexts[i]` (its positions start after it). `fills[i]`, when
        given, is a pending span that row i computes: it is filled layer by layer, so later
        rows of the same run may continue it (at each layer its keys and values exist
        before any attention of that layer runs; in a later pack it is complete). Rows that
        share a span should be adjacent: their attention to it is then one call over a
        contiguous slice. Rows run in packs of at most `chunk_tokens` tokens (a longer row
        alone).
        """
        out: list[torch.Tensor] = []
        kept: list[KVSpan | None] = []
        for part in _chunks([len(r) for r in rows], self.chunk_tokens):
            hidden, spans = self._run(
                [list(rows[i]) for i in part],
                [contexts[i] for i in part],
                [(bool(keep) and keep[i]) or (bool(fills) and fills[i] is not None) for i in part],
                [fills[i] if fills else None for i in part],
            )
            k = 0
            for i, span in zip(part, spans, strict=True):
                out.append(hidden[k : k + len(rows[i])])
                kept.append(span)
                k += len(rows[i])
        return out, kept

    def _run(
        self, rows: list[list[int]], contexts: list[Context], keep: list[bool], fills: list[KVSpan | None]
    ) -> tuple[torch.Tensor, list[KVSpan | None]]:
        bb = self.backbone
        device = bb.embed_tokens.weight.device
        packed, start = [], 0
        positions: list[torch.Tensor] = []
        for ids, context in zip(rows, contexts, strict=True):
            first = context_length(context)
            packed.append(_Row(start, len(ids), context))
            positions.append(torch.arange(first, first + len(ids)))
            start += len(ids)
        flat = torch.tensor([t for ids in rows for t in ids], dtype=torch.long, device=device)
        pos = torch.cat(positions).to(device).unsqueeze(0)
        h = bb.embed_tokens(flat.unsqueeze(0))  # [1, T, hidden]
        cos, sin = bb.rotary_emb(h, pos)
        h = h[0]
        tokens = h.shape[0]
        runs = _context_runs(packed)
        kept_keys: list[list[torch.Tensor]] = [[] for _ in rows]
        kept_values: list[list[torch.Tensor]] = [[] for _ in rows]
        for i, span in enumerate(fills):
            if span is not None:  # grows with every layer below: readers of this run see each layer's
                span.keys, span.values = kept_keys[i], kept_values[i]
        linear = self.linear
        for index, layer in enumerate(bb.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            shape = (1, tokens, -1, attn.head_dim)
            q = linear(x, attn.q_proj).view(shape)
            k = linear(x, attn.k_proj).view(shape)
            v = linear(x, attn.v_proj).view(shape)
            if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before rotary
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self._apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            v = v.transpose(1, 2)  # [1, heads, T, head_dim] views of the packed stream
            for i, r in enumerate(packed):
                if keep[i]:
                    kept_keys[i].append(k[:, :, r.start : r.start + r.length].contiguous())
                    kept_values[i].append(v[:, :, r.start : r.start + r.length].contiguous())
            o = self._attend(q, k, v, packed, runs, index, attn.scaling)
            h = linear(o.view(tokens, -1), attn.o_proj, add=h)
            x = layer.post_attention_layernorm(h)
            mlp = layer.mlp
            if self._gated_silu:
                gate = linear(x, mlp.gate_proj, silu=True)
                h = linear(linear(x, mlp.up_proj, mul=gate), mlp.down_proj, add=h)
            else:
                h = h + mlp(x)
        hidden: torch.Tensor = bb.norm(h)
        spans: list[KVSpan | None] = []
        for i, r in enumerate(packed):
            own = hidden[r.start : r.start + r.length].clone() if keep[i] else None
            span = fills[i]
            if span is not None and own is not None:
                span.hidden, span.state = own, READY
            spans.append(KVSpan(own, kept_keys[i], kept_values[i]) if own is not None else None)
        return hidden, spans

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rows: list[_Row],
        runs: list[tuple[KVSpan, int, int, int]],
        layer: int,
        scale: float,
    ) -> torch.Tensor:
        """Attention output [1, T, heads, head_dim] of every packed row."""
        out = q.new_empty((1, q.shape[2], q.shape[1], q.shape[3]))
        own_lse: list[torch.Tensor] = []
        for r in rows:
            s, e = r.start, r.start + r.length
            o, lse = self._flash(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], 0.0, True, scale=scale)
            out[:, s:e] = o.transpose(1, 2)
            own_lse.append(lse)
        if not runs:
            return out
        lse_all = torch.cat(own_lse, dim=2)  # [1, heads, T]: what each query has attended to so far
        for span, n, s, e in runs:
            # All queries of adjacent rows that continue this span, against its first n keys: no
            # mask (every query comes after the whole span), one call, the span never copied.
            o_p, lse_p = self._flash(
                q[:, :, s:e],
                span.keys[layer][:, :, :n],
                span.values[layer][:, :, :n],
                0.0,
                False,
                scale=scale,
            )
            lse_seen = lse_all[:, :, s:e]
            total = torch.logaddexp(lse_p, lse_seen)
            w_p = torch.exp(lse_p - total).to(o_p.dtype).transpose(1, 2).unsqueeze(-1)
            w_seen = torch.exp(lse_seen - total).to(o_p.dtype).transpose(1, 2).unsqueeze(-1)
            out[:, s:e] = out[:, s:e] * w_seen + o_p.transpose(1, 2) * w_p
            lse_all[:, :, s:e] = total
        return out


class FusedLinear:
    """`linear(x)` of an nn.Linear, optionally followed by SiLU, a product with `mul` or a
    sum with `add`; on oneDNN the follow-up runs inside the matmul (as torch.compile's
    CPU backend fuses it), which saves a pass over the output and about a tenth of
    the scoring time on these CPUs. Elsewhere: the same in plain torch."""

    def __init__(self, *, onednn: bool) -> None:
        self.onednn = onednn

    def __call__(
        self,
        x: torch.Tensor,
        linear: torch.nn.Linear,
        *,
        silu: bool = False,
        mul: torch.Tensor | None = None,
        add: torch.Tensor | None = None,
    ) -> torch.Tensor:
        w, b = linear.weight, linear.bias
        if self.onednn:
            ops = torch.ops.mkldnn._linear_pointwise
            if mul is not None:
                return ops.binary(x, mul, w, b, "mul")  # type: ignore[no-any-return]
            if add is not None:
                return ops.binary(x, add, w, b, "add")  # type: ignore[no-any-return]
            return ops(x, w, b, "swish" if silu else "none", [], "")  # type: ignore[no-any-return]
        y = torch.nn.functional.linear(x, w, b)
        if silu:
            return torch.nn.functional.silu(y, inplace=True)
        if mul is not None:
            return y.mul_(mul)
        if add is not None:
            return y.add_(add)
        return y


def onednn_linear_works() -> bool:
    """Whether this torch has oneDNN's fused linear ops and they agree with F.linear."""
    try:
        if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
            return False
        g = torch.Generator().manual_seed(0)
        x, w, other = (torch.randn(shape, generator=g) for shape in ((3, 8), (5, 8), (3, 5)))
        plain, fused = FusedLinear(onednn=False), FusedLinear(onednn=True)
        layer = torch.nn.Linear(8, 5, bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
            return all(
                torch.allclose(fused(x, layer, **kw), plain(x, layer, **kw), atol=1e-5)
                for kw in ({}, {"silu": True}, {"mul": other}, {"add": other})
            )
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _chunks(lengths: Sequence[int], limit: int) -> list[list[int]]:
    """Consecutive indices in runs of at most `limit` tokens (a longer row alone)."""
    out: list[list[int]] = []
    total = 0
    for i, n in enumerate(lengths):
        if not out or total + n > limit:
            out.append([])
            total = 0
        out[-1].append(i)
        total += n
    return out


def _context_runs(rows: list[_Row]) -> list[tuple[KVSpan, int, int, int]]:
    """(span, positions used, start, end): runs of adjacent rows whose contexts hold the
    same span slice, each attended in one call."""
    runs: list[tuple[KVSpan, int, int, int]] = []
    open_runs: dict[tuple[int, int], list[Any]] = {}
    for r in rows:
        for span, n in r.context:
            key = (id(span), n)
            run = open_runs.get(key)
            if run is not None and run[3] == r.start:
                run[3] = r.start + r.length
                continue
            if run is not None:
                runs.append((run[0], run[1], run[2], run[3]))
            open_runs[key] = [span, n, r.start, r.start + r.length]
    runs += [(run[0], run[1], run[2], run[3]) for run in open_runs.values()]
    return runs
