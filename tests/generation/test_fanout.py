"""UpstreamClient against a real (fault-injecting) HTTP upstream on 127.0.0.1:
fan-out modes, seeds, retries, Retry-After, resets, deadlines, cancellation,
client-fault 4xx, ejection and fallback across replicas."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from bon_gateway.config import GatewayConfig, GeneratorConfig
from bon_gateway.engine.engine import Engine
from bon_gateway.errors import DeadlineExceeded, InvalidRequest, Unavailable
from bon_gateway.generation.upstream import UpstreamClient
from bon_gateway.metrics import Metrics
from bon_gateway.types import (
    BonRequest,
    BonResult,
    Deadline,
    Dropped,
    Failed,
    Finished,
    Message,
    Progress,
    SamplingParams,
)
from tests.fakes import FakeScorer, unused_port
from tests.fakes.fault_upstream import FaultUpstream, Garbage, Hang, Reply, Reset

pytestmark = pytest.mark.integration

TEXTS = ("alpha", "beta", "gamma", "delta")


def request(best_of: int = 4, seed: int | None = 0, **kwargs: Any) -> BonRequest:
    return BonRequest(
        messages=(Message("user", "say a word"),),
        best_of=best_of,
        sampling=SamplingParams(seed=seed, max_tokens=8),
        **kwargs,
    )


def client(*urls: str, metrics: Metrics | None = None, **generator: Any) -> UpstreamClient:
    config = GeneratorConfig.model_validate(
        {"urls": list(urls), "model": "m", "backoff_base_s": 0.01, "backoff_max_s": 0.05, **generator}
    )
    return UpstreamClient(config, metrics or Metrics())


def engine(upstream: UpstreamClient, scorer: FakeScorer | None = None) -> Engine:
    config = GatewayConfig.model_validate({"generator": upstream.config.model_dump()})
    return Engine(
        config, upstream, scorer or FakeScorer({t: i for i, t in enumerate(TEXTS)}), upstream.metrics
    )


async def run(engine: Engine, request: BonRequest, timeout_s: float = 30.0) -> BonResult:
    """The engine's own path: admission, then the run under one deadline."""
    return await engine.run(engine.admit(request), Deadline.after(timeout_s))


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


# -- modes and seeds -------------------------------------------------------------
async def test_parallel_mode_sends_n_calls_with_distinct_seeds(fault: FaultUpstream) -> None:
    up = client(fault.url)
    result = await up.generate(request(seed=10), Deadline.after(30))
    await up.aclose()
    assert sorted(c.body["seed"] for c in fault.calls) == [10, 11, 12, 13]
    assert all(c.body["n"] == 1 for c in fault.calls)
    assert [g.text for g in result.generations] == [TEXTS[(10 + i) % 4] for i in range(4)]
    assert result.dropped == []


async def test_without_a_seed_the_seeds_are_still_distinct(fault: FaultUpstream) -> None:
    up = client(fault.url)
    await up.generate(request(seed=None), Deadline.after(30))
    await up.aclose()
    seeds = sorted(c.body["seed"] for c in fault.calls)
    assert seeds == list(range(seeds[0], seeds[0] + 4))


async def test_n_mode_is_one_call_when_the_upstream_honours_n(fault: FaultUpstream) -> None:
    fault.honours_n = True
    metrics = Metrics()
    up = client(fault.url, mode="n", metrics=metrics)
    result = await run(engine(up), request())
    await up.aclose()
    assert [(c.body["n"], c.body["seed"]) for c in fault.calls] == [(4, 0)]
    assert sorted(c.text for c in result.ranked) == sorted(TEXTS)
    assert result.usage.candidates_generated == 4
    assert result.usage.completion_tokens == 4  # one word each, summed over the candidates


async def test_n_mode_tops_up_when_the_upstream_ignores_n(fault: FaultUpstream) -> None:
    up = client(fault.url, mode="n")
    result = await up.generate(request(), Deadline.after(30))
    await up.aclose()
    assert fault.calls[0].body["n"] == 4
    assert sorted((c.body["n"], c.body["seed"]) for c in fault.calls[1:]) == [(1, 1), (1, 2), (1, 3)]
    assert [g.text for g in result.generations] == list(TEXTS)


@pytest.mark.parametrize("honours", [True, False])
async def test_auto_mode_probes_once_and_remembers(fault: FaultUpstream, honours: bool) -> None:
    fault.honours_n = honours
    up = client(fault.url, mode="auto")
    first = await up.generate(request(), Deadline.after(30))
    assert up.endpoints[0].honours_n is honours
    fault.calls.clear()
    second = await up.generate(request(seed=4), Deadline.after(30))
    await up.aclose()
    assert [g.text for g in first.generations] == list(TEXTS)
    assert [g.text for g in second.generations] == list(TEXTS)
    if honours:
        assert [c.body["n"] for c in fault.calls] == [4]
    else:
        assert sorted(c.body["seed"] for c in fault.calls) == [4, 5, 6, 7]
        assert all(c.body["n"] == 1 for c in fault.calls)


