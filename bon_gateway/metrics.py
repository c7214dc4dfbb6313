"""Every Prometheus metric of the gateway, defined here and nowhere else.

Names are a public API (dashboards and alerts use them): prefix `bon_`, base
units, `_total` counters, bounded labels only (never prompt text or request ids).
A `Metrics` object owns its registry, so nothing is created at import time and
tests can build as many as they like. `Metrics.initialise(config)` creates every
series whose labels are known up front at 0: an absent series makes
rate()/increase() miss its first event, and panels show "No data".
"""

from __future__ import annotations

import platform
from typing import TYPE_CHECKING, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from bon_gateway import __version__
from bon_gateway.backend_metrics import BackendServerMetrics
from bon_gateway.balancer import upstream_label
from bon_gateway.types import DROP_REASONS

if TYPE_CHECKING:
    from bon_gateway.config import GatewayConfig

# LLM requests take from milliseconds (cached scoring) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
REWARD_BUCKETS = (-20, -10, -5, -2, -1, -0.5, 0, 0.25, 0.5, 0.75, 1, 2, 5, 10, 20)
# Worker-side waits and forward passes: sub-millisecond to tens of seconds.
WORKER_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536, 262144)
RATIO_BUCKETS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST

# --- label values known before any traffic (Metrics.initialise creates them at 0) ---
# `api` of bon_requests_total & co: the HTTP routes (api/http_app.py API_LABELS) and the
# BestOfN RPCs (api/grpc_guard.py: "grpc_" + the method in snake case); a test checks
# that the fronts use exactly these.
HTTP_API_LABELS = (
    "chat_completions",
    "completions",
    "rewards",
    "models",
    "classify",
    "pooling",
    "score",
    "rerank",
    "get_reward",
)
GRPC_API_LABELS = ("grpc_generate", "grpc_generate_stream", "grpc_score", "grpc_list_models")
# `status` values the alerts select (server errors, shedding) besides success: HTTP codes
# for the HTTP API, gRPC code names for the gRPC API.
HTTP_STATUSES = ("200", "429", "500", "503", "504")
GRPC_STATUSES = ("OK", "RESOURCE_EXHAUSTED", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED")
PHASES = ("generate", "score", "select", "checkpoint")
# bon_candidates_total{outcome}: generated, scored, rejected (speculative rejection) or
# dropped_<types.DROP_REASONS>.
CANDIDATE_OUTCOMES = ("generated", "scored", "rejected", *(f"dropped_{reason}" for reason in DROP_REASONS))
# bon_upstream_errors_total{kind} (generation/caller.py).
# bon_http_connections_closed_total{reason}: connections the HTTP front closed to protect
# itself (api/http_protocol.py).
HTTP_CLOSE_REASONS = ("header_timeout", "body_timeout", "header_too_large", "evicted", "over_limit")
UPSTREAM_ERROR_KINDS = ("timeout", "connect_error", "http_4xx", "http_5xx", "bad_response")
# bon_upstream_requests_total{status}: 200, the failures the caller names itself, and the
# HTTP codes of a sick or overloaded upstream (others appear as they happen).
UPSTREAM_STATUSES = ("200", "timeout", "connect_error", "bad_response", "429", "500", "502", "503", "504")

_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


class WorkerStatsLike(Protocol):
    """The fields of `bon_gateway.v1.WorkerStats` (duck-typed: no protobuf import here)."""

    queue_seconds: float
    compute_seconds: float
    batch_size: int
    batch_tokens: int
    padded_tokens: int
    reused_prompt_tokens: int


class Metrics:
    """The metric set of one gateway process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # Labelled children by (metric, label values): `labels()` validates and
        # locks on every call, ~2 us, some twenty times per best-of-N request.
        self._children: dict[tuple[int, tuple[str, ...]], object] = {}
        r = self.registry
        self.build_info = Info("bon_build", "Build information of the gateway.", registry=r)
        self.build_info.info({"version": __version__, "python": platform.python_version()})
        self.requests = Counter(
            "bon_requests", "Requests finished, by API and status code.", ["api", "status"], registry=r
        )
        self.request_duration = Histogram(
            "bon_request_duration_seconds",
            "End-to-end request latency by API.",
            ["api"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.requests_in_flight = Gauge(
            "bon_requests_in_flight", "Requests being processed.", ["api"], registry=r
        )
        self.http_connections_closed = Counter(
            "bon_http_connections_closed",
            "HTTP connections closed by the gateway to protect itself: head or body not complete in time, "
            "head over max_header_bytes, evicted past max_connections (the oldest without a "
            "request), or refused there (every connection busy).",
            ["reason"],
            registry=r,
        )
        # Set to read the HTTP front's connection table when it serves (api/server.py).
        self.http_connections_open = Gauge(
            "bon_http_connections_open", "Open HTTP connections (server.limits.max_connections).", registry=r
        )
        self.phase_duration = Histogram(
            "bon_phase_duration_seconds",
            "Duration of each engine phase (generate, score, select).",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.candidates = Counter(
            "bon_candidates",
            "Candidates by outcome (generated, scored, rejected, dropped_timeout, ...).",
            ["outcome"],
            registry=r,
        )
        self.generated_tokens = Histogram(
            "bon_generated_tokens",
            "Tokens the generator produced for one request (all its candidates; the upstream's counts).",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.rejection_tokens_avoided = Counter(
            "bon_rejection_tokens_avoided",
            "Generator tokens not spent thanks to speculative rejection (rejected candidates' remaining "
            "length, estimated by the finished candidates of the same request).",
            registry=r,
        )
        self.upstream_requests = Counter(
            "bon_upstream_requests",
            "Calls to the generator upstream by result (HTTP status or error kind).",
            ["status"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "bon_upstream_request_duration_seconds",
            "Latency of one generator call.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.score_batch_size = Histogram(
            "bon_score_batch_size",
            "Sequences per forward batch on the reward workers.",
            ["model"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.score_batch_tokens = Histogram(
            "bon_score_batch_tokens",
            "Tokens per forward batch on the reward workers (padding included).",
            ["model"],
            buckets=BATCH_TOKEN_BUCKETS,
            registry=r,
        )
        self.scored_tokens = Counter(
            "bon_scored_tokens", "Real (unpadded) tokens scored by the workers.", ["model"], registry=r
        )
        self.reused_prompt_tokens = Counter(
            "bon_reused_prompt_tokens",
            "Prompt tokens not recomputed thanks to reuse (a request's shared prompt, the "
            "workers' prefix caches, a candidate's earlier partial).",
            ["model"],
            registry=r,
        )
        self.rewards = Histogram(
            "bon_reward",
            "Distribution of reward values per reward model.",
            ["model"],
            buckets=REWARD_BUCKETS,
            registry=r,
        )
        self.workers_up = Gauge("bon_workers_up", "Reward workers serving, per model.", ["model"], registry=r)
        self.worker_restarts = Counter(
            "bon_worker_restarts", "Reward worker processes restarted after dying.", ["model"], registry=r
        )

        # --- added for the full operator set (issue 6); labels stay bounded ---
        self.upstream_errors = Counter(
            "bon_upstream_errors",
            "Failed generator calls per upstream (host:port from the config, never a URL with "
            "credentials) and kind (timeout, connect_error, http_4xx, http_5xx, bad_response).",
            ["upstream", "kind"],
            registry=r,
        )
        self.upstream_call_duration = Histogram(
            "bon_upstream_call_duration_seconds",
            "Latency of one generator call per upstream (its _count is the call rate).",
            ["upstream"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.score_queue_depth = Gauge(
            "bon_score_queue_depth",
            "Candidate groups waiting in the gateway's scoring queue, per reward model.",
            ["model"],
            registry=r,
        )
        self.score_queue_capacity = Gauge(
            "bon_score_queue_capacity",
            "Bound of the scoring queue per reward model (beyond it requests are shed with 429).",
            ["model"],
            registry=r,
        )
        self.score_queue_wait = Histogram(
            "bon_score_queue_wait_seconds",
            "Time a group waited on the worker before its batch ran (WorkerStats.queue_seconds).",
            ["model"],
            buckets=WORKER_TIME_BUCKETS,
            registry=r,
        )
        self.score_compute_duration = Histogram(
            "bon_score_compute_seconds",
            "Forward-pass time of the batch that scored a group (WorkerStats.compute_seconds).",
            ["model"],
            buckets=WORKER_TIME_BUCKETS,
            registry=r,
        )
        self.score_padding_ratio = Histogram(
            "bon_score_padding_ratio",
            "Fraction of a forward batch's tokens that are padding (padded_tokens / batch_tokens).",
            ["model"],
            buckets=RATIO_BUCKETS,
            registry=r,
        )
        self.workers_configured = Gauge(
            "bon_workers_configured",
            "Reward workers the pool should have per model (spawned count, or remote endpoints).",
            ["model"],
            registry=r,
        )
        self.prompt_cache_bytes = Gauge(
            "bon_prompt_cache_bytes",
            "Bytes of prompt keys/values the reward workers keep in their prefix caches, pinned "
            "ones included (sum over the workers, as each last reported it).",
            ["model"],
            registry=r,
        )
        self.prompt_cache_entries = Gauge(
            "bon_prompt_cache_entries",
            "Token prefixes kept in the reward workers' prefix caches (sum over the workers).",
            ["model"],
            registry=r,
        )

        # Per HTTP backend server (backend = "vllm" / "sglang"), from the workers' Info
        # replies: bon_backend_server_{up,in_flight,request_duration_seconds,errors_total}.
        self.backend_servers = BackendServerMetrics(r)

    def initialise(self, config: GatewayConfig) -> None:
        """Create every series whose labels are known from `config` and the constants above.

        Counters and histograms start at 0; gauges are created without being set, so
        calling this after the pool has set them (or twice) changes no value.
        """
        for api, statuses in (
            *((api, HTTP_STATUSES) for api in HTTP_API_LABELS),
            *((api, GRPC_STATUSES) for api in GRPC_API_LABELS),
        ):
            self.child(self.requests_in_flight, api)
            self.child(self.request_duration, api)
            for status in statuses:
                self.child(self.requests, api, status)
        for reason in HTTP_CLOSE_REASONS:
            self.child(self.http_connections_closed, reason)
        for phase in PHASES:
            self.child(self.phase_duration, phase)
        for outcome in CANDIDATE_OUTCOMES:
            self.child(self.candidates, outcome)
        for status in UPSTREAM_STATUSES:
            self.child(self.upstream_requests, status)
        for index, url in enumerate(config.generator.base_urls):
            upstream = upstream_label(url, index)
            self.child(self.upstream_call_duration, upstream)
            for kind in UPSTREAM_ERROR_KINDS:
                self.child(self.upstream_errors, upstream, kind)
        per_model: tuple[Counter | Gauge | Histogram, ...] = (
            self.score_batch_size,
            self.score_batch_tokens,
            self.scored_tokens,
            self.reused_prompt_tokens,
            self.rewards,
            self.workers_up,
            self.worker_restarts,
            self.score_queue_depth,
            self.score_queue_capacity,
            self.score_queue_wait,
            self.score_compute_duration,
            self.score_padding_ratio,
            self.workers_configured,
            self.prompt_cache_bytes,
            self.prompt_cache_entries,
        )
        for entry in config.reward_models:
            for metric in per_model:
                metric.labels(entry.name)
            if entry.backend != "workers":
                for index, url in enumerate(entry.backend_urls):
                    self.backend_servers.known(entry.name, upstream_label(url, index))

    def child(self, metric: _Metric, *values: str) -> _Metric:
        """`metric.labels(*values)`, looked up once (labels are bounded, so is the cache)."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found  # type: ignore[return-value]

    def observe_worker_stats(self, model: str, stats: WorkerStatsLike, scored_tokens: int = 0) -> None:
        """Record the figures a RewardWorker returned with one scored group.

        Call it once per WorkerScoreResponse, with `scored_tokens` = the reply's
        `total_tokens` (the group's own tokens: batch figures are shared by every
        group of a batch, so they must not be summed into the token counter).
        """
        self.score_queue_wait.labels(model).observe(stats.queue_seconds)
        self.score_compute_duration.labels(model).observe(stats.compute_seconds)
        if stats.batch_size > 0:
            self.score_batch_size.labels(model).observe(stats.batch_size)
        if stats.batch_tokens > 0:
            self.score_batch_tokens.labels(model).observe(stats.batch_tokens)
            self.score_padding_ratio.labels(model).observe(stats.padded_tokens / stats.batch_tokens)
        if scored_tokens > 0:
            self.scored_tokens.labels(model).inc(scored_tokens)
        if stats.reused_prompt_tokens > 0:
            self.reused_prompt_tokens.labels(model).inc(stats.reused_prompt_tokens)

    def render(self) -> bytes:
        """The classic Prometheus text format (what `promtool check metrics` accepts)."""
        return generate_latest(self.registry)
