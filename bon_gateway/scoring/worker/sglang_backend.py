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

The start-up probe (`_check_probe`):
- outputs have the checkpoint's label count;
- the formula: newer SGLang returns, with `return_pooled_hidden_states: true`, each
  item's `pooled_hidden_state` (the last token's hidden state before the task head;
  tokenizer_manager.py adds it to the item; entrypoints' ScoreResult documents it).
  For a sequence classifier the worker reads the checkpoint's `score` head (that
  tensor only) and the probe's score must equal `score(pooled_hidden_state)`: a server
  that activates (sigmoid/softmax), or runs another head, fails here. Servers that
  refuse the field (older SGLang) or do not return it (Qwen2ForRewardModel pools
  after its head) are checked by the rest alone, and start-up logs `formula=unchecked`;
- the probe scored alone equals the probe scored in one request with another
  candidate (SGLang batches what one request holds: a pooling or padding mix-up
  shows here);
- with two labels or more the outputs are not a probability distribution.

The real-SGLang part of the tests did not run on the machines this was built on
(no GPU; SGLang's CPU build was not installed); tests/fakes/sglang_reward.py
reproduces the protocol above with the reference forward.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import httpx
import torch

from bon_gateway.balancer import Endpoint
from bon_gateway.config import RewardModelConfig
from bon_gateway.logs import log_phase
from bon_gateway.scoring.worker.adapters import Adapter
from bon_gateway.scoring.worker.adapters.checkpoint import read_tensors
from bon_gateway.scoring.worker.adapters.qwen2_prm import Qwen2ProcessRewardAdapter
from bon_gateway.scoring.worker.adapters.qwen2_rm import Qwen2RewardModelAdapter
from bon_gateway.scoring.worker.adapters.sequence_classification import SequenceClassificationAdapter
from bon_gateway.scoring.worker.http_backend import BackendCheckFailed, BadReply, HttpScoringBackend

__all__ = ["SglangBackend", "sglang_task"]

log = logging.getLogger("bon_gateway.worker")

#: the probe alone and in a group must agree this closely (fp32 on either side)
PROBE_TOLERANCE = 1e-4
#: our head on the server's hidden state vs the server's score: relative, loose enough
#: for a bf16 server (its head runs in bf16), far tighter than sigmoid vs raw (>= 0.25 off)
FORMULA_TOLERANCE = 2e-2


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

    def __init__(self, entry: RewardModelConfig, adapter: Adapter) -> None:
        super().__init__(entry, adapter)
        self._head: dict[str, torch.Tensor] | None = None  # the checkpoint's score head, for the probe

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
            try:
                alone, hidden = await self._request(
                    endpoint, [first.ids], [first.positions], pooled_hidden=True
                )
            except httpx.HTTPStatusError as err:
                if not 400 <= err.response.status_code < 500:
                    raise
                # An SGLang without the field: the checks below still run.
                alone, hidden = await self._request(endpoint, [first.ids], [first.positions])
            together, _ = await self._request(
                endpoint, [first.ids, other.ids], [first.positions, other.positions]
            )
        except httpx.HTTPStatusError as err:
            raise BackendCheckFailed(
                f"reward model {where}: the server refuses /classify "
                f"({err.response.status_code}: {err.response.text[:200]})"
            ) from None
        except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as err:
            raise BackendCheckFailed(f"reward model {where}: the probe failed ({err})") from None
        got = alone[0]
        self._check_labels(got, where)
        checked = self._check_formula(got, hidden[0], where)
        log_phase(log, "backend-probe", model=self.entry.name, server=endpoint.label, formula=checked)
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

    def _check_formula(self, got: torch.Tensor, hidden: torch.Tensor | None, where: str) -> str:
        """ "checked" when the server's score equals our head on its pooled hidden state
        (BackendCheckFailed when not), "unchecked" when it gave no hidden state or the
        checkpoint has no plain `score` head to read."""
        if hidden is None or type(self.adapter) is not SequenceClassificationAdapter:
            return "unchecked"
        if self._head is None:
            try:
                self._head = read_tensors(self.entry.path, keep=lambda k: k in ("score.weight", "score.bias"))
            except (OSError, ValueError):  # no safetensors weights beside the config: nothing to read
                self._head = {}
        weight = self._head.get("score.weight")
        if weight is None or weight.shape != (self.num_labels, hidden.shape[-1]):
            return "unchecked"
        bias = self._head.get("score.bias")
        expected = torch.nn.functional.linear(
            hidden.float(), weight.float(), None if bias is None else bias.float()
        )
        if not torch.allclose(got, expected, rtol=FORMULA_TOLERANCE, atol=FORMULA_TOLERANCE):
            raise BackendCheckFailed(
                f"reward model {where}: the server scores the probe {got.flatten().tolist()[:4]}, our "
                f"formula (the checkpoint's score head, raw, on the server's pooled hidden state) "
                f"{expected.flatten().tolist()[:4]}: an activated server or another head"
            )
        return "checked"

    async def _call(
        self, endpoint: Endpoint, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        return (await self._request(endpoint, seqs, positions))[0]

    async def _request(
        self,
        endpoint: Endpoint,
        seqs: Sequence[Sequence[int]],
        positions: Sequence[Sequence[int]],
        *,
        pooled_hidden: bool = False,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Raw scores [1, labels] per sequence, and (asked for) each one's pooled hidden state."""
        # SGLang pools the last token: each sequence ends at its pooled position.
        inputs = [list(s[: p[-1] + 1]) for s, p in zip(seqs, positions, strict=True)]
        # EmbeddingReqInput has no `model` field: only the ids go (a list of lists: a batch).
        body: dict[str, Any] = {"input_ids": inputs}
        if pooled_hidden:
            body["return_pooled_hidden_states"] = True
        reply = await self.client.post(f"{endpoint.url}/classify", json=body)
        reply.raise_for_status()
        data = reply.json()
        if isinstance(data, dict):  # one sequence is answered as one object
            data = [data]
        if not isinstance(data, list) or len(data) != len(inputs):
            raise BadReply(f"the server answered {type(data).__name__} for {len(inputs)} inputs")
        out: list[torch.Tensor] = []
        hidden: list[torch.Tensor | None] = []
        for item in data:
            values = torch.tensor(item["embedding"], dtype=torch.float32).flatten()
            out.append(values.unsqueeze(0))  # one pooled position: [1, labels]
            state = item.get("pooled_hidden_state")
            hidden.append(None if state is None else torch.tensor(state, dtype=torch.float32).flatten())
        return out, hidden


def _is_distribution(row: torch.Tensor) -> bool:
    return bool((row >= 0).all() and (row <= 1).all() and abs(float(row.sum()) - 1.0) < 1e-4)
