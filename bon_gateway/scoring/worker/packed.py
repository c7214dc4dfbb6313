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
- rows that continue a shared prompt (a request's candidates) see the prompt's
  keys and values through a second attention call per prompt, made once for
  the queries of all its rows together, without copying the prompt's cache
  per row; the two partial results are merged exactly through their
  log-sum-exp ("cascade" attention).

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


@dataclass(slots=True)
class PromptCache:
    """A prompt run once: its last hidden states and, per layer, its keys and values
    [1, kv_heads, prompt, head_dim] (after rotary)."""

    hidden: torch.Tensor  # [prompt, hidden]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return int(self.hidden.shape[0])


@dataclass(slots=True)
class _Row:
    start: int  # offset in the packed stream
    length: int
    prompt: int  # index into the run's prompts, -1: none


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
    def prompt(self, ids: Sequence[int]) -> PromptCache:
        """Run one prompt alone, keeping its keys and values for the rows that continue it."""
        cache = PromptCache(hidden=torch.empty(0), keys=[], values=[])
        cache.hidden = self._run([list(ids)], [-1], [], keep=cache)
        return cache

    @torch.inference_mode()
    def run(
        self, rows: Sequence[Sequence[int]], prompt_of: Sequence[int], prompts: Sequence[PromptCache]
    ) -> list[torch.Tensor]:
        """Last hidden states of each row, [len(row), hidden].

        Row i continues `prompts[prompt_of[i]]` (its positions start after that
        prompt) or stands alone when prompt_of[i] is -1. Rows of one prompt should
        be adjacent: their prompt attention is then one call over a contiguous slice.
        Rows run in packs of at most `chunk_tokens` tokens (a longer row alone).
        """
        out: list[torch.Tensor] = []
        for part in _chunks([len(r) for r in rows], self.chunk_tokens):
            hidden = self._run(
                [list(rows[i]) for i in part], [prompt_of[i] for i in part], list(prompts), keep=None
            )
            k = 0
            for i in part:
                out.append(hidden[k : k + len(rows[i])])
                k += len(rows[i])
        return out

    def _run(
        self,
        rows: list[list[int]],
        prompt_of: list[int],
        prompts: list[PromptCache],
        keep: PromptCache | None,
    ) -> torch.Tensor:
        bb = self.backbone
        device = bb.embed_tokens.weight.device
        packed, start = [], 0
        positions: list[torch.Tensor] = []
        for ids, p in zip(rows, prompt_of, strict=True):
            first = prompts[p].length if p >= 0 else 0
            packed.append(_Row(start, len(ids), p))
            positions.append(torch.arange(first, first + len(ids)))
            start += len(ids)
        flat = torch.tensor([t for ids in rows for t in ids], dtype=torch.long, device=device)
        pos = torch.cat(positions).to(device).unsqueeze(0)
        h = bb.embed_tokens(flat.unsqueeze(0))  # [1, T, hidden]
        cos, sin = bb.rotary_emb(h, pos)
        h = h[0]
        tokens = h.shape[0]
        spans = _prompt_spans(packed)
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
            if keep is not None:
                keep.keys.append(k.contiguous())
                keep.values.append(v.contiguous())
            o = self._attend(q, k, v, packed, spans, prompts, index, attn.scaling)
            h = linear(o.view(tokens, -1), attn.o_proj, add=h)
            x = layer.post_attention_layernorm(h)
            mlp = layer.mlp
            if self._gated_silu:
                gate = linear(x, mlp.gate_proj, silu=True)
                h = linear(linear(x, mlp.up_proj, mul=gate), mlp.down_proj, add=h)
            else:
                h = h + mlp(x)
        hidden: torch.Tensor = bb.norm(h)
        return hidden

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rows: list[_Row],
        spans: list[tuple[int, int, int]],
        prompts: list[PromptCache],
        layer: int,
        scale: float,
    ) -> torch.Tensor:
        """Attention output [1, T, heads, head_dim] of every packed row."""
        out = q.new_empty((1, q.shape[2], q.shape[1], q.shape[3]))
        own_lse: dict[int, torch.Tensor] = {}
        for i, r in enumerate(rows):
            s, e = r.start, r.start + r.length
            o, lse = self._flash(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], 0.0, True, scale=scale)
            out[:, s:e] = o.transpose(1, 2)
            if r.prompt >= 0:
                own_lse[i] = lse
        for p, s, e in spans:
            # All queries that continue prompt p, against its keys: no mask (every query is
            # after the whole prompt), one call, the prompt's cache never copied per row.
            cache = prompts[p]
            o_p, lse_p = self._flash(
                q[:, :, s:e], cache.keys[layer], cache.values[layer], 0.0, False, scale=scale
            )
            lse_own = torch.cat([own_lse[i] for i, r in enumerate(rows) if s <= r.start < e], dim=2)
            total = torch.logaddexp(lse_p, lse_own)
            w_p = torch.exp(lse_p - total).to(o_p.dtype).transpose(1, 2).unsqueeze(-1)
            w_own = torch.exp(lse_own - total).to(o_p.dtype).transpose(1, 2).unsqueeze(-1)
            out[:, s:e] = out[:, s:e] * w_own + o_p.transpose(1, 2) * w_p
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


def _prompt_spans(rows: list[_Row]) -> list[tuple[int, int, int]]:
    """(prompt, start, end) runs of adjacent rows that continue the same prompt."""
    spans: list[tuple[int, int, int]] = []
    for r in rows:
        if r.prompt < 0:
            continue
        if spans and spans[-1][0] == r.prompt and spans[-1][2] == r.start:
            spans[-1] = (r.prompt, spans[-1][1], r.start + r.length)
        else:
            spans.append((r.prompt, r.start, r.start + r.length))
    return spans
