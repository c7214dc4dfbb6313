"""The front process must start without torch (DESIGN: only workers import it)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    ["bon_gateway.api.http_app", "bon_gateway.api.server", "bon_gateway.api.grpc_service", "bon_gateway.cli"],
)
def test_importing_the_front_does_not_import_torch(module: str) -> None:
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"{module} imported {result.stdout.strip()}"


def test_building_the_app_creates_nothing_at_import() -> None:
    # Two apps over two metric sets must not collide: no module-level registry or app.
    from bon_gateway.api import http_app

    assert not any(type(value).__name__ == "FastAPI" for value in vars(http_app).values())
