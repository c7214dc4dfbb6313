"""FakeSglangReward: an SGLang reward-model server's routes on 127.0.0.1 (`/health`,
`/v1/models`, `/get_model_info`, native `/classify`), scored by the plain transformers
forward of each token-id input, one unpadded sequence at a time, in fp32 (the reference).

What SGLang does that the backend relies on (sgl-project/sglang: http_server.py
`classify_request` takes an EmbeddingReqInput, `text` or `input_ids`, one or a list;
tokenizer_manager.py answers a list with `[{"embedding": [...], "meta_info": {...}}]`
in input order, one object for a single input; models/llama_reward.py and qwen2_rm.py
pool the LAST token and apply no activation), reproduced: input_ids lists, the last
token's raw head output, `is_generation` false in /get_model_info, ModelCard
`id`/`max_model_len` in /v1/models.

`return_pooled_hidden_states: true` adds each item's `pooled_hidden_state` (the last
token's final hidden state, before the `score` head) for sequence classifiers, as newer
SGLang does; `pooled_hidden=False` plays an older server that refuses the field (422).

Faults: `activate` (a server that returns sigmoid/softmax), `generation` (one started
without --is-embedding), `fail_with` (every /classify answers that status).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes.upstream import ThreadedServer
from tests.fakes.vllm_pooling import token_forward

__all__ = ["FakeSglangReward"]


class FakeSglangReward:
    def __init__(
        self,
        path: Path,
        name: str,
        *,
        activate: bool = False,
        generation: bool = False,
        pooled_hidden: bool = True,
    ) -> None:
        self.name = name
        self.path = path
        self.activate = activate
        self.generation = generation
        self.pooled_hidden = pooled_hidden
        self.fail_with: int | None = None
        self.calls = 0
        self.refused = 0  # /classify calls answered with `fail_with`
        self.batch_sizes: list[int] = []  # inputs per /classify call
        architecture = json.loads((path / "config.json").read_text())["architectures"][0]
        token_level = architecture.startswith("Qwen2For") and "Sequence" not in architecture
        # Qwen2ForRewardModel: the MLP head on every token, then the LAST pooler (no hidden
        # state before a head to return); sequence classifiers: the LAST pooler, then `score`.
        if token_level:
            rows = token_forward(path)
            self._forward: Any = lambda ids: (rows(ids)[-1], None)
        else:
            self._forward = _last_token_forward(path)
        routes = [
            Route("/health", self._health),
            Route("/v1/models", self._models),
            Route("/get_model_info", self._model_info),
            Route("/classify", self._classify, methods=["POST", "PUT"]),
        ]
        self.server = ThreadedServer(Starlette(routes=routes))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def __enter__(self) -> FakeSglangReward:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    async def _health(self, request: Request) -> JSONResponse:
        if self.fail_with is not None:
            return JSONResponse({}, status_code=503)
        return JSONResponse({})

    async def _models(self, request: Request) -> JSONResponse:
        card = {"id": self.name, "object": "model", "root": str(self.path), "max_model_len": 2048}
        return JSONResponse({"object": "list", "data": [card]})

    async def _model_info(self, request: Request) -> JSONResponse:
        return JSONResponse(
            {"model_path": str(self.path), "tokenizer_path": str(self.path), "is_generation": self.generation}
        )

    async def _classify(self, request: Request) -> JSONResponse:
        body: dict[str, Any] = await request.json()
        if self.fail_with is not None:
            self.refused += 1
            return JSONResponse({"error": {"message": "injected"}}, status_code=self.fail_with)
        if self.generation:
            return JSONResponse({"error": {"message": "not an embedding model"}}, status_code=400)
        raw = body.get("input_ids")
        if raw is None or ("text" in body and body["text"] is not None):
            return JSONResponse({"error": {"message": "this fake takes input_ids only"}}, status_code=400)
        want_hidden = bool(body.get("return_pooled_hidden_states"))
        if want_hidden and not self.pooled_hidden:
            return JSONResponse({"detail": "unknown field return_pooled_hidden_states"}, status_code=422)
        single = bool(raw) and isinstance(raw[0], int)
        inputs: list[list[int]] = [raw] if single else raw
        self.calls += 1
        self.batch_sizes.append(len(inputs))
        out = []
        for ids in inputs:
            scores, hidden = self._forward(ids)
            if self.activate:
                scores = torch.sigmoid(scores) if scores.shape[-1] == 1 else torch.softmax(scores, dim=-1)
            meta = {
                "id": f"fake-{self.calls}",
                "prompt_tokens": len(ids),
                "finish_reason": {"type": "length"},
            }
            item: dict[str, Any] = {"embedding": scores.flatten().tolist(), "meta_info": meta}
            if want_hidden and hidden is not None:
                item["pooled_hidden_state"] = hidden.tolist()
            out.append(item)
        return JSONResponse(out[0] if single else out)


def _last_token_forward(path: Path) -> Any:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()

    def forward(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            # the backbone's last token (no padding here, after the final norm), then `score`
            hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -1].float()
            return model.score(hidden).float(), hidden

    return forward
