"""Per-server metrics of the HTTP scoring backends (backend = "vllm" / "sglang").

The servers are called by the reward workers, which import no prometheus_client:
each worker counts its calls per server (scoring/worker/http_backend.py ServerStats)
and its Info reply carries the figures, cumulative since it started
(WorkerInfoResponse.backend_servers). The pool hands every Info it gets (its
probes, every `probe.interval_s`) to `record`; this collector sums the workers'
figures when /metrics is scraped:

- bon_backend_server_up{model,server}: 1 while a serving worker has it in rotation
  (not ejected), else 0;
- bon_backend_server_in_flight{model,server}: calls on it now (sum over the workers;
  the workers keep no queue of their own for these servers: each group is sent at
  once, so this is what the server holds, queued or running);
- bon_backend_server_request_duration_seconds{model,server}: call latency;
- bon_backend_server_errors_total{model,server,kind}: failed calls by kind.

A worker that restarts starts counting from 0 again (a new pid): what it had
counted is kept, so the counters never go down. Every series of the configured
servers exists from start-up, at 0 (`known`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from bon_gateway.types import BACKEND_ERROR_KINDS, BACKEND_LATENCY_BUCKETS

__all__ = ["BackendServerLike", "BackendServerMetrics"]

_Key = tuple[str, str]  # (model, server)


class BackendServerLike(Protocol):
    """The fields of `bon_gateway.v1.BackendServer` (duck-typed: no protobuf import here)."""

    @property
    def model(self) -> str: ...
    @property
    def server(self) -> str: ...
    @property
    def up(self) -> bool: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def latency_counts(self) -> Sequence[int]: ...
    @property
    def latency_sum(self) -> float: ...
    @property
    def errors(self) -> Mapping[str, int]: ...


@dataclass(slots=True)
class _Counts:
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(BACKEND_LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(BACKEND_ERROR_KINDS, 0))

    def add(self, other: _Counts) -> None:
        for i, n in enumerate(other.latency_counts[: len(self.latency_counts)]):
            self.latency_counts[i] += n
        self.latency_sum += other.latency_sum
        for kind, n in other.errors.items():
            self.errors[kind] = self.errors.get(kind, 0) + n


@dataclass(slots=True)
class _WorkerView:
    pid: int
    serving: bool
    up: dict[_Key, bool]
    in_flight: dict[_Key, int]
    counts: dict[_Key, _Counts]


class BackendServerMetrics(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self._known: dict[_Key, None] = {}
        self._workers: dict[object, _WorkerView] = {}
        self._retired: dict[_Key, _Counts] = {}  # what workers counted before they restarted
        registry.register(self)

    def known(self, model: str, server: str) -> None:
        """A configured server: its series exist (at 0) before any worker reports."""
        self._known[(model, server)] = None

    def record(self, worker: object, pid: int, servers: Iterable[BackendServerLike]) -> None:
        """The figures of one worker's Info reply (cumulative since that process started)."""
        view = _WorkerView(pid, True, {}, {}, {})
        for s in servers:
            key = (s.model, s.server)
            self._known.setdefault(key, None)
            view.up[key] = s.up
            view.in_flight[key] = s.in_flight
            counts = _Counts(list(s.latency_counts), s.latency_sum, dict(s.errors))
            counts.latency_counts += [0] * (len(BACKEND_LATENCY_BUCKETS) + 1 - len(counts.latency_counts))
            view.counts[key] = counts
        before = self._workers.get(worker)
        if before is not None and before.pid != pid:  # restarted: keep what the old process counted
            for key, counts in before.counts.items():
                self._retired.setdefault(key, _Counts()).add(counts)
        self._workers[worker] = view

    def not_serving(self, worker: object) -> None:
        """The worker is down: its servers' up and in-flight no longer count (its counts do)."""
        view = self._workers.get(worker)
        if view is not None:
            view.serving = False

    def collect(self) -> Iterator[Metric]:
        labels = ["model", "server"]
        up = GaugeMetricFamily(
            "bon_backend_server_up",
            "1 while a serving reward worker has this HTTP backend server (vLLM/SGLang) in rotation.",
            labels=labels,
        )
        in_flight = GaugeMetricFamily(
            "bon_backend_server_in_flight",
            "Scoring calls on this HTTP backend server now (sum over the reward workers).",
            labels=labels,
        )
        duration = HistogramMetricFamily(
            "bon_backend_server_request_duration_seconds",
            "Latency of the reward workers' scoring calls to this HTTP backend server.",
            labels=labels,
        )
        errors = CounterMetricFamily(
            "bon_backend_server_errors",
            "Failed scoring calls to this HTTP backend server, by kind.",
            labels=[*labels, "kind"],
        )
        bounds = [f"{float(b):g}" for b in BACKEND_LATENCY_BUCKETS]
        for key in self._known:
            total = _Counts()
            total.add(self._retired.get(key, _Counts()))
            is_up, busy = False, 0
            for view in self._workers.values():
                if key in view.counts:
                    total.add(view.counts[key])
                if view.serving:
                    is_up = is_up or view.up.get(key, False)
                    busy += view.in_flight.get(key, 0)
            up.add_metric(list(key), 1.0 if is_up else 0.0)
            in_flight.add_metric(list(key), float(busy))
            cumulative, running = [], 0
            for bound, n in zip([*bounds, "+Inf"], total.latency_counts, strict=True):
                running += n
                cumulative.append((bound, float(running)))
            duration.add_metric(list(key), cumulative, total.latency_sum)
            for kind in sorted({*BACKEND_ERROR_KINDS, *total.errors}):
                errors.add_metric([*key, kind], float(total.errors.get(kind, 0)))
        yield from (up, in_flight, duration, errors)
