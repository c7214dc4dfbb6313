"""The worker bounds oneDNN's per-shape caches (issue 13, finding 11).

The packed forward's fused linears (torch.ops.mkldnn._linear_pointwise) leave one
cached primitive per input shape in oneDNN's and ideep's caches (1,024 entries
each by default); packed batches have a new token count nearly every time, so a
worker's RSS grew by about 1 MiB per varied request. bench/worker_rss.py measures
the whole worker; here one process runs the fused linear on many shapes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bon_gateway.scoring.worker.__main__ import ONEDNN_CACHE_DEFAULTS, bound_onednn_caches

pytestmark = pytest.mark.integration

_SHAPES_SCRIPT = """
import json, random, sys
from pathlib import Path
from bon_gateway.scoring.worker.__main__ import bound_onednn_caches
bound_onednn_caches()  # as the worker's main does, before torch is imported
import torch
torch.set_num_threads(1)
if not torch.backends.mkldnn.is_available():
    print(json.dumps(None)); sys.exit()
def rss_mib():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
weight = torch.randn(256, 64)
rng = random.Random(0)
with torch.no_grad():
    for rows in range(1, 51):  # warm-up: the first shapes fill the bounded caches
        torch.ops.mkldnn._linear_pointwise(torch.randn(rows, 64), weight, None, "none", [], "")
    before = rss_mib()
    for _ in range(800):
        rows = rng.randint(51, 3000)
        torch.ops.mkldnn._linear_pointwise(torch.randn(rows, 64), weight, None, "none", [], "")
print(json.dumps(rss_mib() - before))
"""


def test_bound_onednn_caches_sets_defaults_and_keeps_an_operators_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in ONEDNN_CACHE_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "4")
    bound_onednn_caches()
    assert (
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]
        == ONEDNN_CACHE_DEFAULTS["ONEDNN_PRIMITIVE_CACHE_CAPACITY"]
    )
    assert os.environ["LRU_CACHE_CAPACITY"] == "4"


def test_fused_linear_on_many_shapes_keeps_rss_flat() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHE_DEFAULTS}
    out = subprocess.run(
        [sys.executable, "-c", _SHAPES_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    )
    growth = json.loads(out.stdout.strip().splitlines()[-1])
    if growth is None:
        pytest.skip("this torch has no oneDNN")
    # Unbounded (the defaults), 800 shapes grew RSS by ~500 MiB here; bounded, by a few MiB.
    assert growth < 60, f"RSS grew {growth:.0f} MiB over 800 input shapes"
