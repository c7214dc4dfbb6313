"""promtool accepts the Prometheus configs, the alert rules (and their unit
tests) and the gateway's /metrics text.

promtool is the Debian package `prometheus` (`make promtool`). Without it these
tests skip on a developer machine but fail in CI (the CI variable is set).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bon_gateway.metrics import Metrics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (install it with `make promtool`)")
        pytest.skip("promtool not installed: Debian package prometheus (`make promtool`, as root)")
    return path


def _run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args),
        input=stdin.decode() if stdin else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus-kubernetes.yml"])
def test_check_config(promtool: str, config: str) -> None:
    # Also checks the rule_files the config names (alerts.yml, resolved next to it).
    result = _run(promtool, "check", "config", str(PROMETHEUS_DIR / config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


def test_check_rules(promtool: str) -> None:
    result = _run(promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests(promtool: str) -> None:
    result = _run(promtool, "test", "rules", str(Path(__file__).with_name("alerts_test.yml")))
    assert result.returncode == 0, result.stdout + result.stderr


def test_check_rules_can_fail(promtool: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: Broken\n        expr: sum(rate(x[5m])\n")
    assert _run(promtool, "check", "rules", str(bad)).returncode != 0


def _record_everything(metrics: Metrics) -> None:
    """One sample in every metric, with the label values the gateway uses."""
    from bon_gateway.v1 import reward_worker_pb2

    metrics.requests.labels("chat_completions", "200").inc()
    metrics.request_duration.labels("chat_completions").observe(1.5)
    metrics.requests_in_flight.labels("chat_completions").set(3)
    metrics.phase_duration.labels("generate").observe(1.2)
    metrics.candidates.labels("generated").inc(4)
    metrics.upstream_requests.labels("200").inc()
    metrics.upstream_duration.observe(1.1)
    metrics.upstream_errors.labels("vllm:8000", "timeout").inc()
    metrics.upstream_call_duration.labels("vllm:8000").observe(1.1)
    metrics.rewards.labels("skywork").observe(0.7)
    metrics.score_queue_depth.labels("skywork").set(2)
    metrics.score_queue_capacity.labels("skywork").set(1024)
    metrics.workers_up.labels("skywork").set(1)
    metrics.workers_configured.labels("skywork").set(1)
    metrics.worker_restarts.labels("skywork").inc()
    stats = reward_worker_pb2.WorkerStats(
        queue_seconds=0.002,
        compute_seconds=0.03,
        batch_size=8,
        batch_tokens=2048,
        padded_tokens=128,
        reused_prompt_tokens=700,
    )
    metrics.observe_worker_stats("skywork", stats, scored_tokens=1220)


def test_check_metrics_on_every_metric(promtool: str) -> None:
    """`promtool check metrics` (the linter: naming, units, _total) on a full scrape."""
    metrics = Metrics()
    _record_everything(metrics)
    text = metrics.render()
    families = {f.name for f in metrics.registry.collect()}
    for family in families:
        assert family.encode() in text
    result = _run(promtool, "check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
