"""Per-API-key rate limits: token buckets kept in Redis, so every API process shares them.

Two buckets per key (settings ``rate_limit_*``): *requests* (every authenticated request costs 1) and *jobs*
(each job created costs 1, so a batch of N costs N). A bucket holds at most ``burst`` tokens and refills at
``rate`` tokens per second; a request that finds too few tokens is refused with HTTP 429 and ``Retry-After``
(the seconds until enough tokens have refilled).

A third bucket is per *client address*, not per key (``rate_limit_auth_failures_*``): every database lookup of
an API key that this process has never found in the table costs one token, taken *before* the query (see
``KeyVerifier.verify``), so a flood of random keys makes a bounded number of queries and then gets 429s.

Invariants:
    * The check-and-take is one Lua script run atomically by Redis against Redis's own clock, so concurrent
      API processes neither race nor disagree about time.
    * Bucket keys are ``nirvana:rl:<bucket>:<key id>`` (the API key's row id, never the key or tenant text).
    * If Redis cannot be reached the limiter fails open (logs, allows): the limits protect capacity and slow
      cache-probing attacks, they are not what keeps tenants apart.
    * A cost larger than the burst can never be paid: it is a 422 naming the limit, not a 429 to retry.
    * The address bucket is checked in this process first (bounded memory, ``AUTH_LOCAL_MAX_ADDRESSES``) and
      then in Redis; it does *not* fail open: with Redis down the in-process bucket still bounds the queries.
      Addresses are ``request.client.host`` (behind a proxy, run uvicorn with ``--forwarded-allow-ips`` so it
      is the real client); IPv6 addresses count per /64, the block one host usually holds.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from nirvana.config import Settings
from nirvana.service.errors import FieldError, ServiceError

log = logging.getLogger(__name__)

# KEYS[1] bucket; ARGV: rate (tokens/s), burst, cost. Returns {allowed (0/1), retry_after_s, tokens_left} (as
# strings: Lua numbers would be truncated to integers on the way out).
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local s = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(s[1])
local ts = tonumber(s[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local retry = 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  retry = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return {allowed, tostring(retry), tostring(tokens)}
"""


# Client addresses whose auth buckets one process keeps (oldest dropped first): bounds memory under a flood from
# many addresses; a dropped address only gets a fresh (full) bucket.
AUTH_LOCAL_MAX_ADDRESSES = 100_000


