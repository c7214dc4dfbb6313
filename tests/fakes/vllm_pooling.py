"""FakeVllmPooling: vLLM's pooling routes (/v1/models, /health, /classify, /pooling
token_classify) on 127.0.0.1, computed by the plain transformers forward of each
token-id input, one unpadded sequence at a time, in fp32 (the reference).

What vLLM does that the backend relies on, reproduced: /classify pools the last
token; token_classify returns every token's outputs (vLLM's ALL/STEP pooler with no
step_tag_id); `use_activation` false gives raw outputs, true (the default) sigmoid for
one label and softmax for more. Faults: `ignore_activation` (an older or foreign
server that always activates), `fail_with` (every scoring call answers that status).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes.upstream import ThreadedServer

__all__ = ["FakeVllmPooling", "sequence_forward", "token_forward"]


class FakeVllmPooling:
    def __init__(self, path: Path, name: str, *, ignore_activation: bool = False) -> None:
        import json

        self.name = name
        self.ignore_activation = ignore_activation
        self.fail_with: int | None = None
        self.calls = 0
        self.refused = 0  # scoring calls answered with `fail_with`
        architecture = json.loads((path / "config.json").read_text())["architectures"][0]
        self.token_level = architecture.startswith("Qwen2For") and "Sequence" not in architecture
        self._forward = token_forward(path) if self.token_level else sequence_forward(path)
        routes = [
            Route("/health", self._health),
            Route("/v1/models", self._models),
            Route("/classify", self._classify, methods=["POST"]),
            Route("/pooling", self._pooling, methods=["POST"]),
        ]
        self.server = ThreadedServer(Starlette(routes=routes))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def __enter__(self) -> FakeVllmPooling:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    async def _health(self, request: Request) -> JSONResponse:
        return JSONResponse({})

    async def _models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": self.name, "max_model_len": 2048}]})

    def _activate(self, logits: torch.Tensor, body: dict[str, Any]) -> torch.Tensor:
        if body.get("use_activation") is False and not self.ignore_activation:
            return logits
        return torch.sigmoid(logits) if logits.shape[-1] == 1 else torch.softmax(logits, dim=-1)

    def _inputs(self, body: dict[str, Any]) -> list[list[int]]:
        raw = body["input"]
        return [raw] if raw and isinstance(raw[0], int) else raw

    async def _classify(self, request: Request) -> JSONResponse:
        body = await request.json()
        if self.fail_with is not None:
            self.refused += 1
            return JSONResponse({"error": "injected"}, status_code=self.fail_with)
        if self.token_level:
            return JSONResponse({"error": {"message": "task classify is not supported"}}, status_code=400)
        self.calls += 1
        data = []
        for i, ids in enumerate(self._inputs(body)):
            probs = self._activate(self._forward(ids), body)
            data.append({"index": i, "probs": probs.tolist(), "num_classes": probs.shape[-1]})
        return JSONResponse({"object": "list", "model": self.name, "data": data})

    async def _pooling(self, request: Request) -> JSONResponse:
        body = await request.json()
        if self.fail_with is not None:
            self.refused += 1
            return JSONResponse({"error": "injected"}, status_code=self.fail_with)
        if body.get("task") != "token_classify" or not self.token_level:
            return JSONResponse({"error": {"message": "unsupported task"}}, status_code=400)
        self.calls += 1
        data = []
        for i, ids in enumerate(self._inputs(body)):
            rows = self._activate(self._forward(ids), body)
            data.append({"index": i, "object": "pooling", "data": rows.tolist()})
        return JSONResponse({"object": "list", "model": self.name, "data": data})


def sequence_forward(path: Path) -> Any:
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()

    def forward(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float()  # last token: no padding here

    return forward


def token_forward(path: Path) -> Any:
    from safetensors.torch import load_file
    from transformers import Qwen2Model

    backbone = Qwen2Model.from_pretrained(path, dtype=torch.float32).eval()
    t = load_file(str(path / "model.safetensors"))

    def forward(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            h = backbone(torch.tensor([ids])).last_hidden_state[0]
            x = torch.relu(h @ t["score.0.weight"].T + t["score.0.bias"])
            return x @ t["score.2.weight"].T + t["score.2.bias"]

    return forward
