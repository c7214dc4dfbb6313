"""Speculative rejection through the served gateway, over a real streaming HTTP upstream
(tokens at a fixed rate, recording what each stream sent before its client left)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import httpx
import pytest

from bon_gateway.config import StrategyConfig
from bon_gateway.v1 import best_of_n_pb2 as pb
from bon_gateway.v1 import best_of_n_pb2_grpc as pb_grpc
from tests.fakes import FakeScorer, FakeUpstream, ServedGateway, gateway_config
from tests.fakes.sse import tokens_of

pytestmark = pytest.mark.integration

QUESTION = [{"role": "user", "content": "Pick one."}]
WEIGHTS = {"good": 1.0, "meh": 0.0, "bad": -1.0}
# Candidate i answers TEXTS[i] (seed 0). Early words decide the partial rewards.
TEXTS = (
    " ".join(["good"] * 6 + ["meh"] * 34),  # strong start
    " ".join(["bad"] * 6 + ["meh"] * 34),  # weak start: rejected at the first checkpoint
    " ".join(["good", "meh"] * 20),
    " ".join(["bad", "meh"] * 20),  # weak: rejected
)
TOKEN_DELAY_S = 0.01  # 100 tokens/s per stream


def reward(text: str) -> float:
    words = text.split()
    return sum(WEIGHTS.get(w, 0.0) for w in words) + 1e-3 * len(words)


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(TEXTS) as server:
        server.token_delay_s = TOKEN_DELAY_S
        yield server


@pytest.fixture
def gateway(upstream: FakeUpstream) -> Iterator[ServedGateway]:
    # The round rule: every stream here runs at the same rate, so which one reaches a
    # checkpoint first is a race, and per-candidate outcomes would depend on it. The
    # exact outcomes below are the round's (test_per_candidate_over_http: the default).
    config = gateway_config(upstream.url, max_best_of=16, request_timeout_s=30)
    config = config.model_copy(update={"strategy": StrategyConfig(rejection="round")})
    with ServedGateway(config, FakeScorer(reward_fn=reward)) as served:
        yield served


def test_per_candidate_over_http(upstream: FakeUpstream) -> None:
    # The default rule over real streams. Whatever order the four reach 5 tokens in,
    # candidate 1 (the weakest start) is the lowest of those seen when it is judged,
    # so it is rejected there and its stream closed; the winner is the best finished.
    config = gateway_config(upstream.url, max_best_of=16, request_timeout_s=30)
    assert config.strategy.rejection == "per_candidate"
    with ServedGateway(config, FakeScorer(reward_fn=reward)) as served:
        reply = httpx.post(f"{served.http_url}/v1/chat/completions", json=body(checkpoints=[5]), timeout=30)
    assert reply.status_code == 200, reply.text
    candidates = {c["index"]: c for c in reply.json()["candidates"]}
    assert candidates[1]["finish_reason"] == "rejected" and candidates[1]["rejected_at"] == 5
    assert candidates[0]["finish_reason"] != "rejected"  # the best start is never the lowest
    finished = [c for c in candidates.values() if c["finish_reason"] != "rejected"]
    best = max(finished, key=lambda c: reward(TEXTS[c["index"]]))
    assert reply.json()["choices"][0]["message"]["content"] == TEXTS[best["index"]]
    stream = {s.seed: s for s in upstream.streams}[1]
    assert upstream_wait(lambda: stream.closed_by_client is not None)
    assert not stream.completed and stream.tokens_sent <= 5 + 12


def body(**extra: object) -> dict[str, object]:
    return {
        "messages": QUESTION,
        "best_of": 4,
        "seed": 0,
        "strategy": "speculative_rejection",
        "rejection_rate": 0.5,
        "checkpoints": [5, 20],
        "return_candidates": True,
        **extra,
    }


def test_rejected_streams_are_closed_at_their_checkpoint(
    gateway: ServedGateway, upstream: FakeUpstream
) -> None:
    reply = httpx.post(f"{gateway.http_url}/v1/chat/completions", json=body(), timeout=30)
    assert reply.status_code == 200, reply.text
    data = reply.json()
    candidates = {c["index"]: c for c in data["candidates"]}
    rejected = {i for i, c in candidates.items() if c["finish_reason"] == "rejected"}
    # Two at 5 tokens (the weak starts), then the lower of the two left at 20.
    assert rejected == {0, 1, 3}
    assert {i: c["rejected_at"] for i, c in candidates.items() if i in rejected} == {0: 20, 1: 5, 3: 5}
    # The winner is the best finished candidate by the reward model.
    assert data["choices"][0]["message"]["content"] == TEXTS[2]
    assert data["choices"][0]["reward"] == pytest.approx(reward(TEXTS[2]))
    streams = {s.seed: s for s in upstream.streams}
    for index in rejected:
        stream = streams[index]
        # The upstream saw the client leave, soon after the checkpoint: at 100 tokens/s
        # and instant scoring, well before the 40-token answer was done.
        assert upstream_wait(lambda s=stream: s.closed_by_client is not None)
        assert not stream.completed
        assert stream.tokens_sent <= candidates[index]["rejected_at"] + 12
    assert streams[2].completed
    # The reply counts what the upstream generated, not best_of x the full length.
    assert data["usage"]["completion_tokens"] < 4 * 40


def upstream_wait(predicate: object, timeout_s: float = 5.0) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return bool(predicate())  # type: ignore[operator]


def test_grpc_stream_reports_each_checkpoint(gateway: ServedGateway) -> None:
    request = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="Pick one.")],
        best_of=4,
        sampling=pb.SamplingParams(seed=0),
        strategy="speculative_rejection",
        rejection_rate=0.5,
        checkpoints=[5, 20],
        return_candidates=True,
    )
    with grpc.insecure_channel(gateway.grpc_target) as channel:
        events = list(pb_grpc.BestOfNStub(channel).GenerateStream(request, timeout=30))
    checkpoints = [e.checkpoint for e in events if e.HasField("checkpoint")]
    assert [c.tokens for c in checkpoints] == [5, 20]
    assert sorted(checkpoints[0].rejected) == [1, 3]
    first = {s.index: s.reward for s in checkpoints[0].scored}
    assert first == pytest.approx({i: reward("".join(tokens_of(t)[:5])) for i, t in enumerate(TEXTS)})
    result = events[-1].result
    assert result.candidates[0].text == TEXTS[2]
    assert sorted(r.index for r in result.rejected) == [0, 1, 3]
    assert {r.index: r.checkpoint for r in result.rejected} == {0: 20, 1: 5, 3: 5}


def test_the_last_candidate_left_streams_to_the_client(gateway: ServedGateway) -> None:
    # A rate that leaves one candidate after the first checkpoint: its tokens then reach
    # the client as they arrive, in several chunks, before the final one.
    payload = body(rejection_rate=0.75, checkpoints=[5], stream=True)
    contents: list[str] = []
    with httpx.stream("POST", f"{gateway.http_url}/v1/chat/completions", json=payload, timeout=30) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        contents.append(text)
    assert "".join(contents) == TEXTS[0]
    assert len(contents) > 5


def test_bad_rejection_fields_are_400s(gateway: ServedGateway) -> None:
    for extra, param in (
        ({"rejection_rate": 1.5}, "rejection_rate"),
        ({"checkpoints": [20, 5]}, "checkpoints"),
        ({"strategy": "beam"}, "strategy"),
    ):
        reply = httpx.post(f"{gateway.http_url}/v1/chat/completions", json=body(**extra), timeout=30)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == param


def test_deadline_and_min_candidates_hold_on_streams(upstream: FakeUpstream) -> None:
    # 40 tokens at 0.05 s = 2 s per answer, a 1 s deadline: nothing finishes in time.
    upstream.token_delay_s = 0.05
    config = gateway_config(upstream.url, max_best_of=16, request_timeout_s=1.0)
    with ServedGateway(config, FakeScorer(reward_fn=reward)) as served:
        reply = httpx.post(f"{served.http_url}/v1/chat/completions", json=body(), timeout=30)
        assert reply.status_code == 504
        # Every stream was closed by the gateway at the deadline, none ran to its end.
        assert upstream_wait(lambda: all(s.closed_by_client for s in upstream.streams))
        assert not any(s.completed for s in upstream.streams)
        reply = httpx.post(
            f"{served.http_url}/v1/chat/completions", json=body(min_candidates=1, best_of=2), timeout=30
        )
        assert reply.status_code == 504  # min_candidates cannot save what never finished


@pytest.mark.slow
def test_nothing_leaks_after_1000_requests_with_faults(upstream: FakeUpstream) -> None:
    # Mixed traffic: both strategies, failing candidates (500s), clients that hang up
    # mid-request. Afterwards the gateway holds no more tasks than before, every scoring
    # group was closed and every upstream stream ended.
    import asyncio
    import random

    upstream.token_delay_s = 0.0005
    upstream.fail_seeds = {3, 7}
    scorer = FakeScorer(reward_fn=reward)
    config = gateway_config(upstream.url, max_best_of=16, request_timeout_s=30)
    with ServedGateway(config, scorer) as served:
        url = f"{served.http_url}/v1/chat/completions"
        baseline = served.in_loop(lambda: len(asyncio.all_tasks()))
        rng = random.Random(7)

        async def traffic() -> dict[str, int]:
            outcomes: dict[str, int] = {}
            gate = asyncio.Semaphore(16)
            async with httpx.AsyncClient(timeout=30) as client:

                async def one(i: int) -> None:
                    payload = body(seed=rng.randrange(8), min_candidates=2)
                    if i % 3 == 0:
                        payload = {
                            k: v for k, v in payload.items() if k not in ("rejection_rate", "checkpoints")
                        }
                        payload["strategy"] = "best_of_n"
                    async with gate:
                        try:
                            timeout = 0.005 if i % 10 == 0 else 30  # some clients leave early
                            reply = await client.post(url, json=payload, timeout=timeout)
                            key = str(reply.status_code)
                        except httpx.TimeoutException:
                            key = "client_left"
                    outcomes[key] = outcomes.get(key, 0) + 1

                await asyncio.gather(*(one(i) for i in range(1000)))
            return outcomes

        outcomes = asyncio.run(traffic())
        # A 504 is a request whose streams sent nothing for the whole 30 s deadline: seen about
        # once in two runs on a loaded 2-core machine (all of this shares one process and its
        # GIL), not in a standalone 3,000-request run; a few are tolerated, the leak checks below
        # are the point.
        assert outcomes.get("200", 0) > 700 and set(outcomes) <= {"200", "503", "504", "client_left"}, (
            outcomes
        )
        assert outcomes.get("504", 0) <= 3, outcomes
        assert upstream_wait(lambda: served.in_loop(lambda: len(asyncio.all_tasks())) <= baseline, 10)
        assert upstream_wait(lambda: all(g.closed for g in scorer.groups), 10)
        assert len(scorer.groups) >= 900
        assert upstream_wait(lambda: all(s.completed or s.closed_by_client for s in upstream.streams), 10)


def test_rejecting_the_last_live_candidate_ends_the_request() -> None:
    # Candidate 0 finishes at once ("good"), candidate 1 is still streaming at the
    # checkpoint with a weak start: rejecting it leaves no stream open. The generation
    # run must end then (it once waited for an event that never came: a 504).
    texts = ("good", " ".join(["bad"] * 40))
    with FakeUpstream(texts) as server:
        server.token_delay_s = TOKEN_DELAY_S
        config = gateway_config(server.url, max_best_of=16, request_timeout_s=10)
        with ServedGateway(config, FakeScorer(reward_fn=reward)) as served:
            payload = body(best_of=2, checkpoints=[5])
            reply = httpx.post(f"{served.http_url}/v1/chat/completions", json=payload, timeout=30)
            assert reply.status_code == 200, reply.text
            candidates = {c["index"]: c for c in reply.json()["candidates"]}
            assert candidates[0]["rank"] == 1 and candidates[1]["finish_reason"] == "rejected"
