"""Before the first row: the gateway must serve the reward model the rows ask for
(checked once, exit 1 with the reason), and progress that moves while rows are in flight."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from bon_gateway.batch.clients import (
    EngineClient,
    GatewayHttpClient,
    RequestFailed,
    ServedModels,
    check_reward_model,
    upstream_calls,
)
from bon_gateway.batch.rows import read_items
from bon_gateway.batch.runner import BatchOptions, run_batch
from tests.batch.conftest import REPO, TEXTS, batch_argv, prm_scorer
from tests.fakes import FakeUpstream, ServedGateway, gateway_config


def test_check_reward_model_names_what_is_served() -> None:
    served = ServedModels("gen", ("judge", "verifier"))
    assert check_reward_model(served, None, "the gateway") == "judge"  # the gateway's default
    assert check_reward_model(served, "verifier", "the gateway") == "verifier"
    with pytest.raises(RequestFailed, match=r"no reward model 'skywork'.*judge, verifier"):
        check_reward_model(served, "skywork", "the gateway")
    with pytest.raises(RequestFailed, match="serves no reward model"):
        check_reward_model(ServedModels("gen", ()), None, "the gateway")


@pytest.mark.integration
def test_a_wrong_reward_model_stops_before_the_first_row(
    gateway: ServedGateway, upstream: FakeUpstream, gsm8k_slice: Path, tmp_path: Path
) -> None:
    output = tmp_path / "results.jsonl"
    calls_before = len(upstream.requests)
    argv = batch_argv(gateway.http_url, gsm8k_slice, output, "--reward-model", "skywork")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no reward model 'skywork'" in done.stderr and "fake-rm" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr  # one line, no traceback
    assert len(upstream.requests) == calls_before  # no row was sent
    assert not output.exists() or output.read_text() == ""
    errors = output.with_name(output.name + ".errors.jsonl")
    assert not errors.exists() or errors.read_text() == ""


@pytest.mark.integration
async def test_an_in_process_engine_checks_its_config_names() -> None:
    with FakeUpstream(TEXTS) as upstream:
        client = EngineClient(gateway_config(upstream.url), scorer=prm_scorer())
        await client.start()
        try:
            served = await client.served_models()
        finally:
            await client.aclose()
    assert served.reward_models == ("fake-rm",) and served.generator is not None
    with pytest.raises(RequestFailed, match="skywork"):
        check_reward_model(served, "skywork", "the config")


@pytest.mark.integration
async def test_candidates_are_reported_while_rows_are_in_flight(gsm8k_slice: Path, tmp_path: Path) -> None:
    """Each row's candidates come in before the row is written: the second bar moves first."""
    events: list[str] = []
    options = BatchOptions(best_of=4, seed=0, concurrency=1, progress=False, fsync=False)
    with FakeUpstream(TEXTS, delay_s=0.01) as upstream:
        client = EngineClient(gateway_config(upstream.url, max_best_of=16), scorer=prm_scorer())
        await client.start()
        try:
            stats = await run_batch(
                read_items(gsm8k_slice, limit=3),
                client,
                tmp_path / "out.jsonl",
                tmp_path / "err.jsonl",
                options,
                on_row=lambda row: events.append("row"),
                on_candidates=lambda count: events.extend(["candidate"] * count),
            )
        finally:
            await client.aclose()
    assert stats.done == 3 and stats.candidates_seen == 12
    # One row at a time: its 4 candidates, then the row.
    assert events == (["candidate"] * 4 + ["row"]) * 3


METRICS = """# HELP bon_upstream_requests_total Calls to the generator upstream.
# TYPE bon_upstream_requests_total counter
bon_upstream_requests_total{{status="200"}} {ok}
bon_upstream_requests_total{{status="500"}} 1.0
"""


async def test_the_http_client_follows_the_gateways_generator_calls() -> None:
    """Over HTTP the client sees the gateway's /metrics: each poll reports the new calls."""
    counts = iter([3.0, 3.0, 5.0, 9.0])
    served: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        served.append(request.url.path)
        try:
            return httpx.Response(200, text=METRICS.format(ok=next(counts)))
        except StopIteration:
            return httpx.Response(401)  # /metrics behind a key: following stops quietly

    client = GatewayHttpClient(
        "http://gw:8080", transport=httpx.MockTransport(handler), metrics_interval_s=0.0
    )
    reported: list[int] = []
    await client.follow_candidates(reported.append)
    await client.aclose()
    assert reported == [2, 4] and set(served) == {"/metrics"}
    assert upstream_calls(METRICS.format(ok=7.0)) == 8.0
    assert upstream_calls("other_metric 1\n") is None


@pytest.mark.integration
def test_a_resumed_report_names_its_run_and_keeps_its_figures_apart(
    gateway: ServedGateway, tmp_path: Path
) -> None:
    rows = [
        {"id": f"q{i}", "prompt": f"<script>alert({i})</script> What is 2 + {i}?", "reference": str(2 + i)}
        for i in range(6)
    ]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    output, report, summary = tmp_path / "out.jsonl", tmp_path / "report.html", tmp_path / "summary.json"
    first = batch_argv(gateway.http_url, source, output, "--limit", "2")
    assert subprocess.run(first, capture_output=True, timeout=120, cwd=REPO).returncode == 0
    again = batch_argv(
        gateway.http_url, source, output, "--temperature", "0.7", "--max-tokens", "99",
        "--report", str(report), "--summary-json", str(summary),
    )  # fmt: skip
    done = subprocess.run(again, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr

    figures = json.loads(summary.read_text())
    assert figures["this_run"]["rows"] == 4 and figures["output"]["rows"] == 6
    made = figures["produced_by"]
    assert made["reward_model"] == "fake-rm" and made["best_of"] == 4
    assert (made["temperature"], made["max_tokens"], made["seed"]) == (0.7, 99, 0)
    assert made["generator"] and made["date"]

    page = report.read_text()
    assert "<script>" not in page and "&lt;script&gt;alert(" in page  # questions are escaped
    for text in ("Produced by", "fake-rm", "this run", "whole output file", "Example rows", "chosen"):
        assert text in page, text
    assert made["date"] in page and "0.7" in page and "99" in page
    # Accuracies are percentages, e.g. "0.0 %" / "100.0 %", never a bare 0.2500.
    assert " %</td>" in page
    # The figures table: rows this run (4) next to the whole file's (6).
    assert "<tr><th>rows</th><td>4</td><td>6</td></tr>" in page
