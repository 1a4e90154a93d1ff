"""Which cache namespace a tenant's jobs use: its own (the default) or the opt-in shared pool.

A tenant joins the shared pool with ``nirvana keys shared-pool TENANT --on`` (a row in ``tenant_settings``);
``NIRVANA_CACHE_SHARED_POOL=true`` puts every tenant in it (an operator's choice for a deployment whose tenants
all trust each other, e.g. one team). See docs/SECURITY.md for what a shared pool exposes.

Invariants:
    * A tenant never resumes from another tenant's state unless both are in the shared pool: the namespace is
      either the tenant itself or ``SHARED_TENANT``, and only opted-in tenants get ``SHARED_TENANT``.
    * No tenant can be called ``SHARED_TENANT`` (``keys._check_tenant`` refuses names starting with ``__``).
    * The choice is read when a job is created and stored on the job row (``jobs.cache_tenant``).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from psycopg.rows import tuple_row

SHARED_TENANT = "__shared__"  # the same value as nirvana.cache.core.SHARED_TENANT (checked in the tests)


def set_shared_pool(pool: Any, tenant: str, on: bool) -> None:
    """Opt ``tenant`` into (``on``) or out of the shared cache pool; takes effect for jobs created afterwards."""
    from nirvana.service.keys import _check_tenant

    _check_tenant(tenant)
    with pool.connection() as conn:
        conn.execute(
            "INSERT INTO tenant_settings (tenant, shared_pool) VALUES (%s, %s) ON CONFLICT (tenant) DO UPDATE "
            "SET shared_pool = EXCLUDED.shared_pool, updated_at = now()",
            (tenant, on),
        )


def shared_pool_tenants(pool: Any) -> list[str]:
    """Tenants that opted into the shared pool."""
    with pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute("SELECT tenant FROM tenant_settings WHERE shared_pool ORDER BY tenant").fetchall()
    return [str(r[0]) for r in rows]


class TenantPools:
    """Resolves a tenant's cache namespace tenant, with a short per-process cache (``ttl_s``; 0 disables it).

    Args:
        pool: psycopg pool of the jobs database.
        ttl_s: seconds a tenant's choice is cached (an opt-out takes effect within this time).
        all_shared: every tenant is in the shared pool (``NIRVANA_CACHE_SHARED_POOL``).
    """

    def __init__(self, pool: Any, ttl_s: float = 10.0, all_shared: bool = False) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self.all_shared = all_shared
        self._cache: dict[str, tuple[float, bool]] = {}
        self._lock = threading.Lock()

    def is_shared(self, tenant: str) -> bool:
        if self.all_shared:
            return True
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(tenant)
        if hit is None or now - hit[0] > self.ttl_s:
            with self.pool.connection() as conn, conn.cursor(row_factory=tuple_row) as cur:
                row = cur.execute("SELECT shared_pool FROM tenant_settings WHERE tenant = %s", (tenant,)).fetchone()
            hit = (now, bool(row[0]) if row else False)
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[tenant] = hit
        return hit[1]

    def cache_tenant(self, tenant: str) -> str:
        """The namespace tenant of ``tenant``'s new jobs: ``SHARED_TENANT`` when it opted in, else itself."""
        return SHARED_TENANT if self.is_shared(tenant) else tenant


__all__ = ["SHARED_TENANT", "TenantPools", "set_shared_pool", "shared_pool_tenants"]
