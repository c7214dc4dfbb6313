"""Every Prometheus metric of the gateway, defined here and nowhere else.

Names are a public API (dashboards and alerts use them): prefix `bon_`, base
units, `_total` counters, bounded labels only (never prompt text or request ids).
A `Metrics` object owns its registry, so nothing is created at import time and
tests can build as many as they like.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from bon_gateway import __version__

# LLM requests take from milliseconds (cached scoring) to minutes (long generations).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
BATCH_TOKEN_BUCKETS = (64, 256, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
REWARD_BUCKETS = (-20, -10, -5, -2, -1, -0.5, 0, 0.25, 0.5, 0.75, 1, 2, 5, 10, 20)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The metric set of one gateway process."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.build_info = Info("bon_build", "Build information of the gateway.", registry=r)
        self.build_info.info({"version": __version__})
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
        self.phase_duration = Histogram(
            "bon_phase_duration_seconds",
            "Duration of each engine phase (generate, score, select).",
            ["phase"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.candidates = Counter(
            "bon_candidates",
            "Candidates by outcome (generated, scored, dropped_upstream, dropped_timeout, ...).",
            ["outcome"],
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
            "Prompt tokens not recomputed thanks to shared-prompt reuse.",
            ["model"],
            registry=r,
        )
        self.rewards = Histogram(
            "bon_reward", "Distribution of reward values per reward model.", ["model"],
            buckets=REWARD_BUCKETS, registry=r,
        )
        self.workers_up = Gauge("bon_workers_up", "Reward workers serving, per model.", ["model"], registry=r)
        self.worker_restarts = Counter(
            "bon_worker_restarts", "Reward worker processes restarted after dying.", ["model"], registry=r
        )

    def render(self) -> bytes:
        """The classic Prometheus text format (what `promtool check metrics` accepts)."""
        return generate_latest(self.registry)
