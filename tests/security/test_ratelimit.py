"""Per-API-key rate limits: token buckets in the real Redis, shared by every API process.

Buckets here refill at 0.001 tokens/s (one token per ~17 minutes), so no token comes back while a test runs and
every outcome is decided by counting, not by timing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from nirvana.config import Settings
from tests.security.conftest import auth

SLOW = 0.001


@pytest.fixture(scope="module")
def limited(make_settings: Callable[..., Settings], redis_url: str) -> Callable[..., Settings]:
    """Settings with request burst 3 and job burst 5 on a Redis database of their own (flushed first)."""
    import redis

    redis.Redis.from_url(f"{redis_url}/5").flushdb()

    def make(**kw: Any) -> Settings:
        base: dict[str, Any] = {
            "rate_limit_url": f"{redis_url}/5",
            "rate_limit_requests_per_s": SLOW,
            "rate_limit_requests_burst": 3,
            "rate_limit_jobs_per_s": 0,
        }
        base.update(kw)
        return make_settings(**base)

    return make


@pytest.fixture
def two_apps(limited: Callable[..., Settings]) -> Iterator[tuple[TestClient, TestClient]]:
    """Two API processes of one deployment (two apps, each with its own pools, one Redis)."""
    from api.app import create_app

    with TestClient(create_app(limited())) as a, TestClient(create_app(limited())) as b:
        yield a, b


def test_request_limit_is_per_key_and_shared_across_processes(
    two_apps: tuple[TestClient, TestClient], make_key: Callable[..., str]
) -> None:
    a, b = two_apps
    k1, k2 = make_key("rl-one"), make_key("rl-two")
    assert a.get("/v1/cache/stats", headers=auth(k1)).status_code == 200
    assert b.get("/v1/cache/stats", headers=auth(k1)).status_code == 200
    assert a.get("/v1/cache/stats", headers=auth(k1)).status_code == 200
    r = b.get("/v1/cache/stats", headers=auth(k1))  # the 4th of a burst of 3, on the other process
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["field"] == "requests" and "0.001 requests/s" in err["message"] and "burst 3" in err["message"]
    retry = int(r.headers["Retry-After"])
    assert 900 <= retry <= 1000  # one token at 0.001/s
    # another key has its own bucket; health needs no key and is never limited
    assert a.get("/v1/cache/stats", headers=auth(k2)).status_code == 200
    for _ in range(5):
        assert a.get("/healthz").status_code == 200
    # unauthenticated requests are refused before any bucket is charged (no key id to charge)
    assert a.get("/v1/cache/stats").status_code == 401


def test_job_limit_counts_jobs_not_requests(limited: Callable[..., Settings], make_key: Callable[..., str]) -> None:
    from api.app import create_app

    s = limited(rate_limit_requests_per_s=0, rate_limit_jobs_per_s=SLOW, rate_limit_jobs_burst=5)
    key = make_key("rl-jobs")
    with TestClient(create_app(s)) as api:
        h = auth(key)
        r = api.post("/v1/batches", json=[{"prompt": "x"}] * 6, headers=h)
        assert r.status_code == 422, r.text  # can never be paid: not a 429 to retry
        assert r.json()["error"]["field"] == "jobs" and "burst of 5" in r.json()["error"]["message"]
        assert api.post("/v1/batches", json=[{"prompt": "x"}] * 4, headers=h).status_code == 202
        assert api.post("/v1/jobs", json={"prompt": "y"}, headers=h).status_code == 202
        r = api.post("/v1/jobs", json={"prompt": "z"}, headers=h)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["field"] == "jobs" and int(r.headers["Retry-After"]) >= 900
        r = api.post("/v1/images/generations", json={"prompt": "z", "n": 2}, headers=h)
        assert r.status_code == 429, r.text
        # refused requests created nothing: 4 + 1 jobs in the database
        assert api.get("/v1/cache/stats", headers=h).json()["jobs"]["jobs"] == 5


def test_limiter_fails_open_when_redis_is_unreachable() -> None:
    from nirvana.embedded.postgres import free_port
    from nirvana.service.ratelimit import Bucket, RateLimiter, RedisBuckets

    dead = RedisBuckets(f"redis://127.0.0.1:{free_port()}/0")
    limiter = RateLimiter(Bucket("req", SLOW, 1, "requests"), Bucket("jobs", SLOW, 1, "jobs"), dead)
    for _ in range(3):  # over the burst of 1, but Redis is down: allowed (and logged)
        limiter.request(1)
        limiter.create_jobs(1, 1)


def test_local_buckets_match_the_redis_script(redis_url: str) -> None:
    """The in-process fallback and the Lua script agree on the same sequence of takes."""
    import redis

    from nirvana.service.ratelimit import LocalBuckets, RedisBuckets

    redis.Redis.from_url(f"{redis_url}/6").flushdb()
    remote, local = RedisBuckets(f"{redis_url}/6"), LocalBuckets()
    for cost in (1, 2, 1, 3, 1, 1):
        r = remote.take("k", SLOW, 5, cost)
        loc = local.take("k", SLOW, 5, cost)
        assert r.allowed == loc.allowed, cost
        assert r.tokens_left == pytest.approx(loc.tokens_left, abs=0.01)
    assert not r.allowed and r.retry_after_s == pytest.approx(1 / SLOW, rel=0.02)
    remote.close()