async def test_auto_mode_falls_back_when_n_is_refused(fault: FaultUpstream) -> None:
    fault.rule = lambda body: Reply(400, {"error": {"message": "n must be 1"}}) if body["n"] > 1 else None
    up = client(fault.url, mode="auto")
    result = await up.generate(request(), Deadline.after(30))
    await up.aclose()
    assert [g.text for g in result.generations] == list(TEXTS)
    assert up.endpoints[0].honours_n is False


async def test_completions_use_the_completions_path(fault: FaultUpstream) -> None:
    up = client(fault.url, mode="n")
    result = await up.generate(
        BonRequest(messages=(), prompt="Once upon", best_of=2, sampling=SamplingParams(seed=0)),
        Deadline.after(30),
    )
    await up.aclose()
    assert {c.path for c in fault.calls} == {"/v1/completions"}
    assert [g.text for g in result.generations] == ["alpha", "beta"]


# -- retries ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fault_action", "kind"),
    [
        (Reply(500, {"error": {"message": "boom"}}), "http_5xx"),
        (Reply(503), "http_5xx"),
        (Reset(), "connect_error"),
        (Garbage(), "bad_response"),
        (Reply(429, {"error": {"message": "slow down"}}), "http_4xx"),
    ],
)
async def test_transient_failures_are_retried(fault: FaultUpstream, fault_action: Any, kind: str) -> None:
    fault.script(fault_action)
    metrics = Metrics()
    up = client(fault.url, metrics=metrics)
    result = await up.generate(request(), Deadline.after(30))
    await up.aclose()
    assert [g.text for g in result.generations] == list(TEXTS)
    assert len(fault.calls) == 5
    label = up.endpoints[0].label
    assert sample(metrics, "bon_upstream_errors_total", upstream=label, kind=kind) == 1
    # Every call is timed, the failed one included.
    assert sample(metrics, "bon_upstream_call_duration_seconds_count", upstream=label) == 5


async def test_retry_after_is_honoured(fault: FaultUpstream) -> None:
    fault.rule = lambda body: Reply(429, headers=(("Retry-After", "0.4"),)) if body["seed"] == 2 else None
    fault.script()
    calls_for_2: list[float] = []
    up = client(fault.url, retries=1)

    original = fault.rule

    def rule(body: dict[str, Any]) -> Any:
        if body["seed"] == 2:
            calls_for_2.append(time.monotonic())
            if len(calls_for_2) == 1:
                return original(body)
        return None

    fault.rule = rule
    result = await up.generate(request(), Deadline.after(30))
    await up.aclose()
    assert len(result.generations) == 4
    # A time bound (the retry waits out Retry-After), and a lower one: load only adds to it.
    assert len(calls_for_2) == 2 and calls_for_2[1] - calls_for_2[0] >= 0.38


async def test_retries_exhausted_drop_the_candidate_with_its_reason(fault: FaultUpstream) -> None:
    fault.rule = lambda body: Reply(502, {"error": {"message": "bad gateway"}}) if body["seed"] == 1 else None
    up = client(fault.url, retries=2)
    result = await up.generate(request(), Deadline.after(30))
    await up.aclose()
    assert [g.index for g in result.generations] == [0, 2, 3]
    assert result.dropped == [Dropped("upstream_error", "HTTP 502: bad gateway")]
    assert sum(c.body["seed"] == 1 for c in fault.calls) == 3


async def test_connect_errors_are_retried_then_dropped() -> None:
    up = client(f"http://127.0.0.1:{unused_port()}/v1", retries=1)
    result = await up.generate(request(best_of=2), Deadline.after(30))
    await up.aclose()
    assert result.generations == []
    assert [d.reason for d in result.dropped] == ["connect_error", "connect_error"]


async def test_slow_call_times_out_and_is_retried(fault: FaultUpstream) -> None:
    fault.script(Reply(delay_s=30.0))
    up = client(fault.url, timeout_s=0.3, retries=1)
    result = await up.generate(request(), Deadline.after(60))
    await up.aclose()
    # The first call was given up by the client before the upstream answered it (it
    # would only after 30 s), and retried: 4 candidates from 5 calls.
    assert len(result.generations) == 4 and len(fault.calls) == 5
    slow = fault.calls[0]
    assert fault.wait_until(lambda: slow.closed_by_client is not None)
    assert slow.answered is None


