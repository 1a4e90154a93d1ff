"""Failed authentication is throttled before the database: a flood of random API keys makes a bounded number of
key lookups, then gets 429s naming the limit.

The number of lookups is read two ways: from ``/metrics`` (``nirvana_api_key_lookups_total``, counted by the
production ``KeyVerifier`` around its query) and, independently, from Postgres's own statistics of the
``api_keys`` table (index + sequential scans), after the app's connections have closed and flushed them.
Buckets refill at 0.001 tokens/s, so every outcome is decided by counting, not by timing.
"""

from __future__ import annotations

import secrets
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from nirvana.config import Settings
from tests.security.conftest import auth

SLOW = 0.001


def random_key() -> str:
    """A well-formed key nobody holds (the shape ``create_key`` makes)."""
    return "nv_" + secrets.token_urlsafe(32)


@pytest.fixture(scope="module")
def throttled(make_settings: Callable[..., Settings], redis_url: str) -> Callable[..., Settings]:
    """``throttled(db, burst, **kw)`` → settings with the failed-auth throttle on (0.001/s, ``burst``) and its
    buckets on Redis database ``db`` (flushed first); the per-key limits stay off."""
    import redis

    def make(db: int, burst: int, **kw: Any) -> Settings:
        redis.Redis.from_url(f"{redis_url}/{db}").flushdb()
        base: dict[str, Any] = {
            "rate_limit_url": f"{redis_url}/{db}",
            "rate_limit_auth_failures_per_s": SLOW,
            "rate_limit_auth_failures_burst": burst,
        }
        base.update(kw)
        return make_settings(**base)

    return make


def key_metrics(api: TestClient, admin_key: str) -> dict[str, float]:
    """``lookups.<result>`` and ``refusals.<reason>`` from ``/metrics`` (read with an admin key)."""
    from prometheus_client.parser import text_string_to_metric_families

    r = api.get("/metrics", headers=auth(admin_key))
    assert r.status_code == 200, r.text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            if s.name == "nirvana_api_key_lookups_total":
                out[f"lookups.{s.labels['result']}"] = s.value
            elif s.name == "nirvana_api_key_refusals_total":
                out[f"refusals.{s.labels['reason']}"] = s.value
    return out


def api_keys_scans(db_pool: Any) -> int:
    """Scans of ``api_keys`` in Postgres's cumulative statistics, once they stop changing (a backend flushes
    its counts when it goes idle for a while or exits)."""
    last, same, deadline = -1, 0, time.monotonic() + 20
    while time.monotonic() < deadline:
        with db_pool.connection() as c:
            c.execute("SELECT pg_stat_clear_snapshot()")
            row = c.execute(
                "SELECT coalesce(idx_scan, 0) + coalesce(seq_scan, 0) AS n FROM pg_stat_user_tables "
                "WHERE relname = 'api_keys'"
            ).fetchone()
        n = int(row["n"])
        same = same + 1 if n == last else 0
        if same >= 3:
            return n
        last = n
        time.sleep(0.4)
    return last


def test_random_key_flood_makes_bounded_queries(
    throttled: Callable[..., Settings], make_key: Callable[..., str], db_pool: Any
) -> None:
    from api.app import create_app

    burst, flood = 5, 300
    admin, newcomer = make_key("flood-admin", role="admin"), make_key("flood-newcomer")
    scans_before = api_keys_scans(db_pool)
    with TestClient(create_app(throttled(8, burst))) as api:
        # The admin key's first lookup costs the address one token; from then on this process knows it.
        assert key_metrics(api, admin)["lookups.unknown"] == 0
        codes: Counter[int] = Counter()
        for _ in range(flood):
            r = api.get("/v1/cache/stats", headers=auth(random_key()))
            codes[r.status_code] += 1
            if r.status_code == 429 and codes[429] == 1:
                err = r.json()["error"]
                assert err["type"] == "RateLimited" and err["field"] == "auth_failures", err
                assert "0.001 lookups of unknown API keys/s per client address (burst 5" in err["message"]
                assert "NIRVANA_RATE_LIMIT_AUTH_FAILURES_PER_S" in err["message"]
                assert 900 <= int(r.headers["Retry-After"]) <= 1000  # one token at 0.001/s
        assert codes == {401: burst - 1, 429: flood - (burst - 1)}, codes
        # A valid key this process has never seen also needs a lookup, so from this address it waits too (the
        # price of bounding the database); a known key keeps working; a malformed key is 401 at no cost.
        assert api.get("/v1/cache/stats", headers=auth(newcomer)).status_code == 429
        assert api.get("/v1/cache/stats", headers={"X-API-Key": "nv_short"}).status_code == 401
        m = key_metrics(api, admin)
        assert m["lookups.unknown"] == burst - 1 and m["lookups.revoked"] == 0
        assert m["lookups.valid"] == 2  # the admin key's two /metrics reads (api_key_cache_s = 0: re-read)
        assert m["refusals.throttled"] == flood - (burst - 1) + 1 and m["refusals.malformed"] == 1
        lookups = m["lookups.valid"] + m["lookups.unknown"]
    # Postgres agrees: the 300-key flood cost 4 queries of api_keys (plus the admin's 2), not 300.
    assert api_keys_scans(db_pool) - scans_before == lookups == burst + 1


