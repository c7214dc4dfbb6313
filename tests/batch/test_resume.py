"""Resuming: a batch killed mid-run (SIGKILL, SIGINT, a cancelled task) and run
again holds every input id exactly once, each line a whole JSON object."""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from pathlib import Path

import pytest

from bon_gateway.batch.clients import EngineClient
from bon_gateway.batch.rows import read_items
from bon_gateway.batch.runner import BatchOptions, run_batch
from tests.batch.conftest import (
    ROWS,
    TEXTS,
    batch_argv,
    prm_scorer,
    read_rows,
    start_batch,
    wait_for_lines,
)
from tests.fakes import FakeUpstream, ServedGateway, gateway_config

pytestmark = pytest.mark.integration

EXPECTED_IDS = {f"line-{n}" for n in range(1, ROWS + 1)}


def _check_complete(output: Path) -> list[dict[str, object]]:
    rows = read_rows(output)
    ids = Counter(str(r["id"]) for r in rows)
    assert set(ids) == EXPECTED_IDS, f"missing {sorted(EXPECTED_IDS - set(ids))[:5]}"
    assert max(ids.values()) == 1, f"duplicates: {[i for i, c in ids.items() if c > 1][:5]}"
    return rows


def test_sigkill_midway_then_resume(gateway: ServedGateway, gsm8k_slice: Path, tmp_path: Path) -> None:
    output = tmp_path / "results.jsonl"
    log = tmp_path / "batch.log"
    argv = batch_argv(gateway.http_url, gsm8k_slice, output)
    first = start_batch(argv, log)
    seen = wait_for_lines(output, ROWS // 2, first)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    assert first.returncode == -signal.SIGKILL
    assert 0 < seen < ROWS, "the run must be killed halfway"
    written = len(read_rows(output))
    # What a crash in the middle of a write leaves: half a row, no newline.
    with output.open("ab") as handle:
        handle.write(b'{"id": "line-999", "candidates": [{"index": 0, "te')

    second = start_batch(argv, log)
    assert second.wait(120) == 0, log.read_text()
    rows = _check_complete(output)
    summary = log.read_text()
    assert f"skipped (done)       {written}" in summary
    assert f"done this run        {ROWS - written}" in summary
    # Rows are complete: every candidate with reward, step rewards, answer, correctness.
    for row in rows:
        assert len(row["candidates"]) == 4
        assert row["candidates"][0]["text"] == TEXTS[1]  # highest last-step reward
        for c in row["candidates"]:
            assert {"index", "text", "reward", "rank", "step_rewards", "answer", "correct"} <= set(c)
            assert len(c["step_rewards"]) == c["text"].count("\n\n") + 1
    by_id = {r["id"]: r for r in rows}
    assert by_id["line-1"]["reference"] == "18"
    assert by_id["line-1"]["correct"] is False and by_id["line-1"]["oracle_correct"] is True
    assert by_id["line-1"]["first_correct"] is True  # candidate 0 says 18
    assert by_id["line-2"]["correct"] is True  # the selected text says 3


def test_ctrl_c_stops_cleanly_and_resumes(gateway: ServedGateway, gsm8k_slice: Path, tmp_path: Path) -> None:
    output = tmp_path / "results.jsonl"
    log = tmp_path / "batch.log"
    argv = batch_argv(gateway.http_url, gsm8k_slice, output)
    first = start_batch(argv, log)
    wait_for_lines(output, ROWS // 3, first)
    first.send_signal(signal.SIGINT)
    assert first.wait(60) == 130, log.read_text()
    assert "interrupted" in log.read_text()
    partial = read_rows(output)  # whole lines only, no torn tail after a clean stop
    assert 0 < len(partial) < ROWS

    second = start_batch(argv, log)
    assert second.wait(120) == 0, log.read_text()
    _check_complete(output)
    # A third run finds nothing to do and rewrites nothing.
    before = output.read_bytes()
    third = start_batch(argv, log)
    assert third.wait(120) == 0
    assert output.read_bytes() == before
    assert f"skipped (done)       {ROWS}" in log.read_text()


async def test_cancelled_in_process_engine_run_resumes(gsm8k_slice: Path, tmp_path: Path) -> None:
    """The --config path: an Engine in this process (FakeScorer instead of workers), stopped by its event."""
    output, errors = tmp_path / "results.jsonl", tmp_path / "errors.jsonl"
    options = BatchOptions(best_of=4, seed=0, concurrency=3, progress=False, fsync=False)
    with FakeUpstream(TEXTS, delay_s=0.01) as upstream:
        config = gateway_config(upstream.url, max_best_of=16)
        stop = asyncio.Event()
        written: list[object] = []

        def on_row(row: dict[str, object]) -> None:
            written.append(row["id"])
            if len(written) == ROWS // 2:
                stop.set()

        client = EngineClient(config, scorer=prm_scorer())
        await client.start()
        try:
            stats = await run_batch(
                read_items(gsm8k_slice), client, output, errors, options, stop=stop, on_row=on_row
            )
        finally:
            await client.aclose()
        assert stats.interrupted and ROWS // 2 <= stats.done < ROWS

        client = EngineClient(config, scorer=prm_scorer())
        await client.start()
        try:
            stats = await run_batch(read_items(gsm8k_slice), client, output, errors, options)
        finally:
            await client.aclose()
    assert not stats.interrupted and stats.skipped + stats.done == ROWS and stats.failed == 0
    _check_complete(output)
    assert not errors.exists() or errors.read_text() == ""


async def test_failed_rows_go_to_the_errors_file_and_are_retried(gsm8k_slice: Path, tmp_path: Path) -> None:
    output, errors = tmp_path / "results.jsonl", tmp_path / "errors.jsonl"
    with gsm8k_slice.open("a", encoding="utf-8") as handle:
        handle.write("not json\n")
        handle.write(json.dumps({"id": "no-prompt"}) + "\n")
    options = BatchOptions(
        best_of=4, seed=0, concurrency=2, progress=False, fsync=False, retries=1, backoff_s=0.01
    )
    with FakeUpstream(TEXTS) as upstream:
        config = gateway_config(upstream.url, max_best_of=16)
        upstream.fail_status = 503  # every candidate fails: every row fails, none is fatal
        client = EngineClient(config, scorer=prm_scorer())
        await client.start()
        try:
            stats = await run_batch(read_items(gsm8k_slice, limit=5), client, output, errors, options)
        finally:
            await client.aclose()
        assert (stats.done, stats.failed, stats.retried) == (0, 5, 5)
        failures = read_rows(errors)
        assert {f["id"] for f in failures} == {f"line-{n}" for n in range(1, 6)}
        assert all(f["attempts"] == 2 and "upstream" in f["message"] for f in failures)
        assert all("question" not in json.dumps(f) for f in failures)  # no prompt text in errors

        upstream.fail_status = None
        client = EngineClient(config, scorer=prm_scorer())
        await client.start()
        try:
            stats = await run_batch(read_items(gsm8k_slice), client, output, errors, options)
        finally:
            await client.aclose()
    assert (stats.done, stats.failed, stats.invalid) == (ROWS, 0, 2)
    assert {f["id"] for f in read_rows(errors)[5:]} == {f"line-{ROWS + 1}", "no-prompt"}


async def test_a_run_gives_up_when_rows_keep_failing(gsm8k_slice: Path, tmp_path: Path) -> None:
    """The upstream going down must not mark every remaining row failed."""
    output, errors = tmp_path / "results.jsonl", tmp_path / "errors.jsonl"
    options = BatchOptions(
        best_of=4, seed=0, concurrency=1, progress=False, fsync=False, retries=0, max_consecutive_failures=5
    )
    with FakeUpstream(TEXTS) as upstream:
        upstream.fail_status = 503
        client = EngineClient(gateway_config(upstream.url, max_best_of=16), scorer=prm_scorer())
        await client.start()
        try:
            stats = await run_batch(read_items(gsm8k_slice), client, output, errors, options)
        finally:
            await client.aclose()
    assert stats.failed == 5 and stats.done == 0 and not stats.interrupted
    assert stats.gave_up is not None and "5 rows failed in a row" in stats.gave_up
    assert len(read_rows(errors)) == 5