async def test_retry_is_bounded_by_the_deadline(fault: FaultUpstream) -> None:
    # Retry-After 10 s with 0.5 s left: fail at once instead of sleeping into the deadline.
    fault.rule = lambda body: Reply(429, headers=(("Retry-After", "10"),)) if body["seed"] == 0 else None
    up = client(fault.url, retries=5)
    result = await up.generate(request(), Deadline.after(0.5))
    await up.aclose()
    assert len(result.generations) == 3
    # Given up on, not retried and not cut by the deadline while sleeping.
    assert result.dropped[0].reason == "rate_limited" and "no time left" in result.dropped[0].detail
    assert sum(c.body["seed"] == 0 for c in fault.calls) == 1


async def test_backoff_retries_stop_at_the_deadline(fault: FaultUpstream) -> None:
    fault.rule = lambda body: Reply(500) if body["seed"] == 0 else None
    up = client(fault.url, retries=1000, backoff_base_s=0.05, backoff_max_s=0.1)
    started = time.monotonic()
    result = await run(engine(up), request(min_candidates=3), 0.6)
    await up.aclose()
    # A time bound: the retries end with the 0.6 s deadline; without that bound 1,000
    # retries at up to 0.1 s apart would take minutes (generous for a loaded machine).
    assert time.monotonic() - started < 3.0
    assert [c.index for c in result.ranked] != [] and len(result.ranked) == 3
    assert result.dropped[0].reason == "upstream_error"


async def test_a_retry_cut_by_the_deadline_reports_the_failure_it_retried(fault: FaultUpstream) -> None:
    # Seed 0 fails with a 500, then its retry hangs until the deadline: the candidate
    # was lost to the upstream error, whatever the timing of the last attempt.
    tries = {"seed0": 0}

    def rule(body: dict[str, Any]) -> Reply | Hang | None:
        if body["seed"] != 0:
            return None
        tries["seed0"] += 1
        return Reply(500) if tries["seed0"] == 1 else Hang()

    fault.rule = rule
    up = client(fault.url, retries=3, backoff_base_s=0.01, backoff_max_s=0.02)
    result = await run(engine(up), request(min_candidates=3), 0.5)
    await up.aclose()
    assert tries["seed0"] == 2 and len(result.ranked) == 3
    assert result.dropped[0].reason == "upstream_error"
    assert "retrying until the deadline" in result.dropped[0].detail


# -- client faults, deadlines and cancellation ----------------------------------------
async def test_client_fault_4xx_is_an_invalid_request_and_cancels_the_rest(fault: FaultUpstream) -> None:
    message = "Requested tokens (4000) exceed context window of 2048"
    fault.rule = lambda body: Reply(400, {"error": {"message": message}}) if body["seed"] == 3 else Hang()
    up = client(fault.url)
    with pytest.raises(InvalidRequest) as caught:
        await up.generate(request(), Deadline.after(30))
    await up.aclose()
    assert message in caught.value.message
    hung = [c for c in fault.calls if c.body["seed"] != 3]
    assert len(hung) == 3
    assert fault.wait_until(lambda: all(c.closed_by_client is not None for c in hung))


async def test_deadline_cancels_hung_calls_and_the_upstream_sees_it(fault: FaultUpstream) -> None:
    fault.rule = lambda body: Hang()
    up = client(fault.url)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        await run(engine(up), request(), 0.4)
    elapsed = time.monotonic() - started
    await up.aclose()
    # A time bound: generation is cut 10 % before the 0.4 s deadline (leaving time to
    # score what arrived), not earlier; the upper bounds are generous for a loaded
    # machine (the calls hang forever otherwise).
    assert 0.35 <= elapsed < 3.0
    assert len(fault.calls) == 4
    assert fault.wait_until(lambda: all(c.closed_by_client is not None for c in fault.calls))
    assert max(c.closed_by_client or 0 for c in fault.calls) - started < 3.0


