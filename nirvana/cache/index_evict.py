"""Eviction in SQL: the policy-ordered candidate queries and the batched, advisory-locked eviction that frees
stored bytes down to a budget, per tenant first, then over all tenants.

Invariants:
    * Each batch is one transaction holding the eviction advisory lock (``EVICT_LOCK_KEY``): evictors run one at
      a time while hits and records continue; a batch that loses a deadlock is retried whole.
    * A stage does nothing while its stored bytes ≤ its budget; once it started, phase 0 (images over the
      policy's image cap) runs to the cap, then phase 1 (states above each prompt's floor), then phase 2 (whole
      prompts), each taking the shortest prefix in policy order that frees the overflow.
    * A prompt goes with its last state and image; a blob row goes only when no state or prompt references
      it; a borrowed state frees nothing. Rows go here, objects after (the caller deletes the returned URIs).
    * The per-tenant stage evicts only that tenant's entries: one tenant's burst never evicts another's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from nirvana.cache.eviction import EvictionPolicy, tenant_overflows
from nirvana.cache.index_conn import IndexConnection, retry

EVICT_LOCK_KEY = 0x6E766576  # "nvev"
# Phase 1 orders the states once per this many batches. The list is a snapshot: a state hit after it was taken
# may still go in this run (its prompt keeps its floor: the whole list was a valid eviction prefix when taken).
LOOKAHEAD = 100

# Prompts in a batch left with no state (after their states or image went): their image blob ids come back.
_DELETE_EMPTY_PROMPTS = (
    "DELETE FROM cache_prompts p WHERE p.id = ANY(%s) AND NOT EXISTS "
    "(SELECT 1 FROM cache_states s WHERE s.prompt_id = p.id) RETURNING image_blob_id"
)

_IMAGES = "FROM cache_prompts p JOIN cache_blobs b ON b.id = p.image_blob_id"  # the exact tier's images
_FREED_STATE = "CASE WHEN s.borrowed THEN 0 ELSE b.bytes END"  # a borrowed state frees nothing


def _prefix_within(source: str, ids: str, out: str, freed: str, keys: list[str], nulls_first: bool = False) -> str:
    """SQL: the first rows of ``source`` in ``keys`` order (ascending) whose bytes before them sum to less than
    ``%(bound)s`` — the shortest prefix freeing ``bound`` bytes — at most ``%(batch)s`` of them.

    The ORDER BY … LIMIT runs first (a bounded top-N sort: eviction cost grows as n log batch, not with a full
    sort of every row), the running sum over those rows only; the result is the same as a window over all rows.
    ``ids`` are the columns selected from ``source`` and ``out`` the ones returned; the keys end with a unique
    id so the order is total.
    """
    cols = ", ".join(f"{k} AS k{i}" for i, k in enumerate(keys))
    # Plain ASC matches the b-tree indexes (image LRU order); NULLS FIRST where a key can be NULL (phase 2).
    order = ", ".join(f"k{i} ASC" + (" NULLS FIRST" if nulls_first else "") for i in range(len(keys)))
    return (
        f"WITH c AS (SELECT {ids}, {freed} AS freed, {cols} {source} ORDER BY {order} LIMIT %(batch)s), "
        f"d AS (SELECT {out}, freed, {', '.join(f'k{i}' for i in range(len(keys)))}, "
        f"sum(freed) OVER (ORDER BY {order} ROWS UNBOUNDED PRECEDING) AS cum FROM c) "
        f"SELECT {out} FROM d WHERE cum - freed < %(bound)s ORDER BY {order}"
    )


def eviction_queries(policy: EvictionPolicy, by_tenant: bool = False) -> dict[str, str]:
    """The three eviction phases' candidate queries for ``policy`` (parameters ``bound``, ``batch``, ``now``,
    ``half_life``, ``floor``): ``images`` (phase 0: prompt id, image blob id), ``states`` (phase 1: state ids
    above each prompt's floor), ``prompts`` (phase 2: whole prompts, lowest best-state key first).

    With ``by_tenant`` every query keeps only the entries of tenant ``%(tenant)s`` (a state or image by its blob's
    tenant, which is its prompt's: blobs are only shared within a namespace), in the same order.
    """
    freed_state = _FREED_STATE
    blob_scope = " WHERE b.tenant = %(tenant)s" if by_tenant else ""
    states = "FROM cache_states s JOIN cache_blobs b ON b.id = s.blob_id" + blob_scope
    if policy.min_states_per_prompt > 0:
        # The floor needs each state's rank within its prompt: rank every state, keep those above the floor.
        prank = f"row_number() OVER (PARTITION BY s.prompt_id ORDER BY {', '.join(policy.sql_protect_order())})"
        states = f"FROM (SELECT s.*, {freed_state} AS freed0, {prank} AS prank {states}) s WHERE s.prank > %(floor)s"
        freed_state = "s.freed0"
    t0, t1 = policy.sql_key_terms()[:2]
    return {
        "images": _prefix_within(
            _IMAGES + blob_scope,
            "p.id, p.image_blob_id",
            "id, image_blob_id",
            "b.bytes",
            policy.sql_image_key_terms(),
        ),
        "states": _prefix_within(states, "s.id", "id", freed_state, policy.sql_key_terms()),
        "prompts": _prefix_within(
            "FROM cache_prompts p LEFT JOIN cache_states s ON s.prompt_id = p.id "
            "LEFT JOIN cache_blobs b ON b.id = s.blob_id LEFT JOIN cache_blobs ib ON ib.id = p.image_blob_id "
            + ("WHERE p.tenant = %(tenant)s " if by_tenant else "")
            + "GROUP BY p.id",
            "p.id",
            "id",
            f"coalesce(sum({_FREED_STATE}), 0) + coalesce(max(ib.bytes), 0)",
            [f"max({t0})", f"max({t1})", "p.id"],
            nulls_first=True,  # a prompt without states (only its image) goes first
        ),
    }


class EvictionSql(IndexConnection):
    """The eviction part of :class:`nirvana.cache.index.CacheIndex`."""

    def total_bytes(self) -> int:
        with self.connection() as conn:
            r = conn.execute("SELECT coalesce(sum(bytes), 0) FROM cache_blobs").fetchone()
        return int(r[0]) if r else 0

    def tenant_bytes(self) -> dict[str, int]:
        """Stored bytes (states + images, each blob once) per tenant."""
        with self.connection() as conn:
            rows = conn.execute("SELECT tenant, coalesce(sum(bytes), 0) FROM cache_blobs GROUP BY tenant").fetchall()
        return {str(r[0]): int(r[1]) for r in rows}

    def evict_to_budget(
        self,
        policy: EvictionPolicy,
        budget_bytes: int,
        now: float,
        batch: int = 2000,
        tenant_budget_bytes: int = 0,
        pace: Callable[[float], None] | None = None,
    ) -> dict[str, Any]:
        """Evict in ``policy`` order until every tenant stores ≤ ``tenant_budget_bytes`` (if > 0) and all of
        them together ≤ ``budget_bytes``.

        Per-tenant stage first (``tenant_budget_bytes`` > 0): each tenant over its budget
        (``eviction.tenant_overflows``) is evicted down to it exactly as below, with every phase restricted to
        that tenant's entries (and phase 0's image cap taken of the tenant budget), so one tenant's burst never
        evicts another's entries. Then the global stage over all tenants with ``budget_bytes``.

        Each stage does nothing while its stored bytes ≤ its budget. Otherwise, phase 0 (policies with an image
        cap: ``ours``): images go, least recently stored/served first, until they hold ≤ ``policy.image_cap(budget)``
        (even if that frees more than the overflow; the same set as ``policy.evict_images``) — the prompt's
        image reference is set NULL (prompt and states stay; a prompt left with neither goes), then the blob
        row. Phase 1: states in policy order above each prompt's floor. Phase 2: whole prompts. Each batch is
        one transaction holding the eviction advisory lock; ``pace(seconds the batch took)`` runs after each
        batch, outside the lock (the maintenance worker sleeps there so eviction yields the CPU to routing).
        Returns counts (``images``: images dropped in phase 0), bytes freed, ``tenants`` (bytes the per-tenant
        stage freed, per tenant over its budget) and the URIs whose rows are gone (the caller deletes those
        objects after this returns).
        """
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        if tenant_budget_bytes < 0:
            raise ValueError(f"tenant_budget_bytes must be >= 0, got {tenant_budget_bytes}")
        res: dict[str, Any] = {"states": 0, "prompts": 0, "blobs": 0, "bytes": 0, "uris": [], "phase2": 0}
        res["images"] = 0
        res["tenants"] = {}
        if tenant_budget_bytes > 0:
            # Read outside the lock: each batch re-reads its tenant's bytes under it, so a stale list only
            # visits a tenant that is no longer over (nothing happens) or misses one until the next run.
            for tenant in tenant_overflows(self.tenant_bytes(), tenant_budget_bytes):
                before = res["bytes"]
                self._evict_scope(policy, tenant_budget_bytes, now, batch, res, tenant, pace)
                res["tenants"][tenant] = res["bytes"] - before
        self._evict_scope(policy, budget_bytes, now, batch, res, None, pace)
        return res

    def _evict_scope(
        self,
        policy: EvictionPolicy,
        budget_bytes: int,
        now: float,
        batch: int,
        res: dict[str, Any],
        tenant: str | None,
        pace: Callable[[float], None] | None = None,
    ) -> None:
        """One stage of :meth:`evict_to_budget`: everything (``tenant`` None) or one tenant's entries down to
        ``budget_bytes``; adds to ``res``."""
        image_cap = policy.image_cap(budget_bytes)
        q = eviction_queries(policy, by_tenant=tenant is not None)
        scope = "" if tenant is None else " WHERE tenant = %(tenant)s"
        image_scope = "" if tenant is None else " WHERE b.tenant = %(tenant)s"
        params = {"now": now, "half_life": policy.half_life_s, "tenant": tenant}
        floor = policy.min_states_per_prompt

        evicting = [False]  # stored bytes exceeded the budget during this call
        ahead: list[int] = []  # phase 1: the next states in policy order, taken by one ordering pass

        def step() -> bool:
            with self.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (EVICT_LOCK_KEY,))
                r = conn.execute(f"SELECT coalesce(sum(bytes), 0) FROM cache_blobs{scope}", params).fetchone()  # type: ignore[call-overload]
                overflow = int(r[0]) - budget_bytes if r else 0
                if overflow > 0:
                    evicting[0] = True
                elif not evicting[0]:
                    return False
                drop: list[Any] = []
                if image_cap is not None:  # phase 0, to the cap once eviction started (whatever the batch size)
                    r = conn.execute(f"SELECT coalesce(sum(b.bytes), 0) {_IMAGES}{image_scope}", params).fetchone()  # type: ignore[call-overload]
                    excess = (int(r[0]) if r else 0) - image_cap
                    if excess > 0:
                        drop = conn.execute(q["images"], {**params, "bound": excess, "batch": batch}).fetchall()  # type: ignore[call-overload]
                if not drop and overflow <= 0:
                    return False
                p = {**params, "bound": overflow, "batch": batch, "floor": floor}
                if not drop and not ahead:
                    # One ordering pass for up to LOOKAHEAD batches: the pass scans and scores every state
                    # whatever its LIMIT, so taking one per batch made a large eviction that many full scans.
                    ahead.extend(int(x[0]) for x in conn.execute(q["states"], {**p, "batch": batch * LOOKAHEAD}))  # type: ignore[call-overload]
                ids = [] if drop else ahead[:batch]
                del ahead[: len(ids)]
                if drop:
                    pids = sorted(int(d[0]) for d in drop)
                    blob_ids = {int(d[1]) for d in drop}
                    conn.execute("UPDATE cache_prompts SET image_blob_id = NULL WHERE id = ANY(%s)", (pids,))
                    dead = conn.execute(_DELETE_EMPTY_PROMPTS, (pids,)).fetchall()
                    res["images"] += len(drop)
                elif ids:
                    gone = conn.execute(
                        "DELETE FROM cache_states WHERE id = ANY(%s) RETURNING prompt_id, blob_id", (ids,)
                    ).fetchall()
                    pids = sorted({int(g[0]) for g in gone})
                    blob_ids = {int(g[1]) for g in gone}
                    dead = conn.execute(_DELETE_EMPTY_PROMPTS, (pids,)).fetchall()
                    res["states"] += len(gone)
                else:
                    pids = [int(x[0]) for x in conn.execute(q["prompts"], p)]  # type: ignore[call-overload]
                    if not pids:
                        return False
                    gone = conn.execute(
                        "DELETE FROM cache_states WHERE prompt_id = ANY(%s) RETURNING blob_id", (pids,)
                    ).fetchall()
                    blob_ids = {int(g[0]) for g in gone}
                    dead = conn.execute(
                        "DELETE FROM cache_prompts WHERE id = ANY(%s) RETURNING image_blob_id", (pids,)
                    ).fetchall()
                    res["states"] += len(gone)
                    res["phase2"] += len(dead)
                res["prompts"] += len(dead)
                blob_ids |= {int(d[0]) for d in dead if d[0] is not None}
                freed = conn.execute(
                    "DELETE FROM cache_blobs b WHERE b.id = ANY(%s) "
                    "AND NOT EXISTS (SELECT 1 FROM cache_states s WHERE s.blob_id = b.id) "
                    "AND NOT EXISTS (SELECT 1 FROM cache_prompts p WHERE p.image_blob_id = b.id) "
                    "RETURNING uri, bytes",
                    (sorted(blob_ids),),
                ).fetchall()
                res["blobs"] += len(freed)
                res["bytes"] += sum(int(f[1]) for f in freed)
                res["uris"].extend(f[0] for f in freed if f[0] is not None)
                return True

        for _ in range(100000):
            t0 = time.monotonic()
            if not retry(step):
                break
            if pace is not None:
                pace(time.monotonic() - t0)
