"""API keys: created by ``nirvana keys create --tenant T``, stored as SHA-256 digests, each bound to a tenant.

Invariants:
    * The plaintext key is returned once, at creation, and never stored.
    * A key is ``nv_`` + 32 url-safe random bytes (256 bits), so an unsalted fast hash is safe to store: there is
      nothing to brute-force.
    * A revoked key authenticates (its tenant is known) but is forbidden (HTTP 403); an unknown key is 401.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from psycopg.rows import tuple_row

from nirvana.service.errors import FieldError, Forbidden, Unauthenticated

KEY_PREFIX = "nv_"


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


class KeyVerifier:
    """Verifies keys against Postgres with a short per-process cache (``ttl_s``; 0 disables it).

    A revocation takes effect within ``ttl_s`` seconds in every API process.
    """

    def __init__(self, pool: Any, ttl_s: float = 10.0) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, Principal | None, bool]] = {}
        self._lock = threading.Lock()

    def verify(self, key: str | None) -> Principal:
        """The principal of ``key``.

        Raises:
            Unauthenticated: no key, or an unknown one.
            Forbidden: the key was revoked.
        """
        if not key:
            raise Unauthenticated("missing API key (Authorization: Bearer <key> or X-API-Key)")
        digest = hash_key(key)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
        if hit is None or now - hit[0] > self.ttl_s:
            with self.pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
                row = cur.execute(
                    "SELECT id, tenant, role, revoked_at FROM api_keys WHERE key_hash = %s", (digest,)
                ).fetchone()
            principal = None if row is None else Principal(str(row[1]), str(row[2]), int(row[0]))
            revoked = row is not None and row[3] is not None
            hit = (now, principal, revoked)
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[digest] = hit
        _, principal, revoked = hit
        if principal is None:
            raise Unauthenticated("invalid API key")
        if revoked:
            raise Forbidden("API key revoked")
        return principal