class RateLimited(ServiceError):
    """Too many requests or jobs for this API key (HTTP 429 with ``Retry-After``)."""

    status = 429

    def __init__(self, message: str, retry_after_s: float, field: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.field = field


@dataclass(frozen=True)
class Bucket:
    """One limit: ``rate`` tokens per second, at most ``burst`` stored. ``rate == 0`` disables it."""

    name: str
    rate: float
    burst: int
    what: str  # unit, for messages: "requests" or "jobs"

    @property
    def enabled(self) -> bool:
        return self.rate > 0


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float
    tokens_left: float


class BucketBackend(Protocol):
    """Atomically take ``cost`` tokens from bucket ``key``."""

    def take(self, key: str, rate: float, burst: int, cost: int) -> Decision: ...


class RedisBuckets:
    """Token buckets in Redis (one Lua script call per check)."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self._script = self.client.register_script(TOKEN_BUCKET_LUA)

    def take(self, key: str, rate: float, burst: int, cost: int) -> Decision:
        allowed, retry, left = self._script(keys=[key], args=[repr(float(rate)), int(burst), int(cost)])
        return Decision(bool(int(allowed)), float(retry), float(left))

    def close(self) -> None:
        self.client.close()


class LocalBuckets:
    """Token buckets in this process only (when no Redis URL is configured, e.g. a single-process test).

    Args:
        max_keys: buckets kept at most (the least recently used is dropped first); None: unbounded.
    """

    def __init__(self, max_keys: int | None = None) -> None:
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()
        self.max_keys = max_keys

    def take(self, key: str, rate: float, burst: int, cost: int) -> Decision:
        now = time.monotonic()
        with self._lock:
            tokens, ts = self._state.pop(key, (float(burst), now))  # pop + set: most recently used last
            tokens = min(float(burst), tokens + max(0.0, now - ts) * rate)
            allowed = tokens >= cost
            self._state[key] = (tokens - cost if allowed else tokens, now)
            if self.max_keys is not None and len(self._state) > self.max_keys:
                del self._state[next(iter(self._state))]
            if allowed:
                return Decision(True, 0.0, tokens - cost)
            return Decision(False, (cost - tokens) / rate, tokens)

    def close(self) -> None:
        self._state.clear()


class RateLimiter:
    """The request and job buckets of every API key.

    Args:
        requests: the per-request bucket.
        jobs: the per-job bucket.
        backend: where buckets live (``RedisBuckets`` shared by all API processes, or ``LocalBuckets``).
        auth: the per-client-address bucket of unknown-key lookups (None: off).
    """

    def __init__(self, requests: Bucket, jobs: Bucket, backend: BucketBackend, auth: Bucket | None = None) -> None:
        self.requests = requests
        self.jobs = jobs
        self.backend = backend
        self.auth = auth
        # The address bucket never fails open, so it always has an in-process copy (the backend itself when
        # that is already in-process).
        self._auth_local = (
            backend if isinstance(backend, LocalBuckets) else LocalBuckets(max_keys=AUTH_LOCAL_MAX_ADDRESSES)
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimiter:
        """Buckets from ``rate_limit_*``; Redis at ``rate_limit_url`` or the broker when it is Redis."""
        url = settings.rate_limit_url or settings.broker_url
        backend: BucketBackend
        if url.startswith(("redis://", "rediss://", "unix://")):
            backend = RedisBuckets(url)
        else:
            log.warning("rate limits are per process: no Redis URL (rate_limit_url / broker_url)")
            backend = LocalBuckets()
        return cls(
            Bucket("req", settings.rate_limit_requests_per_s, settings.rate_limit_requests_burst, "requests"),
            Bucket("jobs", settings.rate_limit_jobs_per_s, settings.rate_limit_jobs_burst, "jobs"),
            backend,
            Bucket(
                "authfail",
                settings.rate_limit_auth_failures_per_s,
                settings.rate_limit_auth_failures_burst,
                "lookups of unknown API keys",
            ),
        )

    def _take(self, bucket: Bucket, key_id: int, cost: int, field: str) -> None:
        if not bucket.enabled or cost <= 0:
            return
        if cost > bucket.burst:
            raise FieldError(field, f"{cost} {bucket.what} in one request exceeds this key's burst of {bucket.burst}")
        try:
            d = self.backend.take(f"nirvana:rl:{bucket.name}:{key_id}", bucket.rate, bucket.burst, cost)
        except Exception as e:  # fail open: see the module docstring
            log.warning("rate limiter unavailable (%s: %s); allowing the request", type(e).__name__, e)
            return
        if not d.allowed:
            raise RateLimited(
                f"rate limit: at most {bucket.rate:g} {bucket.what}/s per API key (burst {bucket.burst}); "
                f"retry in {d.retry_after_s:.1f}s",
                retry_after_s=d.retry_after_s,
                field=field,
            )

    def request(self, key_id: int) -> None:
        """Charge one request to key ``key_id``; raises ``RateLimited``."""
        self._take(self.requests, key_id, 1, "requests")

    def create_jobs(self, key_id: int, n: int) -> None:
        """Charge ``n`` created jobs to key ``key_id``; raises ``RateLimited`` (or ``FieldError`` for a
        request that exceeds the burst)."""
        self._take(self.jobs, key_id, n, "jobs")

    def auth_lookup(self, client: str) -> None:
        """Charge one unknown-key lookup to client address ``client`` (see ``client_id``) before the query.

        Raises:
            RateLimited: the address is over ``rate_limit_auth_failures_*`` here or, shared, in Redis.
        """
        b = self.auth
        if b is None or not b.enabled:
            return
        key = f"nirvana:rl:{b.name}:{client}"
        d = self._auth_local.take(key, b.rate, b.burst, 1)
        if d.allowed and self.backend is not self._auth_local:
            try:
                d = self.backend.take(key, b.rate, b.burst, 1)
            except Exception as e:  # the in-process bucket above still bounds this process's queries
                log.warning("rate limiter unavailable (%s: %s); auth throttle is per process", type(e).__name__, e)
        if not d.allowed:
            raise RateLimited(
                f"rate limit: at most {b.rate:g} {b.what}/s per client address (burst {b.burst}; "
                f"NIRVANA_RATE_LIMIT_AUTH_FAILURES_PER_S/_BURST); retry in {d.retry_after_s:.1f}s",
                retry_after_s=d.retry_after_s,
                field="auth_failures",
            )

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()


def client_id(host: str | None) -> str:
    """The auth-bucket id of a client address: an IPv4 address as is, an IPv6 one as its /64 (one host
    usually holds a whole /64, so counting single addresses would not bound it), anything else (a unix
    socket, a test client's name) as a short digest, so the bucket key is never arbitrary text."""
    if not host:
        return "none"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "h-" + hashlib.blake2b(host.encode(), digest_size=8).hexdigest()
    if ip.version == 6:
        mapped = getattr(ip, "ipv4_mapped", None)
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` is whole seconds; never 0 (a client retrying at once would only be refused again)."""
    return str(max(1, math.ceil(seconds)))


__all__: list[Any] = [
    "Bucket",
    "LocalBuckets",
    "RateLimited",
    "RateLimiter",
    "RedisBuckets",
    "client_id",
    "retry_after_header",
]
