"""The checked-in generated protobuf/gRPC code must match proto/."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _load_generator():  # scripts/ is not a package
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = module
    spec.loader.exec_module(module)
    return module


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    written = _load_generator().generate(tmp_path)
    assert written, "protoc wrote nothing"
    checked_in = ROOT / "bon_gateway" / "v1"
    for path in written:
        current = checked_in / path.name
        assert current.exists(), f"{path.name} is not checked in: run `make proto`"
        assert current.read_text() == path.read_text(), f"{path.name} drifted from proto/: run `make proto`"
    expected = {p.name for p in written}
    stale = {p.name for p in checked_in.glob("*_pb2*.py*")} - expected
    assert not stale, f"stale generated files: {sorted(stale)}"


def test_services_and_fields_are_the_contract() -> None:
    from bon_gateway.v1 import best_of_n_pb2, reward_worker_pb2

    service = best_of_n_pb2.DESCRIPTOR.services_by_name["BestOfN"]
    assert sorted(m.name for m in service.methods) == ["Generate", "GenerateStream", "ListModels", "Score"]
    worker = reward_worker_pb2.DESCRIPTOR.services_by_name["RewardWorker"]
    assert "Score" in [m.name for m in worker.methods]
    request_fields = set(best_of_n_pb2.GenerateRequest.DESCRIPTOR.fields_by_name)
    assert {
        "messages",
        "prompt",
        "best_of",
        "n",
        "reward_model",
        "sampling",
        "selection",
        "aggregation",
        "return_candidates",
        "min_candidates",
    } <= request_fields
    candidate_fields = set(best_of_n_pb2.Candidate.DESCRIPTOR.fields_by_name)
    assert {"index", "text", "reward", "step_rewards", "finish_reason", "rank"} <= candidate_fields
    sampling_fields = set(best_of_n_pb2.SamplingParams.DESCRIPTOR.fields_by_name)
    assert sampling_fields == {"temperature", "top_p", "max_tokens", "seed", "stop"}
