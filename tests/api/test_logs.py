"""Logs: `server.log_format = "json"` emits one JSON object per line; INFO logs of a
served request carry neither the prompt nor any candidate's text."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from bon_gateway.config import GatewayConfig
from tests.api.conftest import BEST, REWARDS, TEXTS
from tests.fakes import FakeScorer, FakeUpstream, ServedGateway, gateway_config

REPO = Path(__file__).resolve().parents[2]

JSON_SCRIPT = """
import logging
from bon_gateway.logs import configure_logging, log_phase
configure_logging("INFO", "json")
log = logging.getLogger("bon_gateway.engine")
log_phase(log, "score", id="req-1", model="rm", seconds=0.25, phase_text="a=b c=d")
log.warning("plain line with \\"quotes\\" and ünïcode")
log.debug("hidden")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("phase=boom id=req-2")
"""


@pytest.mark.integration
def test_json_mode_emits_one_parseable_object_per_line() -> None:
    result = subprocess.run(
        [sys.executable, "-c", JSON_SCRIPT],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    )
    lines = result.stderr.splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) == 3, result.stderr
    for entry in entries:
        assert {"ts", "level", "logger", "message"} <= entry.keys()
        assert entry["logger"] == "bon_gateway.engine"
    score, plain, boom = entries
    assert score["level"] == "INFO"
    assert score["message"] == "phase=score id=req-1 model=rm seconds=0.25 phase_text=a=b c=d"
    # The fields come from the record as typed values, not parsed back out of the text.
    fields = (score["phase"], score["id"], score["model"], score["seconds"], score["phase_text"])
    assert fields == ("score", "req-1", "rm", 0.25, "a=b c=d")
    assert "c" not in score
    assert plain["level"] == "WARNING" and plain["message"] == 'plain line with "quotes" and ünïcode'
    assert "phase" not in plain
    assert "phase" not in boom and "ZeroDivisionError" in boom["exc_info"]


def test_log_format_is_validated() -> None:
    assert GatewayConfig.model_validate({"server": {"log_format": "json"}}).server.log_format == "json"
    assert GatewayConfig.model_validate({}).server.log_format == "text"
    with pytest.raises(ValueError):
        GatewayConfig.model_validate({"server": {"log_format": "xml"}})


@pytest.mark.integration
def test_info_logs_of_a_request_carry_no_prompt_or_answer(caplog: pytest.LogCaptureFixture) -> None:
    prompt = "Zyxwv secret prompt: what is the capital of France?"
    caplog.set_level(logging.INFO)
    with (
        FakeUpstream(TEXTS) as upstream,
        ServedGateway(gateway_config(upstream.url), FakeScorer(REWARDS)) as served,
    ):
        reply = httpx.post(
            f"{served.http_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": prompt}], "best_of": 4},
            timeout=30,
        )
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == BEST
    info = [r for r in caplog.records if r.levelno >= logging.INFO]
    text = "\n".join(r.getMessage() for r in info)
    # the per-phase lines are there, so the check below looks at real request logs
    for phase in ("phase=generate", "phase=score", "phase=select"):
        assert phase in text, text
    assert prompt not in text and "Zyxwv" not in text
    for answer in TEXTS:
        assert answer not in text, answer
