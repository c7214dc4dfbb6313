"""Features for the verifier's head: exactly what the worker computes before `score`.

The worker formats [user: question, assistant: solution] with the model's chat
template (`Tokenizing.chat_tokens` and `fit`, one BOS), runs the backbone, and
`LlamaForSequenceClassification` reads the final-norm hidden state at the rightmost
non-pad token (`rightmost_non_pad`; SmolLM2's pad is `<|im_end|>`, so that is the
"\\n" ChatML writes after it). Here the same ids go through the plain transformers
backbone, fp32, one unpadded sequence at a time: the reference the worker's scores
are tested against. Every layer's hidden state at that position is kept (row 30 is
the final-norm state the head reads; rows 0-29 are the residual stream before each
layer's output is normed), so other layers can be tried without a second pass.

Extraction over the ~3,500 training solutions takes ~25 minutes on two CPU cores, so
it is cached in shards under a directory keyed by everything that changes the
numbers (data file, GGUF, transformers and torch versions); an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from bon_gateway.scoring.worker.adapters.base import rightmost_non_pad
from bon_gateway.scoring.worker.formatting import Tokenizing
from bon_gateway.smollm2 import smollm2_gguf_path
from bon_gateway.types import Message
from bon_gateway.verifier.data import LabelledSolution, file_sha256

#: bump when the way features are computed changes (invalidates every cache)
FEATURE_VERSION = 1
SHARD_SIZE = 128  # solutions per cache file (a multiple of 4: whole problems)
FINAL_LAYER = -1  # the final-norm hidden state (what the head reads)

Floats = npt.NDArray[np.float32]


class Featurizer:
    """SmolLM2-135M from the GGUF (dequantized to fp32), with the worker's own tokenization."""

    def __init__(self, gguf: Path | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = gguf or smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        self.backbone: Any = model.model.eval()
        self.pad_token_id: int | None = tokenizer.pad_token_id
        # The worker's own formatting (Adapter.__init__ builds the same object).
        self.tok = Tokenizing(
            tokenizer, max_length=int(model.config.max_position_embeddings), truncate_prompt=False
        )

    def encode(self, question: str, solution: str) -> list[int]:
        """The ids the worker scores for [user: question, assistant: solution]."""
        tokens = self.tok.chat_tokens((Message("user", question),), solution)
        return self.tok.fit(tokens, [rightmost_non_pad(tokens.ids, self.pad_token_id)], what="solution").ids

    @torch.inference_mode()
    def hidden_states(self, ids: Sequence[int]) -> Floats:
        """[layers + 1, hidden] at the pooled position; the last row is the final-norm state."""
        out = self.backbone(input_ids=torch.tensor([list(ids)]), output_hidden_states=True, use_cache=False)
        at = rightmost_non_pad(ids, self.pad_token_id)
        states = torch.stack([h[0, at] for h in out.hidden_states])
        # transformers' last hidden_states entry is the normed output (last_hidden_state).
        assert torch.equal(states[-1], out.last_hidden_state[0, at])
        result: Floats = states.float().numpy()
        return result

    @torch.inference_mode()
    def shared_prompt_hidden_states(self, sequences: Sequence[Sequence[int]]) -> list[Floats]:
        """`hidden_states` of several sequences that share a prompt (a problem's solutions),
        with the shared prefix run once: its key/value cache is reused by each sequence in
        turn (one unpadded row each, positions continuing), then cropped back. Equal to
        `hidden_states` of each sequence within float rounding (~1e-6; the script checks it);
        ~1.7x fewer tokens for four GSM8K solutions."""
        from transformers import DynamicCache

        shared = _common_prefix_length(sequences)
        shared = min(shared, min(len(ids) for ids in sequences) - 1)  # every row keeps one token
        cache = DynamicCache(config=self.backbone.config)
        prefix_out = self.backbone(
            input_ids=torch.tensor([list(sequences[0][:shared])]),
            past_key_values=cache,
            use_cache=True,
            output_hidden_states=True,
        )
        results: list[Floats] = []
        for ids in sequences:
            at = rightmost_non_pad(ids, self.pad_token_id)
            suffix = list(ids[shared:])
            out = self.backbone(
                input_ids=torch.tensor([suffix]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                position_ids=torch.arange(shared, len(ids)).unsqueeze(0),
                past_key_values=cache,
                use_cache=True,
                output_hidden_states=True,
            )
            cache.crop(-len(suffix))
            assert cache.get_seq_length() == shared
            if at >= shared:
                states = torch.stack([h[0, at - shared] for h in out.hidden_states])
            else:  # pooled inside the prefix (all pad after it): read the prefix pass
                states = torch.stack([h[0, at] for h in prefix_out.hidden_states])
            results.append(states.float().numpy())
        return results


def _common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    first = sequences[0]
    length = min(len(ids) for ids in sequences)
    for i in range(length):
        if any(ids[i] != first[i] for ids in sequences):
            return i
    return length


@dataclass(frozen=True, slots=True)
class Features:
    hidden: Floats  # [n, layers + 1, hidden]
    labels: npt.NDArray[np.bool_]  # is_correct
    problems: npt.NDArray[np.int64]  # line index of each solution's problem
    sources: npt.NDArray[np.int64]  # index into SOURCE_MODELS
    lengths: npt.NDArray[np.int64]  # tokens of each sequence

    @property
    def final(self) -> Floats:
        """What the head reads: the final-norm hidden state at the pooled token."""
        final: Floats = self.hidden[:, FINAL_LAYER, :]
        return final


def cache_key(data_file: Path, gguf: Path) -> str:
    import transformers

    parts = [
        f"v{FEATURE_VERSION}",
        file_sha256(data_file),
        gguf.name,
        str(gguf.stat().st_size),
        transformers.__version__,
        torch.__version__,
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def extract_features(
    solutions: Sequence[LabelledSolution],
    cache_dir: Path,
    *,
    featurizer: Featurizer | None = None,
    progress: bool = True,
) -> Features:
    """Features of `solutions` (cached in shards under cache_dir; resumes a killed run)."""
    from tqdm import tqdm  # type: ignore[import-untyped]

    cache_dir.mkdir(parents=True, exist_ok=True)
    starts = range(0, len(solutions), SHARD_SIZE)
    missing = [s for s in starts if _shard_rows(cache_dir, s) < len(solutions[s : s + SHARD_SIZE])]
    done = len(solutions) - sum(len(solutions[s : s + SHARD_SIZE]) for s in missing)
    if missing and featurizer is None:
        featurizer = Featurizer()
    started = time.perf_counter()
    bar = tqdm(total=len(solutions), initial=done, unit="solution", disable=not progress)
    for start in missing:
        chunk = solutions[start : start + SHARD_SIZE]
        assert featurizer is not None
        rows, lengths = [], []
        for group in _by_problem(chunk):
            sequences = [featurizer.encode(item.question, item.solution) for item in group]
            rows += featurizer.shared_prompt_hidden_states(sequences)
            lengths += [len(ids) for ids in sequences]
            bar.update(len(group))
        tmp = cache_dir / f"shard-{start:05d}.tmp.npz"
        np.savez(
            tmp,
            hidden=np.stack(rows),
            problems=np.array([s.problem for s in chunk]),
            sources=np.array([s.source for s in chunk]),
            lengths=np.array(lengths),
        )
        tmp.rename(cache_dir / f"shard-{start:05d}.npz")  # whole shards only
    bar.close()
    if missing:
        print(
            f"extracted {len(solutions) - done} solutions in {time.perf_counter() - started:.0f} s",
            flush=True,
        )
    return _load_shards(solutions, cache_dir, starts)


def _by_problem(chunk: Sequence[LabelledSolution]) -> list[list[LabelledSolution]]:
    """Consecutive solutions of one problem together (they share the prompt)."""
    groups: list[list[LabelledSolution]] = []
    for item in chunk:
        if groups and groups[-1][0].problem == item.problem:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _shard_rows(cache_dir: Path, start: int) -> int:
    path = cache_dir / f"shard-{start:05d}.npz"
    if not path.is_file():
        return 0
    with np.load(path) as shard:
        return len(shard["problems"])


def _load_shards(solutions: Sequence[LabelledSolution], cache_dir: Path, starts: range) -> Features:
    hidden, problems, sources, lengths = [], [], [], []
    for start in starts:
        rows = len(solutions[start : start + SHARD_SIZE])  # a shorter list uses a shard's head
        with np.load(cache_dir / f"shard-{start:05d}.npz") as shard:
            hidden.append(shard["hidden"][:rows])
            problems.append(shard["problems"][:rows])
            sources.append(shard["sources"][:rows])
            lengths.append(shard["lengths"][:rows])
    features = Features(
        hidden=np.concatenate(hidden).astype(np.float32),
        labels=np.array([s.is_correct for s in solutions]),
        problems=np.concatenate(problems).astype(np.int64),
        sources=np.concatenate(sources).astype(np.int64),
        lengths=np.concatenate(lengths).astype(np.int64),
    )
    # The cache must hold these solutions, in this order.
    if features.problems.tolist() != [s.problem for s in solutions] or features.sources.tolist() != [
        s.source for s in solutions
    ]:
        raise RuntimeError(f"feature cache {cache_dir} does not match the solutions; delete it")
    return features
