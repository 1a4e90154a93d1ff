"""API keys: created by ``nirvana keys create --tenant T``, stored as SHA-256 digests, each bound to a tenant.

Invariants:
    * The plaintext key is returned once, at creation, and never stored.
    * A key is ``nv_`` + 32 url-safe random bytes (256 bits), so an unsalted fast hash is safe to store: there is
      nothing to brute-force.
    * A revoked key authenticates (its tenant is known) but is forbidden (HTTP 403); an unknown key is 401.
    * A key that is not of the form ``nv_`` + 43 URL-safe characters is refused (401) without a database query;
      an unknown key is remembered for a while (``negative_ttl_s``) and refused without one too; a lookup of a
      key this process has never seen in the table first calls the caller's guard (the API's per-address
      throttle), so random keys cannot make database queries without bound (docs/SECURITY.md).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from psycopg.rows import tuple_row

from nirvana.service.errors import FieldError, Forbidden, Unauthenticated

KEY_PREFIX = "nv_"
KEY_BYTES = 32  # secrets.token_urlsafe(32): 43 characters of [A-Za-z0-9_-]
KEY_PATTERN = re.compile(r"nv_[A-Za-z0-9_-]{43}")
# Unknown keys remembered at most (oldest forgotten first): a flood of random keys costs bounded memory and
# never evicts the cache of real keys (kept apart: it only ever holds keys that exist in the table).
NEGATIVE_CACHE_MAX = 20_000


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's tenant and role (``user`` or ``admin``)."""

    tenant: str
    role: str
    key_id: int

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _check_tenant(tenant: str) -> None:
    """1-200 ASCII letters, digits or ``-_.@``, not starting with ``__`` (reserved: ``__shared__`` is the
    shared cache pool's namespace, so a tenant of that name would read it)."""
    if (
        not tenant
        or len(tenant) > 200
        or not all((c.isascii() and c.isalnum()) or c in "-_.@" for c in tenant)
        or tenant.startswith("__")
    ):
        raise FieldError("tenant", "must be 1-200 ASCII letters, digits or '-_.@', not starting with '__'")


def create_key(pool: Any, tenant: str, name: str = "", role: str = "user") -> str:
    """Create a key for ``tenant`` and return its plaintext (shown once)."""
    _check_tenant(tenant)
    if role not in ("user", "admin"):
        raise FieldError("role", "must be 'user' or 'admin'")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with pool.connection() as conn:
        conn.execute(
            "INSERT INTO api_keys (tenant, key_hash, prefix, name, role) VALUES (%s, %s, %s, %s, %s)",
            (tenant, hash_key(key), key[:10], name, role),
        )
    return key


def revoke_key(pool: Any, key_or_prefix: str) -> int:
    """Revoke by full key or by its 10-character prefix; returns how many keys were revoked."""
    with pool.connection() as conn:
        cur = conn.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE revoked_at IS NULL AND (key_hash = %s OR prefix = %s)",
            (hash_key(key_or_prefix), key_or_prefix),
        )
        return int(cur.rowcount or 0)


def list_keys(pool: Any, tenant: str | None = None) -> list[dict[str, Any]]:
    with pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(
            "SELECT id, tenant, prefix, name, role, created_at, revoked_at FROM api_keys "
            "WHERE %s::text IS NULL OR tenant = %s ORDER BY id",
            (tenant, tenant),
        ).fetchall()
    return [
        {
            "id": r[0],
            "tenant": r[1],
            "prefix": r[2],
            "name": r[3],
            "role": r[4],
            "created_at": r[5].isoformat(),
            "revoked": r[6] is not None,
        }
        for r in rows
    ]


def well_formed(key: str) -> bool:
    """Whether ``key`` has the shape ``create_key`` makes (checked before any query: no database cost)."""
    return KEY_PATTERN.fullmatch(key) is not None


