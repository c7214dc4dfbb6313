"""Scoring on vLLM pooling servers: a reward model entry with backend = "vllm".

What the HTTP backends share (sequences built by our adapter and sent as token
ids, one request per group, start-up model check, balancing, ejection, per-server
figures) is in http_backend.py; this module is vLLM's protocol:

- Outcome sequence classifiers go to `POST /classify`: vLLM pools the last token,
  so each sequence is sent up to its pooled position (keys and values before it do
  not depend on what follows: the same score).
- Token classifiers (Qwen2.5-Math-RM, Qwen2.5-Math-PRM) go to `POST /pooling` with
  `task: token_classify`: vLLM returns every token's output (or only the
  separators' when the server was started with a `step_tag_id`), and the rows at
  the adapter's positions are used.
- Raw head outputs: `use_activation: false`.

The start-up probe (`_check_probe`): the server answers the task, its outputs have
the checkpoint's label count, and `use_activation: false` really gives raw outputs
(the activated answer must be the sigmoid/softmax of the raw one): a server that
ignores it would silently mix sigmoid and raw scores.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, ClassVar

import httpx
import torch

from bon_gateway.balancer import Endpoint
from bon_gateway.scoring.worker.adapters import Adapter
from bon_gateway.scoring.worker.adapters.qwen2_prm import Qwen2ProcessRewardAdapter
from bon_gateway.scoring.worker.adapters.qwen2_rm import Qwen2RewardModelAdapter
from bon_gateway.scoring.worker.adapters.sequence_classification import SequenceClassificationAdapter
from bon_gateway.scoring.worker.http_backend import BackendCheckFailed, BadReply, HttpScoringBackend

__all__ = ["VllmBackend", "vllm_task"]


class RowsMismatch(BadReply):
    """token_classify rows that are neither every token's nor the separators' (a server
    whose step_tag_id is another token)."""


def vllm_task(adapter: Adapter) -> str:
    """The vLLM pooling task that gives this adapter's head outputs; ValueError for the
    families vLLM does not compute the same way (judges, causal PRMs, InternLM2, Jamba)."""
    if type(adapter) is SequenceClassificationAdapter:
        return "classify"
    if isinstance(adapter, Qwen2RewardModelAdapter | Qwen2ProcessRewardAdapter):
        return "token_classify"
    raise ValueError(
        f'backend = "vllm" scores sequence classifiers and the Qwen2 RM/PRM layouts; '
        f'{adapter.architecture} ({adapter.entry.kind}) needs backend = "workers"'
    )


class VllmBackend(HttpScoringBackend):
    server_name: ClassVar[str] = "vLLM"

    @staticmethod
    def task_for(adapter: Adapter) -> str:
        return vllm_task(adapter)

    async def _check_probe(self, endpoint: Endpoint, where: str) -> None:
        enc, _ = self.probe_encodings()
        try:
            raw = await self._request(endpoint, [enc.ids], [enc.positions], activation=False)
            activated = await self._request(endpoint, [enc.ids], [enc.positions], activation=True)
        except httpx.HTTPStatusError as err:
            raise BackendCheckFailed(
                f"reward model {where}: the server refuses task {self.task!r} "
                f"({err.response.status_code}: {err.response.text[:200]})"
            ) from None
        except RowsMismatch as err:
            hint = ""
            sep = getattr(self.adapter, "sep_id", None)
            if sep is not None:  # vLLM's Qwen2 PRM reads step_tag_id 151651 unless told otherwise
                flag = json.dumps({"step_tag_id": sep})
                hint = f"; start it with --pooler-config '{flag}' (this checkpoint's separator)"
            raise BackendCheckFailed(
                f"reward model {where}: the server pools other tokens than the separators ({err}){hint}"
            ) from None
        except (httpx.HTTPError, KeyError, TypeError, ValueError) as err:
            raise BackendCheckFailed(f"reward model {where}: the probe failed ({err})") from None
        got = raw[0]
        self._check_labels(got, where)
        expected = torch.sigmoid(got) if self.num_labels == 1 else torch.softmax(got, dim=-1)
        if torch.allclose(got, activated[0], atol=1e-6) or not torch.allclose(
            expected, activated[0], atol=1e-3
        ):
            raise BackendCheckFailed(
                f"reward model {where}: use_activation=false does not give raw outputs "
                f"(raw {got.flatten().tolist()[:4]}, activated {activated[0].flatten().tolist()[:4]}): "
                "scores would mix activated and raw values"
            )

    async def _call(
        self, endpoint: Endpoint, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        return await self._request(endpoint, seqs, positions, activation=False)

    async def _request(
        self,
        endpoint: Endpoint,
        seqs: Sequence[Sequence[int]],
        positions: Sequence[Sequence[int]],
        *,
        activation: bool,
    ) -> list[torch.Tensor]:
        if self.task == "classify":
            # vLLM pools the last token: each sequence ends at its pooled position.
            inputs = [list(s[: p[-1] + 1]) for s, p in zip(seqs, positions, strict=True)]
            body: dict[str, Any] = {"model": self.model, "input": inputs, "use_activation": activation}
            reply = await self.client.post(f"{endpoint.url}/classify", json=body)
            reply.raise_for_status()
            data = sorted(reply.json()["data"], key=lambda d: d["index"])
            return [torch.tensor([d["probs"]], dtype=torch.float32) for d in data]
        inputs = [list(s[: max(p) + 1]) for s, p in zip(seqs, positions, strict=True)]
        body = {"model": self.model, "task": "token_classify", "input": inputs, "use_activation": activation}
        reply = await self.client.post(f"{endpoint.url}/pooling", json=body)
        reply.raise_for_status()
        data = sorted(reply.json()["data"], key=lambda d: d["index"])
        out = []
        for item, ids, where in zip(data, inputs, positions, strict=True):
            rows = torch.tensor(item["data"], dtype=torch.float32)
            if rows.dim() == 1:
                rows = rows.unsqueeze(-1)
            if rows.shape[0] == len(ids):  # every token's output: take the adapter's positions
                out.append(rows[list(where)])
            elif rows.shape[0] == len(where):  # a step_tag_id server: the separators' only
                out.append(rows)
            else:
                raise RowsMismatch(
                    f"the server returned {rows.shape[0]} rows for {len(ids)} tokens, {len(where)} positions"
                )
        return out
