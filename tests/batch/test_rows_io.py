"""Input parsing and the resumable JSONL file: pure pieces, no gateway."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bon_gateway.batch.io import JsonlAppender, repair_tail, scan_output
from bon_gateway.batch.rows import BatchItem, RowError, gsm8k_reference, parse_row, read_items
from bon_gateway.batch.summary import accuracy_vs_n


def test_gsm8k_rows_become_a_user_message_and_a_reference() -> None:
    item = parse_row({"question": "How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 1,000"}, 3)
    assert item == BatchItem(
        id="line-3", messages=({"role": "user", "content": "How many?"},), reference="1000", raw_id="line-3"
    )
    assert gsm8k_reference("no marker") is None


def test_chat_and_prompt_rows() -> None:
    chat = parse_row({"id": 5, "messages": [{"role": "user", "content": "hi"}], "reference": "\\boxed{7}"}, 1)
    assert (chat.id, chat.raw_id, chat.reference) == ("5", 5, "7")
    prompt = parse_row({"id": "p", "prompt": "say 3", "reference": 3}, 2)
    assert prompt.messages == ({"role": "user", "content": "say 3"},) and prompt.reference == "3"
    with pytest.raises(RowError, match="messages"):
        parse_row({"id": "x"}, 4)
    with pytest.raises(RowError, match="role"):
        parse_row({"messages": [{"role": "robot", "content": "hi"}]}, 4)
    with pytest.raises(RowError, match="question"):
        parse_row({"id": "g", "question": ""}, 4, "gsm8k")


def test_read_items_reports_bad_lines_in_place(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "a"}\n\nnot json\n[1]\n{"prompt": "b"}\n')
    out = list(read_items(path))
    assert [type(o).__name__ for o in out] == ["BatchItem", "RowError", "RowError", "BatchItem"]
    assert [o.row_id if isinstance(o, RowError) else o.id for o in out] == [
        "line-1",
        "line-3",
        "line-4",
        "line-5",
    ]
    assert len(list(read_items(path, limit=2))) == 2


def _row(i: int) -> dict[str, object]:
    return {"id": i, "candidates": [{"text": "x" * 50}]}


def test_scan_output_cuts_a_torn_last_line_and_keeps_whole_rows(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    with JsonlAppender(path) as out:
        for i in range(3):
            out.write(_row(i))
    whole = path.read_bytes()
    path.write_bytes(whole + json.dumps(_row(3)).encode()[:20])
    state = scan_output(path)
    assert state.done_ids == {"0", "1", "2"} and state.repaired_bytes == 20
    assert path.read_bytes() == whole
    # A complete row missing only its newline is kept, and the newline restored.
    path.write_bytes(whole + json.dumps(_row(3)).encode())
    assert scan_output(path).done_ids == {"0", "1", "2", "3"}
    assert path.read_bytes().endswith(b"}\n")
    # Duplicates and junk in the middle are counted, not fatal.
    path.write_bytes(whole + b"garbage\n" + json.dumps(_row(1)).encode() + b"\n")
    state = scan_output(path)
    assert (state.rows, state.bad_lines, state.duplicates) == (3, 1, 1)


def test_repair_tail_and_nan_free_lines(tmp_path: Path) -> None:
    path = tmp_path / "errors.jsonl"
    path.write_bytes(b'{"id": 1}\n{"id": 2, "mess')
    assert repair_tail(path) == len(b'{"id": 2, "mess')
    with JsonlAppender(path, fsync=False) as out:
        out.write({"id": 3, "reward": float("nan"), "steps": [float("inf"), 1.0]})
    assert path.read_text().splitlines()[-1] == '{"id": 3, "reward": null, "steps": [null, 1.0]}'


def test_accuracy_vs_n_prefixes() -> None:
    rows = [
        [
            {"reward": 0.1, "correct": False, "answer": "1"},
            {"reward": 0.9, "correct": True, "answer": "2"},
            {"reward": 0.5, "correct": False, "answer": "1"},
        ],
        [
            {"reward": 0.3, "correct": True, "answer": "5"},
            {"reward": 0.2, "correct": False, "answer": "6"},
            {"reward": 0.1, "correct": False, "answer": "6"},
        ],
    ]
    by_n = accuracy_vs_n(rows)
    assert by_n[1] == (0.5, 0.5, 0.5)
    assert by_n[2] == (1.0, 0.5, 1.0)  # majority ties go to the first answer seen
    assert by_n[3] == (1.0, 0.0, 1.0)
