"""Scoring on vLLM pooling servers: a reward model entry with backend = "vllm".

The worker keeps everything that decides *what* is scored: the adapter builds each
sequence exactly as for its own forward (chat template applied once, step
separators placed by construction, the reward token, truncation) and knows where
the head reads it. vLLM only runs the model: it gets token ids (so it adds no BOS
and re-tokenizes nothing) and returns raw head outputs (`use_activation: false`),
and the adapter turns them into rewards with the same formula as for our forward.

- Outcome sequence classifiers go to `POST /classify`: vLLM pools the last token,
  so each sequence is sent up to its pooled position (keys and values before it do
  not depend on what follows: the same score).
- Token classifiers (Qwen2.5-Math-RM, Qwen2.5-Math-PRM) go to `POST /pooling` with
  `task: token_classify`: vLLM returns every token's output (or only the
  separators' when the server was started with a `step_tag_id`), and the rows at
  the adapter's positions are used.
- A group's candidates go in one request, so the server's prefix cache and batch
  see the shared prompt together.

Start-up checks each server (`check`): it serves the model, answers the task, its
outputs have the checkpoint's label count, and `use_activation: false` really gives
raw outputs (the activated answer must be the sigmoid/softmax of the raw one): a
server that ignores it would silently mix sigmoid and raw scores.

Servers are balanced by least outstanding requests; one that fails a call (connection,
5xx, timeout) is ejected for a cooldown and the call moves to the next; ejected
servers are probed on /health and come back when they answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import httpx
import torch

from bon_gateway.balancer import Balancer, Endpoint
from bon_gateway.config import RewardModelConfig
from bon_gateway.logs import log_phase
from bon_gateway.scoring.worker.adapters import Adapter
from bon_gateway.scoring.worker.adapters.qwen2_prm import Qwen2ProcessRewardAdapter
from bon_gateway.scoring.worker.adapters.qwen2_rm import Qwen2RewardModelAdapter
from bon_gateway.scoring.worker.adapters.sequence_classification import SequenceClassificationAdapter
from bon_gateway.types import Message

__all__ = ["BackendCheckFailed", "BackendUnavailable", "VllmBackend", "vllm_task"]

log = logging.getLogger("bon_gateway.worker")

#: seconds an ejected server waits before it is probed again
COOLDOWN_S = 5.0
#: seconds one call may take (the gateway's deadline cancels the RPC sooner)
CALL_TIMEOUT_S = 600.0
_PROBE = (
    [Message("user", "What is 2 + 3?")],
    "2 + 3 = 5. The answer is 5.",
    ("2 + 3 = 5.", "The answer is 5."),
)


class BackendCheckFailed(RuntimeError):
    """A server is not what the model entry says (start-up fails with this line)."""


class RowsMismatch(ValueError):
    """token_classify rows that are neither every token's nor the separators' (a server
    whose step_tag_id is another token)."""


class BackendUnavailable(RuntimeError):
    """No server could score the group (every one failed or is ejected)."""


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


class VllmBackend:
    def __init__(self, entry: RewardModelConfig, adapter: Adapter) -> None:
        self.entry = entry
        self.adapter = adapter
        self.task = vllm_task(adapter)
        self.num_labels = int(getattr(adapter.config, "num_labels", 1) or 1)
        self.model = entry.backend_model or ""
        self.balancer = Balancer(entry.backend_urls, eject_after_failures=1, eject_cooldown_s=COOLDOWN_S)
        self.client = httpx.AsyncClient(timeout=CALL_TIMEOUT_S, limits=httpx.Limits(max_connections=256))
        self._probe_task: asyncio.Task[None] | None = None

    @property
    def label(self) -> str:
        return ",".join(e.label for e in self.balancer.endpoints)

    def available(self) -> bool:
        return self.balancer.any_available()

    # -- start-up -------------------------------------------------------------------------
    async def check(self) -> None:
        """Every server serves the model and answers the probe as the formula expects."""
        for endpoint in self.balancer.endpoints:
            await self._check(endpoint)
        self._probe_task = asyncio.create_task(self._probe_ejected())

    async def _check(self, endpoint: Endpoint) -> None:
        where = f"{self.entry.name!r} at {endpoint.url}"
        try:
            reply = await self.client.get(f"{endpoint.url}/v1/models", timeout=10)
            reply.raise_for_status()
            served = [m for m in reply.json().get("data", [])]
        except (httpx.HTTPError, ValueError) as err:
            raise BackendCheckFailed(
                f"reward model {where}: no vLLM server answers /v1/models ({err})"
            ) from None
        names = [str(m.get("id")) for m in served]
        if not self.model:
            if len(names) != 1:
                raise BackendCheckFailed(
                    f"reward model {where}: the server serves {names}; set backend_model to one of them"
                )
            self.model = names[0]
        if self.model not in names:
            raise BackendCheckFailed(f"reward model {where}: the server serves {names}, not {self.model!r}")
        limit = next((m.get("max_model_len") for m in served if m.get("id") == self.model), None)
        if isinstance(limit, int) and 0 < limit < self.adapter.max_length:
            # Longer inputs fail here, naming the field, instead of at the server.
            self.adapter.max_length = limit
            self.adapter.tok.max_length = limit
        messages, answer, steps = _PROBE
        enc = self.adapter.encode(
            messages, answer, steps if self.adapter.kind == "process" else (), what="probe"
        )
        try:
            raw = await self._call(endpoint, [enc.ids], [enc.positions], activation=False)
            activated = await self._call(endpoint, [enc.ids], [enc.positions], activation=True)
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
        except (httpx.HTTPError, ValueError) as err:
            raise BackendCheckFailed(f"reward model {where}: the probe failed ({err})") from None
        got = raw[0]
        if got.shape[-1] != self.num_labels:
            raise BackendCheckFailed(
                f"reward model {where}: the server's head has {got.shape[-1]} outputs, "
                f"the checkpoint {self.num_labels}"
            )
        expected = torch.sigmoid(got) if self.num_labels == 1 else torch.softmax(got, dim=-1)
        if torch.allclose(got, activated[0], atol=1e-6) or not torch.allclose(
            expected, activated[0], atol=1e-3
        ):
            raise BackendCheckFailed(
                f"reward model {where}: use_activation=false does not give raw outputs "
                f"(raw {got.flatten().tolist()[:4]}, activated {activated[0].flatten().tolist()[:4]}): "
                "scores would mix activated and raw values"
            )
        log_phase(
            log, "backend", model=self.entry.name, server=endpoint.label, served=self.model, task=self.task
        )

    async def _probe_ejected(self) -> None:
        while True:
            await asyncio.sleep(COOLDOWN_S / 2)
            for endpoint in self.balancer.endpoints:
                if self.balancer.available(endpoint):
                    continue
                with contextlib.suppress(httpx.HTTPError):
                    if (await self.client.get(f"{endpoint.url}/health", timeout=2)).status_code == 200:
                        self.balancer.started(endpoint)
                        self.balancer.finished(endpoint, True)

    async def aclose(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        await self.client.aclose()

    # -- scoring --------------------------------------------------------------------------
    async def logits(
        self, seqs: Sequence[Sequence[int]], positions: Sequence[Sequence[int]]
    ) -> list[torch.Tensor]:
        """Head outputs [positions, labels] per sequence (fp32), from whichever server answers."""
        tried: list[Endpoint] = []
        last: Exception | None = None
        for _ in range(len(self.balancer.endpoints)):
            endpoint = self.balancer.pick(avoid=tried)
            if endpoint in tried:
                break
            tried.append(endpoint)
            self.balancer.started(endpoint)
            ok: bool | None = None
            try:
                result = await self._call(endpoint, seqs, positions, activation=False)
                ok = True
                return result
            except httpx.HTTPStatusError as err:
                if err.response.status_code < 500:
                    ok = True  # the server is well; the request is what it refuses
                    raise ValueError(
                        f"the vLLM server refused the group: {err.response.text[:300]}"
                    ) from None
                ok, last = False, err
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as err:
                ok, last = False, err
            finally:
                self.balancer.finished(endpoint, ok)
        raise BackendUnavailable(f"no vLLM server of {self.entry.name!r} scored the group ({last})")

    async def _call(
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