async def test_cancelling_the_request_closes_upstream_connections(fault: FaultUpstream) -> None:
    fault.rule = lambda body: Hang()
    up = client(fault.url)
    task = asyncio.ensure_future(run(engine(up), request()))
    assert await asyncio.to_thread(fault.wait_until, lambda: len(fault.calls) == 4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(
        fault.wait_until, lambda: all(c.closed_by_client is not None for c in fault.calls)
    )
    assert up.endpoints[0].outstanding == 0
    await up.aclose()


@pytest.mark.parametrize(
    ("progress", "every", "shown", "retried"),
    [
        (False, 3, [3, 3, 6], True),  # every 3 tokens: the broken stream starts over
        (True, 0, [1, 2, 3, 4], False),  # every chunk: what was shown stands, the candidate fails
    ],
)
async def test_progress_every_k_tokens_leaves_broken_streams_retryable(
    progress: bool, every: int, shown: list[int], retried: bool
) -> None:
    text = "one two three four five six seven"
    with FaultUpstream((text,)) as server:
        server.script(Reply(break_after=4))  # the first call dies after 4 tokens
        up = client(server.url, mode="parallel", retries=1)
        run = up.stream(request(best_of=1), Deadline.after(30), progress=progress, progress_every=every)
        events = [event async for event in run]
        await run.aclose()
        await up.aclose()
        calls = len(server.calls)
    assert [e.tokens for e in events if isinstance(e, Progress)] == shown
    if retried:
        assert calls == 2
        assert [e.generation.text for e in events if isinstance(e, Finished)] == [text]
    else:
        assert calls == 1
        assert [type(e) for e in events if not isinstance(e, Progress)] == [Failed]


async def test_min_candidates(fault: FaultUpstream) -> None:
    fault.rule = lambda body: Reply(500) if body["seed"] in (1, 2) else None
    up = client(fault.url, retries=0)
    gateway = engine(up)
    result = await run(gateway, request(min_candidates=2))
    assert len(result.ranked) == 2 and len(result.dropped) == 2
    assert all(str(d).startswith("upstream_error: HTTP 500") for d in result.dropped)
    with pytest.raises(Unavailable) as caught:
        await run(gateway, request(min_candidates=3))
    await up.aclose()
    assert "only 2 of 4" in caught.value.message and "upstream_error" in caught.value.message


# -- several replicas ----------------------------------------------------------------
async def test_ejection_fallback_and_cooldown(fault: FaultUpstream, fault2: FaultUpstream) -> None:
    fault.rule = lambda body: Reply(500)
    up = client(fault.url, fault2.url, retries=2, eject_after_failures=2, eject_cooldown_s=0.5)
    bad = up.endpoints[0]
    for _ in range(3):
        result = await up.generate(request(), Deadline.after(30))
        assert len(result.generations) == 4, result.dropped
    assert bad.ejected_until > time.monotonic()
    failed_calls = len(fault.calls)
    assert failed_calls >= 2
    for _ in range(3):
        assert len((await up.generate(request(), Deadline.after(30))).generations) == 4
    assert len(fault.calls) == failed_calls  # ejected: no traffic during the cooldown
    # After the cooldown it gets probed again, and a healthy reply brings it back.
    await asyncio.sleep(0.55)
    fault.rule = None
    for _ in range(2):
        assert len((await up.generate(request(), Deadline.after(30))).generations) == 4
    await up.aclose()
    assert len(fault.calls) > failed_calls
    assert bad.consecutive_failures == 0


async def test_load_spreads_over_replicas(fault: FaultUpstream, fault2: FaultUpstream) -> None:
    fault.rule = fault2.rule = lambda body: Reply(delay_s=0.05)
    up = client(fault.url, fault2.url)
    await asyncio.gather(*(up.generate(request(seed=i), Deadline.after(30)) for i in range(4)))
    await up.aclose()
    assert abs(len(fault.calls) - len(fault2.calls)) <= 2
    assert len(fault.calls) + len(fault2.calls) == 16


async def test_a_reset_replica_falls_back_to_the_other(fault: FaultUpstream, fault2: FaultUpstream) -> None:
    fault.rule = lambda body: Reset()
    up = client(fault.url, fault2.url, retries=1)
    result = await up.generate(request(best_of=8), Deadline.after(30))
    await up.aclose()
    assert len(result.generations) == 8 and result.dropped == []


async def test_a_hung_candidate_is_cut_at_the_deadline_and_the_rest_ranked(fault: FaultUpstream) -> None:
    fault.rule = lambda body: Hang() if body["seed"] == 1 else None
    up = client(fault.url)
    started = time.monotonic()
    result = await run(engine(up), request(min_candidates=3), 1.0)
    await up.aclose()
    # A time bound: the hung call is waited for until the cut at 90 % of the 1 s
    # deadline, not given up earlier (the upper bound is generous: it hangs forever).
    assert 0.85 <= time.monotonic() - started < 3.0
    assert sorted(c.index for c in result.ranked) == [0, 2, 3]
    assert result.dropped == [Dropped("deadline", "the request deadline passed during the call")]
    hung = [c for c in fault.calls if c.body["seed"] == 1]
    assert fault.wait_until(lambda: all(c.closed_by_client is not None for c in hung))


async def test_a_bad_prompt_does_not_mark_an_upstream_as_ignoring_n(fault: FaultUpstream) -> None:
    fault.rule = lambda body: Reply(400, {"error": {"message": "prompt too long"}})
    up = client(fault.url, mode="auto")
    with pytest.raises(InvalidRequest):
        await up.generate(request(), Deadline.after(30))
    assert up.endpoints[0].honours_n is None  # still unknown: probed again next time
    fault.rule = None
    fault.honours_n = True
    await up.generate(request(), Deadline.after(30))
    await up.aclose()
    assert up.endpoints[0].honours_n is True
