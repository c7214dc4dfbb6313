"""API keys and per-key rate limits, shared by the HTTP and gRPC fronts.

Keys come from the environment (`server.auth.api_keys_env`, comma-separated)
and/or a file (`server.auth.api_keys_file`, one per line); never from the TOML
config, and never logged. With no key configured, authentication is off.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bon_gateway.config import AuthConfig, ConfigError
from bon_gateway.errors import Overloaded, Unauthenticated
from bon_gateway.logs import log_phase

__all__ = ["AccessPolicy", "KeyStore", "RateLimiter", "bearer_token", "load_api_keys"]

log = logging.getLogger("bon_gateway.auth")


def load_api_keys(auth: AuthConfig, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Every configured key: the environment variable's, then the file's (duplicates dropped)."""
    env = os.environ if environ is None else environ
    keys = [k.strip() for k in env.get(auth.api_keys_env, "").split(",")]
    if auth.api_keys_file is not None:
        path = Path(auth.api_keys_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as err:
            # The message names the file, not its contents.
            raise ConfigError(f"server.auth.api_keys_file: cannot read {path}: {err.strerror}") from None
        keys += [line.strip() for line in lines if not line.lstrip().startswith("#")]
    unique = tuple(dict.fromkeys(k for k in keys if k))
    if any(any(c.isspace() for c in k) for k in unique):
        raise ConfigError("server.auth: an API key contains whitespace")
    return unique


def bearer_token(header: str | None) -> str | None:
    """The credential of `Authorization: Bearer KEY` (scheme case-insensitive), else None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _digest(key: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison time independent of
    # the presented key's length and of how many leading bytes match.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeyStore:
    """The configured keys, matched in constant time; a match yields the key's index."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._digests = tuple(_digest(k) for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def match(self, presented: str | None) -> int | None:
        """Index of the key equal to `presented`, or None. Every key is compared, always."""
        candidate = _digest(presented or "")
        found: int | None = None
        for index, digest in enumerate(self._digests):
            if hmac.compare_digest(candidate, digest) and presented:
                found = index
        return found


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per key index: `rate` requests/s sustained, `burst` at once.

    One bucket per configured key, so memory is bounded by the key count
    whatever clients send. Thread-safe: the HTTP and gRPC fronts share it.
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = float(burst if burst > 0 else max(1, math.ceil(rate)))
        self._clock = clock
        self._buckets: dict[int, _Bucket] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def acquire(self, key_id: int) -> float | None:
        """Take one token; None when granted, else the seconds until one is available."""
        if not self.enabled:
            return None
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key_id)
            if bucket is None:
                bucket = self._buckets[key_id] = _Bucket(self.burst, now)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return None
            return (1.0 - bucket.tokens) / self.rate


class AccessPolicy:
    """Who may call: the key check, then the key's rate limit. Raises BonErrors."""

    def __init__(self, keys: KeyStore, limiter: RateLimiter) -> None:
        self.keys = keys
        self.limiter = limiter

    @classmethod
    def from_config(cls, auth: AuthConfig, environ: Mapping[str, str] | None = None) -> AccessPolicy:
        keys = KeyStore(load_api_keys(auth, environ))
        if keys.enabled:
            log_phase(log, "auth", keys=len(keys), rate_limit_per_s=auth.rate_limit_per_s)
        else:
            log_phase(log, "auth", logging.WARNING, keys=0, note="API key authentication is off")
        return cls(keys, RateLimiter(auth.rate_limit_per_s, auth.rate_limit_burst))

    @property
    def enabled(self) -> bool:
        return self.keys.enabled

    def check(self, authorization: str | None) -> None:
        """Admit a call carrying this `Authorization` value, or raise Unauthenticated / Overloaded."""
        if not self.keys.enabled:
            return
        key_id = self.keys.match(bearer_token(authorization))
        if key_id is None:
            # Same answer for a missing and a wrong key: nothing to probe.
            raise Unauthenticated("a valid API key is required (Authorization: Bearer KEY)")
        wait = self.limiter.acquire(key_id)
        if wait is not None:
            raise Overloaded("rate limit of this API key exceeded", retry_after_s=wait)
