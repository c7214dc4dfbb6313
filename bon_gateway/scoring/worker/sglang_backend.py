"""Scoring on SGLang reward-model servers: a reward model entry with backend = "sglang".

What the HTTP backends share is in http_backend.py; this module is SGLang's
protocol, as SGLang's own code defines it (sgl-project/sglang, read 2026-12):

- `python -m sglang.launch_server --model-path PATH --is-embedding` serves a reward
  model (docs: supported_models/reward_models). Its native `POST /classify`
  (entrypoints/http_server.py, `classify_request`) takes an `EmbeddingReqInput`
  (managers/io_struct.py): `text` or `input_ids`, one sequence or a list of them,
  and answers like `/encode`: for a list, a list in input order of
  `{"embedding": [...], "meta_info": {...}}` (tokenizer_manager.py, the
  BatchEmbeddingOutput branch). We send `input_ids` (token ids our adapter built, so
  SGLang adds no BOS and applies no template), one list per group.
- The reward classes pool the last token and return the head's raw output, no
  sigmoid or softmax, and there is no switch for one (models/llama_reward.py
  LlamaForSequenceClassification: `Pooler(LAST, normalize=False)` then `score`;
  models/qwen2_rm.py Qwen2ForRewardModel: the MLP head, then the LAST pooler;
  the Gemma2/Qwen2/Qwen3 classification models likewise). So each sequence is sent
  up to its pooled position, and `embedding` has one value per label.
- Process reward models: upstream SGLang has no token-level (step) pooling and no
  Qwen2ForProcessRewardModel (only a fork has one, which returns the softmax at
  the last token: no step rewards). An entry with a PRM fails at start-up, saying
  so, instead of scoring steps wrongly. Judges and causal PRMs (our generative
  formulas) need our workers too.
- `GET /get_model_info` says `is_generation`: a server started without
  `--is-embedding` has no pooled outputs, and start-up says to add it.
  `/v1/models` lists the served name and `max_model_len`; `/health` answers 200.

The start-up probe (`_check_probe`): outputs have the checkpoint's label count; the
probe scored alone equals the probe scored in one request with another candidate
(SGLang batches what one request holds: a pooling or padding mix-up shows here);
and with two labels or more the outputs are not a probability distribution (an
activated server would mix softmax and raw scores). With one label a sigmoid
cannot be told from a raw logit without the weights; SGLang's reward classes apply
none (above).

The real-SGLang part of the tests did not run on the machines this was built on
(no GPU; SGLang's CPU build was not installed); tests/fakes/sglang_reward.py
reproduces the protocol above with the reference forward.
"""

from __future__ import annotations

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

__all__ = ["SglangBackend", "sglang_task"]

#: the probe alone and in a group must agree this closely (fp32 on either side)
PROBE_TOLERANCE = 1e-4


def sglang_task(adapter: Adapter) -> str:
    """ "classify" for the families SGLang scores as our formula does (the last token's
    raw head output); ValueError, one line, for the others."""
    if isinstance(adapter, Qwen2ProcessRewardAdapter) or adapter.kind == "process":
        raise ValueError(
            f"SGLang cannot serve {adapter.architecture} as a process reward model: its reward "
            'models pool the last token only (no step rewards); use backend = "vllm" or "workers"'
        )
    if type(adapter) is SequenceClassificationAdapter or isinstance(adapter, Qwen2RewardModelAdapter):
        return "classify"
    raise ValueError(
        f'backend = "sglang" scores sequence classifiers and Qwen2ForRewardModel; '
        f'{adapter.architecture} ({adapter.entry.kind}) needs backend = "workers"'
    )


class SglangBackend(HttpScoringBackend):
    server_name: ClassVar[str] = "SGLang"

    @staticmethod
    def task_for(adapter: Adapter) -> str:
        return sglang_task(adapter)

    async def _check_probe(self, endpoint: Endpoint, where: str) -> None:
        try:
            reply = await self.client.get(f"{endpoint.url}/get_model_info", timeout=10)
            reply.raise_for_status()
            generation = reply.json().get("is_generation")
        except (httpx.HTTPError, ValueError, AttributeError) as err:
            raise BackendCheckFailed(
                f"reward model {where}: no SGLang server answers /get_model_info ({err})"
            ) from None
        if generation is not False:
            raise BackendCheckFailed(
                f"reward model {where}: the SGLang server runs a generation model "
                f"(is_generation={generation}); start it with --is-embedding"
            )
        first, other = self.probe_encodings()
        try:
            alone = await self._call(endpoint, [first.ids], [first.positions])
            together = await self._call(endpoint, [first.ids, other.ids], [first.positions, other.positions])
        except httpx.HTTPStatusError as err:
            raise BackendCheckFailed(
                f"reward model {where}: the server refuses /classify "
                f"({err.response.status_code}: {err.response.text[:200]})"
            ) from None
        except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as err:
            raise BackendCheckFailed(f"reward model {where}: the probe failed ({err})") from None
        got = alone[0]
        if got.shape[-1] != self.num_labels:
            raise BackendCheckFailed(
                f"reward model {where}: the server's head has {got.shape[-1]} outputs, "
                f"the checkpoint {self.num_labels}"
            )
        if not torch.allclose(got, together[0], atol=PROBE_TOLERANCE):
            raise BackendCheckFailed(
                f"reward model {where}: the probe scores {got.flatten().tolist()[:4]} alone but "
                f"{together[0].flatten().tolist()[:4]} in a group: the server pools other positions"
            )
        if self.num_labels > 1 and all(_is_distribution(t) for t in together):
            raise BackendCheckFailed(
                f"reward model {where}: the server returns probabilities "
                f"({got.flatten().tolist()[:4]}), not raw outputs: scores would mix activated and raw values"
            )

    async def _call(
        self, endpoint: Endpoint, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        # SGLang pools the last token: each sequence ends at its pooled position.
        inputs = [list(s[: p[-1] + 1]) for s, p in zip(seqs, positions, strict=True)]
        # EmbeddingReqInput has no `model` field: only the ids go (a list of lists: a batch).
        body: dict[str, Any] = {"input_ids": inputs}
        reply = await self.client.post(f"{endpoint.url}/classify", json=body)
        reply.raise_for_status()
        data = reply.json()
        if isinstance(data, dict):  # one sequence is answered as one object
            data = [data]
        if not isinstance(data, list) or len(data) != len(inputs):
            raise BadReply(f"the server answered {type(data).__name__} for {len(inputs)} inputs")
        out = []
        for item in data:
            values = torch.tensor(item["embedding"], dtype=torch.float32).flatten()
            out.append(values.unsqueeze(0))  # one pooled position: [1, labels]
        return out


def _is_distribution(row: torch.Tensor) -> bool:
    return bool((row >= 0).all() and (row <= 1).all() and abs(float(row.sum()) - 1.0) < 1e-4)
