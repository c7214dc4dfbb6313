"""Dependencies point one way (DESIGN.md: api -> engine -> (generation, scoring client)
-> types; only the worker imports torch). Each rule imports its modules in a fresh
interpreter and looks at what sys.modules holds afterwards."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ROOT / "bon_gateway" / "scoring" / "worker" / "adapters"
# Adapter modules hold one architecture family each; the rest are helpers they share.
SHARED_ADAPTER_MODULES = frozenset({"__init__", "base", "checkpoint", "markers", "mlp_head"})


def _imported(modules: list[str]) -> set[str]:
    """Every module in sys.modules after importing `modules` in a fresh interpreter."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def _under(found: set[str], *packages: str) -> list[str]:
    return sorted(m for m in found if any(m == p or m.startswith(p + ".") for p in packages))


def _adapter_modules() -> list[str]:
    return [f"bon_gateway.scoring.worker.adapters.{p.stem}" for p in sorted(ADAPTERS.glob("*.py"))]


@pytest.mark.integration
def test_engine_imports_neither_generation_nor_scoring() -> None:
    found = _imported(["bon_gateway.engine", "bon_gateway.engine.engine", "bon_gateway.engine.protocols"])
    assert _under(found, "bon_gateway.generation", "bon_gateway.scoring") == []


@pytest.mark.integration
def test_worker_imports_neither_the_engine_nor_prometheus() -> None:
    worker = [
        "bon_gateway.scoring.worker.__main__",
        "bon_gateway.scoring.worker.server",
        "bon_gateway.scoring.worker.runtime",
        "bon_gateway.scoring.worker.loading",
        *_adapter_modules(),
    ]
    found = _imported(worker)
    assert "torch" in found  # the modules did load
    assert _under(found, "bon_gateway.engine", "prometheus_client") == []


@pytest.mark.integration
def test_front_never_imports_torch() -> None:
    front = [
        "bon_gateway.api.server",
        "bon_gateway.api.http_app",
        "bon_gateway.api.grpc_service",
        "bon_gateway.cli",
        "bon_gateway.scoring.pool",
    ]
    found = _imported(front)
    assert "bon_gateway.api.server" in found
    assert _under(found, "torch", "transformers", "safetensors") == []


@pytest.mark.parametrize("path", sorted(ADAPTERS.glob("*.py")), ids=lambda p: p.stem)
def test_an_adapter_borrows_nothing_from_a_sibling_adapter(path: Path) -> None:
    """Helpers two families need live in the shared adapter modules, not in one family's."""
    prefix = "bon_gateway.scoring.worker.adapters."
    siblings = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(prefix):
            siblings.add(node.module[len(prefix) :])
    if path.stem != "__init__":  # the registry lists every family
        assert siblings <= SHARED_ADAPTER_MODULES, (
            f"{path.stem} imports {sorted(siblings - SHARED_ADAPTER_MODULES)}"
        )


# What `pip install bon-gateway` leaves out (pyproject.toml extras worker, batch, demo).
EXTRAS_ONLY = (
    "torch",
    "transformers",
    "safetensors",
    "accelerate",
    "gguf",
    "matplotlib",
    "llama_cpp",
    "numpy",
)


@pytest.mark.integration
def test_front_batch_and_demo_import_nothing_from_the_extras() -> None:
    # The core install (no extras) must run serve, batch and the demo's own module;
    # the extras' modules load only in the worker, the verifier and batch --report.
    found = _imported(
        [
            "bon_gateway.cli",
            "bon_gateway.api.server",
            "bon_gateway.scoring.pool",
            "bon_gateway.scoring.preflight",
            "bon_gateway.batch.command",
            "bon_gateway.batch.runner",
            "bon_gateway.batch.clients",
            "bon_gateway.batch.export",
            "bon_gateway.batch.summary",
            "bon_gateway.engine.answers",
            "bon_gateway.demo",
        ]
    )
    assert _under(found, *EXTRAS_ONLY) == []