def test_unknown_and_malformed_keys_cost_no_query_again(
    throttled: Callable[..., Settings], make_key: Callable[..., str], db_pool: Any
) -> None:
    from api.app import create_app
    from nirvana.service.keys import revoke_key

    admin, revoked = make_key("negative-admin", role="admin"), make_key("negative-revoked")
    assert revoke_key(db_pool, revoked) == 1
    with TestClient(create_app(throttled(9, 3))) as api:
        before = key_metrics(api, admin)
        bad = random_key()
        for _ in range(20):  # the same unknown key: one lookup, then remembered (api_key_negative_cache_s)
            assert api.get("/v1/cache/stats", headers=auth(bad)).status_code == 401
        for junk in (  # wrong prefix or length, not URL-safe, huge
            "nv_",
            "x" * 46,
            "nv_" + "a" * 42,
            "nv_" + "a" * 44,
            ("nv_" + "é" * 43).encode("latin-1"),
            "nv_" + "a" * 10_000,
        ):
            r = api.get("/v1/cache/stats", headers={"X-API-Key": junk})
            assert r.status_code == 401 and "43 URL-safe characters" in r.json()["error"]["message"], junk
        for _ in range(5):  # a revoked key is a real one: 403, re-read (TTL 0) but never charged to the address
            assert api.get("/v1/cache/stats", headers=auth(revoked)).status_code == 403
        after = key_metrics(api, admin)
        assert after["lookups.unknown"] - before["lookups.unknown"] == 1
        assert after["refusals.unknown"] - before["refusals.unknown"] == 20
        assert after["refusals.malformed"] - before["refusals.malformed"] == 6
        assert after["lookups.revoked"] - before["lookups.revoked"] == 5
        assert after["refusals.throttled"] == 0
        # 3 tokens: admin 1, bad key 1, revoked key 1 → the next stranger is throttled
        assert api.get("/v1/cache/stats", headers=auth(random_key())).status_code == 429


def test_throttle_is_shared_across_processes(throttled: Callable[..., Settings], make_key: Callable[..., str]) -> None:
    from api.app import create_app

    s = throttled(10, 4)
    with TestClient(create_app(s)) as a, TestClient(create_app(s)) as b:
        for c in (a, a, b, b):
            assert c.get("/v1/cache/stats", headers=auth(random_key())).status_code == 401
        # a's own bucket has 2 tokens left, the deployment's (Redis) none
        r = a.get("/v1/cache/stats", headers=auth(random_key()))
        assert r.status_code == 429 and r.json()["error"]["field"] == "auth_failures"


def test_throttle_does_not_fail_open_without_redis() -> None:
    """Unlike the per-key buckets, the address bucket has an in-process copy that still bounds lookups."""
    from nirvana.embedded.postgres import free_port
    from nirvana.service.ratelimit import Bucket, RateLimited, RateLimiter, RedisBuckets

    dead = RedisBuckets(f"redis://127.0.0.1:{free_port()}/0")
    off = Bucket("req", 0, 1, "requests")
    limiter = RateLimiter(off, off, dead, auth=Bucket("authfail", SLOW, 3, "lookups of unknown API keys"))
    for _ in range(3):
        limiter.auth_lookup("203.0.113.7")
    with pytest.raises(RateLimited) as e:
        limiter.auth_lookup("203.0.113.7")
    assert e.value.field == "auth_failures" and e.value.retry_after_s > 900
    limiter.auth_lookup("203.0.113.8")  # another address has its own bucket


def test_local_buckets_are_bounded() -> None:
    from nirvana.service.ratelimit import LocalBuckets

    b = LocalBuckets(max_keys=100)
    for i in range(1000):
        b.take(f"k{i}", SLOW, 1, 1)
    assert len(b._state) == 100 and "k999" in b._state and "k0" not in b._state


def test_client_ids() -> None:
    from nirvana.service.ratelimit import client_id

    assert client_id("203.0.113.7") == "203.0.113.7"
    assert client_id("::ffff:203.0.113.7") == "203.0.113.7"
    # one host holds a /64: its addresses share a bucket; another /64 does not
    assert client_id("2001:db8:1:2::1") == client_id("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert client_id("2001:db8:1:3::1") != client_id("2001:db8:1:2::1")
    for odd in ("testclient", "../../x y", "a" * 500):  # never raw text in a Redis key
        cid = client_id(odd)
        assert cid.startswith("h-") and len(cid) == 18 and cid[2:].isalnum()
    assert client_id(None) == client_id("") == "none"
