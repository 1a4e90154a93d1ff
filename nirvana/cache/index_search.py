"""Nearest-neighbour search within a namespace: pgvector HNSW with iterative scans, or an exact scan for small
namespaces (:mod:`nirvana.cache.index_exact`).

Filtering and HNSW: pgvector applies WHERE clauses *after* the index scan, so a namespace holding 1% of the
rows would leave an ``ef_search``-sized candidate list almost empty. Every search therefore enables pgvector ≥
0.8 iterative scans (``hnsw.iterative_scan = relaxed_order``, bounded by ``hnsw.max_scan_tuples``) and
re-sorts the few candidates it returns. The index is partial per embedding dimension over the expression
``embedding::vector(D)``; queries repeat both the expression and a literal ``dim = D``.

Invariants:
    * Search never writes cache rows; its settings are ``SET LOCAL`` inside its own transaction.
    * Results are (prompt_id, cosine similarity), best first, ties by id, only from the requested namespace
      (``space`` None, all namespaces of a dimension, is for benchmarks).
    * A namespace's size is trusted for at most ``size_ttl_s`` unless an exact search refreshed it; a race
      between threads only repeats a count.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import psycopg

from nirvana.cache.index_conn import IndexConnection
from nirvana.cache.index_exact import count_rows_on, exact_nearest_on, query_vector
from nirvana.cache.index_rows import Space


class VectorSearch(IndexConnection):
    """The search part of :class:`nirvana.cache.index.CacheIndex` (which sets the attributes below)."""

    exact_scan_max_rows: int
    size_ttl_s: float
    _indexed_dims: set[int]
    # Space → (rows, capped at exact_scan_max_rows + 1; time.monotonic() of the count).
    _rows: dict[Space, tuple[int, float]]

    exact_nearest_on = staticmethod(exact_nearest_on)
    count_rows_on = staticmethod(count_rows_on)

    def ensure_vector_index(self, dim: int) -> None:
        """Create the partial HNSW index for ``dim`` if missing (384 comes with the migrations)."""
        if dim in self._indexed_dims:
            return
        if not 1 <= dim <= 2000:
            raise ValueError(f"embedding dim must be in 1..2000 for an HNSW index, got {dim}")
        with self.connection() as conn:
            conn.execute(
                f"CREATE INDEX IF NOT EXISTS cache_prompts_hnsw_{dim} ON cache_prompts "
                f"USING hnsw ((embedding::vector({dim})) vector_cosine_ops) WHERE dim = {dim}"
            )
        self._indexed_dims.add(dim)

    @staticmethod
    def nearest_on(
        conn: psycopg.Connection[Any],
        space: Space | None,
        dim: int,
        embedding: np.ndarray,
        *,
        ef_search: int = 100,
        limit: int = 4,
        max_scan_tuples: int = 20000,
        explain: bool = False,
        exact: bool = False,
    ) -> list[tuple[int, float]]:
        """Up to ``limit`` (prompt_id, cosine similarity) nearest to ``embedding``, best first.

        ``space`` None searches every namespace of that dimension (benchmarks only). Runs in its own
        transaction on ``conn`` (settings are ``SET LOCAL``). With ``exact`` (needs a ``space``) every row of
        the namespace is compared (:meth:`exact_nearest_on`); otherwise the query may use the HNSW index with
        iterative scans. With ``explain`` the query is not run: the result is ``[(0, 1.0)]`` if the plan scans
        the HNSW index, ``[(0, 0.0)]`` otherwise (benchmarks).
        """
        if exact:
            if space is None:
                raise ValueError("an exact search needs a namespace")
            return exact_nearest_on(conn, space, dim, embedding, limit=limit, explain=explain)[0]
        if not 1 <= ef_search <= 1000:
            raise ValueError(f"ef_search must be in 1..1000, got {ef_search}")
        q = query_vector(embedding, dim, limit)
        d = int(dim)
        where = f"dim = {d}"
        params: dict[str, Any] = {"q": q, "lim": limit}
        if space is not None:
            where += " AND model_key = %(mk)s AND tenant = %(t)s AND embed_space = %(es)s"
            params.update(mk=space.model_key, t=space.tenant, es=space.embed_space)
        sql = (
            f"WITH c AS MATERIALIZED (SELECT id, embedding::vector({d}) <=> %(q)s::vector({d}) AS dist "
            f"FROM cache_prompts WHERE {where} ORDER BY embedding::vector({d}) <=> %(q)s::vector({d}) "
            f"LIMIT %(lim)s) SELECT id, dist FROM c ORDER BY dist, id"
        )
        # Pipelined: BEGIN, the settings and the query leave in one round trip (the lookup is on the router's
        # critical path, and round trips, not the HNSW scan, dominate it at our table sizes).
        with conn.pipeline(), conn.transaction():
            conn.execute(
                "SELECT set_config('hnsw.ef_search', %s, true), set_config('hnsw.iterative_scan', "
                "'relaxed_order', true), set_config('hnsw.max_scan_tuples', %s, true)",
                (str(ef_search), str(max_scan_tuples)),
            )
            if explain:
                plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql, params))  # type: ignore[call-overload]
                return [(0, 1.0 if f"cache_prompts_hnsw_{d}" in plan else 0.0)]
            rows = conn.execute(sql, params).fetchall()  # type: ignore[call-overload]
        return [(int(r[0]), 1.0 - float(r[1])) for r in rows]

    def namespace_rows(self, space: Space) -> int:
        """The namespace's prompt count as :meth:`nearest` last saw it, capped at ``exact_scan_max_rows + 1``.

        Kept per process: an exact search returns the count with its answer (so a growing small namespace
        moves to HNSW at its first lookup past the threshold); a count older than ``size_ttl_s`` (a namespace on
        the HNSW path, or one this process has not searched lately) is taken again (bounded,
        :meth:`count_rows_on`), so a namespace that shrank under the threshold (eviction) moves back within
        that time.
        """
        cap = self.exact_scan_max_rows + 1
        hit = self._rows.get(space)
        now = time.monotonic()
        if hit is not None and now - hit[1] < self.size_ttl_s:
            return hit[0]
        with self.connection() as conn:
            n = self.count_rows_on(conn, space, cap)
        self._rows[space] = (n, now)
        return n

    def nearest(self, space: Space, embedding: np.ndarray, **kwargs: Any) -> list[tuple[int, float]]:
        """:meth:`nearest_on` in ``space``, exact when the namespace holds ≤ ``exact_scan_max_rows`` prompts
        (:meth:`namespace_rows`), else through the HNSW index; ``kwargs`` as :meth:`nearest_on` (``ef_search``
        and ``max_scan_tuples`` only matter to the HNSW path)."""
        if self.exact_scan_max_rows > 0 and self.namespace_rows(space) <= self.exact_scan_max_rows:
            with self.connection() as conn:
                rows, n = self.exact_nearest_on(conn, space, space.dim, embedding, limit=kwargs.get("limit", 4))
            self._rows[space] = (min(n, self.exact_scan_max_rows + 1), time.monotonic())
            return rows
        with self.connection() as conn:
            return self.nearest_on(conn, space, space.dim, embedding, **kwargs)
