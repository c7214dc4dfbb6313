"""The batch loop: rows in, Best-of-N requests out with bounded concurrency, one
whole output line per finished row, failures to a separate errors file.

Output rows land in completion order, not input order; `id` is the key. A row
is either in the output (finished) or not (to be run again): a failed row goes
to the errors file only, so resuming retries it and the output never mixes
results with error markers.

Stopping: `stop` (set by SIGINT/SIGTERM when run from the CLI) cancels the rows
in flight. A cancelled row has written nothing, and writes are plain
synchronous calls between awaits, so cancellation never cuts a line.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bon_gateway.batch.clients import BatchClient, RequestFailed
from bon_gateway.batch.io import JsonlAppender, repair_tail, scan_output
from bon_gateway.batch.records import build_record, error_record
from bon_gateway.batch.rows import BatchItem, RowError
from bon_gateway.logs import log_phase
from bon_gateway.retry import GaveUp, RetryPolicy, retry_call

__all__ = ["BatchOptions", "RunStats", "build_payload", "install_stop_signals", "run_batch"]

log = logging.getLogger("bon_gateway.batch")

MAX_BACKOFF_S = 30.0


@dataclass(frozen=True, slots=True)
class BatchOptions:
    """Request and run settings shared by every row."""

    best_of: int = 4
    reward_model: str | None = None
    selection: str = "argmax"
    aggregation: str = "last"
    model: str | None = None
    temperature: float | None = 0.8
    top_p: float | None = None
    max_tokens: int | None = 256
    seed: int | None = None
    stop: tuple[str, ...] = ()
    concurrency: int = 4
    retries: int = 2
    backoff_s: float = 1.0
    progress: bool = True
    fsync: bool = True
    # This many rows failing one after another means the gateway or its upstream
    # is down: stop instead of marking every remaining row failed (0 = never).
    max_consecutive_failures: int = 20


@dataclass(slots=True)
class RunStats:
    """What one invocation did (the output file may hold rows of earlier runs too)."""

    input_rows: int = 0
    skipped: int = 0  # already in the output
    todo: int = 0
    done: int = 0
    failed: int = 0
    invalid: int = 0  # rows rejected before any request (bad JSON, no messages, duplicate id)
    retried: int = 0
    interrupted: bool = False
    gave_up: str | None = None  # why the run stopped early on its own (consecutive failures)
    repaired_bytes: int = 0
    seconds: float = 0.0
    candidates: int = 0
    completion_tokens: int = 0
    correct: list[bool] = field(default_factory=list)  # selected-candidate correctness, this run
    finished_ids: list[str] = field(default_factory=list)  # rows this run wrote, in completion order
    candidates_seen: int = 0  # candidates reported finished while rows were in flight

    @property
    def rows_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0


def build_payload(item: BatchItem, options: BatchOptions) -> dict[str, Any]:
    """The /v1/chat/completions body for one row (Best-of-N extras included)."""
    payload: dict[str, Any] = {
        "messages": [dict(m) for m in item.messages],
        "best_of": options.best_of,
        "n": 1,
        "return_candidates": True,
        "selection": options.selection,
        "aggregation": options.aggregation,
    }
    optional = {
        "model": options.model,
        "reward_model": options.reward_model,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "max_tokens": options.max_tokens,
        "seed": options.seed,
        "stop": list(options.stop) or None,
    }
    payload.update({k: v for k, v in optional.items() if v is not None})
    return payload


def install_stop_signals(stop: asyncio.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM set `stop` once; a second Ctrl-C interrupts at once. Returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def undo() -> None:
        for sig in signals:
            loop.remove_signal_handler(sig)

    def on_signal() -> None:
        if not stop.is_set():
            print(
                "\nbon-gateway batch: stopping (rows already written are kept; Ctrl-C again to "
                "abort at once)",
                file=sys.stderr,
                flush=True,
            )
        stop.set()
        undo()  # the next Ctrl-C raises KeyboardInterrupt as usual

    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    return undo


def _retry_after(failure: Exception) -> float | None:
    """Rows are retried on failures that may pass (429, 5xx, timeouts); not on a 400."""
    return 0.0 if isinstance(failure, RequestFailed) and failure.retryable else None


def _plan(
    items: Iterable[BatchItem | RowError], done_ids: set[str], errors: JsonlAppender, stats: RunStats
) -> list[BatchItem]:
    """Rows still to run, in input order; bad rows and duplicate ids go to the errors file."""
    seen: set[str] = set()
    todo: list[BatchItem] = []
    for item in items:
        stats.input_rows += 1
        if isinstance(item, RowError):
            if item.row_id not in done_ids:
                errors.write(error_record(item.row_id, item.message, attempts=0, seconds=0.0))
                stats.invalid += 1
            continue
        if item.id in seen:
            # Resuming keys on ids: a second row with the same id could never be told apart.
            errors.write(error_record(item.raw_id, "duplicate id in the input", attempts=0, seconds=0.0))
            stats.invalid += 1
            continue
        seen.add(item.id)
        if item.id in done_ids:
            stats.skipped += 1
        else:
            todo.append(item)
    return todo


def _progress(total: int, enabled: bool, *, unit: str = "row", position: int = 0) -> Any:
    from tqdm.auto import tqdm  # type: ignore[import-untyped]

    interactive = sys.stderr.isatty()
    # Logs (not a terminal) get a line every 30 s instead of a redraw every 0.1 s.
    return tqdm(
        total=total,
        unit=unit,
        desc=f"{unit}s",
        position=position,
        dynamic_ncols=True,
        disable=not enabled,
        mininterval=0.5 if interactive else 30.0,
        file=sys.stderr,
        smoothing=0.1,
    )


async def run_batch(
    items: Iterable[BatchItem | RowError],
    client: BatchClient,
    output: Path,
    errors_path: Path,
    options: BatchOptions,
    *,
    stop: asyncio.Event | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    on_candidates: Callable[[int], None] | None = None,
) -> RunStats:
    """Run every row not yet in `output`; returns what this run did. Never raises for one row.

    Two progress bars: finished rows, and candidates as the client reports them finishing
    (`follow_candidates`), so the display moves while long rows are still in flight;
    `on_candidates` receives the same counts."""
    stop = stop or asyncio.Event()
    stats = RunStats()
    started = time.perf_counter()
    state = scan_output(output, repair=True)
    stats.repaired_bytes = state.repaired_bytes
    repair_tail(errors_path)
    with (
        JsonlAppender(output, fsync=options.fsync) as out,
        JsonlAppender(errors_path, fsync=options.fsync) as err,
    ):
        todo = _plan(items, state.done_ids, err, stats)
        stats.todo = len(todo)
        log_phase(
            log,
            "plan",
            input_rows=stats.input_rows,
            skipped=stats.skipped,
            todo=stats.todo,
            invalid=stats.invalid,
        )
        if not todo:
            stats.seconds = time.perf_counter() - started
            return stats
        bar = _progress(len(todo), options.progress)
        candidate_bar = _progress(len(todo) * options.best_of, options.progress, unit="candidate", position=1)

        def candidates_finished(count: int) -> None:
            stats.candidates_seen += count
            candidate_bar.update(count)
            if on_candidates is not None:
                on_candidates(count)

        follow = getattr(client, "follow_candidates", None)
        follower = (
            asyncio.create_task(follow(candidates_finished), name="batch-candidates") if follow else None
        )
        queue = iter(todo)
        halt = asyncio.Event()  # set by the consecutive-failure breaker
        streak = [0]

        def failed(item: BatchItem, failure: BaseException, attempts: int, row_started: float) -> None:
            err.write(
                error_record(
                    item.raw_id, failure, attempts=attempts, seconds=time.perf_counter() - row_started
                )
            )
            stats.failed += 1
            streak[0] += 1
            limit = options.max_consecutive_failures
            if limit and streak[0] >= limit and not halt.is_set():
                stats.gave_up = f"{streak[0]} rows failed in a row, the last with: {str(failure)[:300]}"
                halt.set()

        policy = RetryPolicy(options.retries, options.backoff_s, MAX_BACKOFF_S, jitter=False)

        async def retried(failure: Exception, attempt: int) -> None:
            stats.retried += 1

        async def one(item: BatchItem) -> None:
            payload = build_payload(item, options)
            row_started = time.perf_counter()
            try:
                body = await retry_call(
                    lambda _: client.complete(payload),
                    policy,
                    retry_after=_retry_after,
                    before_retry=retried,
                )
                # math-verify's sympy can take milliseconds per comparison: off the loop.
                record = await asyncio.to_thread(
                    build_record,
                    item,
                    body,
                    best_of=options.best_of,
                    seconds=time.perf_counter() - row_started,
                )
            except GaveUp as gave_up:
                if not isinstance(gave_up.last, RequestFailed):
                    log.warning("row %s failed: %s", item.id, type(gave_up.last).__name__)
                failed(item, gave_up.last, gave_up.attempts, row_started)
                return
            except Exception as failure:  # one bad reply must not end the job
                log.warning("row %s failed: %s", item.id, type(failure).__name__)
                failed(item, failure, 1, row_started)
                return
            out.write(record)
            streak[0] = 0
            stats.done += 1
            stats.finished_ids.append(str(record["id"]))
            stats.candidates += len(record["candidates"])
            stats.completion_tokens += int(record["usage"].get("completion_tokens") or 0)
            if "correct" in record:
                stats.correct.append(bool(record["correct"]))
            if on_row is not None:
                on_row(record)
            return

        async def lane() -> None:
            for item in queue:  # shared iterator: each lane takes the next row
                if stop.is_set() or halt.is_set():
                    return
                await one(item)
                bar.update(1)
                postfix: dict[str, object] = {"failed": stats.failed}
                if stats.correct:
                    postfix["acc"] = f"{sum(stats.correct) / len(stats.correct):.3f}"
                bar.set_postfix(postfix, refresh=False)

        lanes = [
            asyncio.create_task(lane(), name=f"batch-lane-{i}")
            for i in range(max(1, min(options.concurrency, len(todo))))
        ]
        stopper = asyncio.create_task(stop.wait(), name="batch-stop")
        halter = asyncio.create_task(halt.wait(), name="batch-halt")
        watchers = {stopper, halter}
        extra_tasks = [follower] if follower is not None else []
        try:
            pending: set[asyncio.Task[Any]] = set(lanes)
            while pending and not stop.is_set() and not halt.is_set():
                done, pending = await asyncio.wait(pending | watchers, return_when=asyncio.FIRST_COMPLETED)
                pending -= watchers
                if any(t not in watchers and not t.cancelled() and t.exception() for t in done):
                    break  # a lane crashed: stop the others
        finally:
            stats.interrupted = stop.is_set() and stats.done + stats.failed < stats.todo
            for task in (*lanes, *watchers, *extra_tasks):
                task.cancel()
            results = await asyncio.gather(*lanes, *watchers, return_exceptions=True)
            await asyncio.gather(*extra_tasks, return_exceptions=True)  # progress only: never fatal
            candidate_bar.close()
            bar.close()
            stats.seconds = time.perf_counter() - started
        crashes = [r for r in results if isinstance(r, Exception)]
        if crashes:
            # Not a row failure (those are caught per row) but the job's own I/O,
            # e.g. a full disk: stop rather than report a run that silently did less.
            raise crashes[0]
    return stats