class KeyVerifier:
    """Verifies keys against Postgres with short per-process caches.

    Args:
        pool: the database pool (``api_keys``).
        ttl_s: seconds a found key's row (tenant, role, revoked) is reused; 0 re-reads it on every request. A
            revocation takes effect within ``ttl_s`` seconds in every API process.
        negative_ttl_s: seconds an unknown key is answered 401 without a query (0: off).

    Invariants:
        * ``_found`` holds only digests of keys that exist in ``api_keys`` (so it is bounded by the real keys,
          whatever callers send); a stale entry is re-read, without the guard: its holder is no stranger.
        * ``_unknown`` holds at most ``NEGATIVE_CACHE_MAX`` digests; a flood only cycles that structure.
        * Every database query is counted in ``lookups`` (by result) and every refusal in ``refusals`` (by
          reason); ``KeyMetrics`` exports both on ``/metrics``.
    """

    def __init__(self, pool: Any, ttl_s: float = 10.0, negative_ttl_s: float = 60.0) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self.negative_ttl_s = negative_ttl_s
        self._found: dict[str, tuple[float, Principal, bool]] = {}
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self.lookups: Counter[str] = Counter()  # database queries: valid, revoked, unknown
        self.refusals: Counter[str] = Counter()  # missing, malformed, unknown, revoked, throttled

    def _refuse(self, reason: str) -> None:
        with self._lock:
            self.refusals[reason] += 1

    def verify(self, key: str | None, guard: Callable[[], None] | None = None) -> Principal:
        """The principal of ``key``.

        Args:
            key: the presented key (None or empty: none was sent).
            guard: called before a query for a key this process has never found in the table (the API passes
                its per-address throttle, which raises ``RateLimited``); not called for malformed keys,
                remembered unknown keys or known keys.

        Raises:
            Unauthenticated: no key, a malformed one, or an unknown one.
            Forbidden: the key was revoked.
            Exception: whatever ``guard`` raises (then no query is made).
        """
        if not key:
            self._refuse("missing")
            raise Unauthenticated("missing API key (Authorization: Bearer <key> or X-API-Key)")
        if not well_formed(key):
            self._refuse("malformed")
            raise Unauthenticated("invalid API key (expected 'nv_' and 43 URL-safe characters)")
        digest = hash_key(key)
        now = time.monotonic()
        with self._lock:
            found = self._found.get(digest)
            seen_unknown = self._unknown.get(digest)
            if seen_unknown is not None and now - seen_unknown > self.negative_ttl_s:
                del self._unknown[digest]
                seen_unknown = None
        if found is None and seen_unknown is not None:
            self._refuse("unknown")
            raise Unauthenticated("invalid API key")
        if found is None or now - found[0] > self.ttl_s:
            if found is None and guard is not None:
                try:
                    guard()
                except Exception:
                    self._refuse("throttled")
                    raise
            found = self._lookup(digest, now)
        if found is None:
            self._refuse("unknown")
            raise Unauthenticated("invalid API key")
        _, principal, revoked = found
        if revoked:
            self._refuse("revoked")
            raise Forbidden("API key revoked")
        return principal

    def _lookup(self, digest: str, now: float) -> tuple[float, Principal, bool] | None:
        """Read the key's row (one query) and update the caches."""
        with self.pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
            row = cur.execute(
                "SELECT id, tenant, role, revoked_at FROM api_keys WHERE key_hash = %s", (digest,)
            ).fetchone()
        with self._lock:
            if row is None:
                self.lookups["unknown"] += 1
                self._found.pop(digest, None)  # deleted from the table since it was found
                if self.negative_ttl_s > 0:
                    self._unknown[digest] = now
                    self._unknown.move_to_end(digest)
                    while len(self._unknown) > NEGATIVE_CACHE_MAX:
                        self._unknown.popitem(last=False)
                return None
            revoked = row[3] is not None
            self.lookups["revoked" if revoked else "valid"] += 1
            found = (now, Principal(str(row[1]), str(row[2]), int(row[0])), revoked)
            self._found[digest] = found
            return found


class KeyMetrics:
    """Prometheus collector of a ``KeyVerifier``'s counters (this process's):

    * ``nirvana_api_key_lookups_total{result}``: database queries for API keys (valid, revoked, unknown);
    * ``nirvana_api_key_refusals_total{reason}``: requests refused by authentication (missing, malformed,
      unknown, revoked, throttled).
    """

    def __init__(self, verifier: KeyVerifier) -> None:
        self.verifier = verifier

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily

        v = self.verifier
        with v._lock:
            lookups, refusals = dict(v.lookups), dict(v.refusals)
        fam = CounterMetricFamily(
            "nirvana_api_key_lookups", "Database queries for API keys, by result (this process)", labels=["result"]
        )
        for result in ("valid", "revoked", "unknown"):
            fam.add_metric([result], lookups.get(result, 0))
        yield fam
        fam = CounterMetricFamily(
            "nirvana_api_key_refusals",
            "Requests refused by API-key authentication, by reason (this process)",
            labels=["reason"],
        )
        for reason in ("missing", "malformed", "unknown", "revoked", "throttled"):
            fam.add_metric([reason], refusals.get(reason, 0))
        yield fam
