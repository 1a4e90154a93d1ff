"""Exact search of small namespaces, and the bounded row count that decides when a namespace is small.

Why: the filtered HNSW scan walks the whole table's graph and keeps only the namespace's rows, so a namespace
holding a small share of a large table loses recall (100k rows, 1 % namespace: recall@1 0.91 at ef 100), while
reading a few thousand rows costs a few ms. Namespaces of at most ``DEFAULT_EXACT_SCAN_MAX_ROWS`` prompts
(``NIRVANA_CACHE_EXACT_SCAN_MAX_ROWS``) are therefore compared row by row. Measured: docs/CACHE.md, "Small
namespaces".

Invariants:
    * :func:`exact_nearest_on` returns the true nearest rows of one namespace (ties broken by id), whatever the
      namespace's share of the table: the HNSW index cannot serve its ORDER BY, and sequential scans are off
      for the query so stale statistics cannot turn it into a whole-table read.
    * :func:`count_rows_on` reads at most ``cap`` index entries, whatever the namespace's size.
    * Both are read-only and run on the caller's connection.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import psycopg

from nirvana.cache.index_rows import Space

DEFAULT_EXACT_SCAN_MAX_ROWS = 5000


def query_vector(embedding: np.ndarray, dim: int, limit: int) -> np.ndarray:
    """``embedding`` as the flat float32 vector a search sends, after checking ``limit`` (1..1000) and that it
    has ``dim`` components (``ValueError`` otherwise). Shared by the exact and the HNSW search."""
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit must be in 1..1000, got {limit}")
    q = np.asarray(embedding, dtype=np.float32).ravel()
    if q.shape[0] != dim:
        raise ValueError(f"embedding dim must be {dim}, got {q.shape[0]}")
    return q


def exact_nearest_on(
    conn: psycopg.Connection[Any],
    space: Space,
    dim: int,
    embedding: np.ndarray,
    *,
    limit: int = 4,
    explain: bool = False,
) -> tuple[list[tuple[int, float]], int]:
    """Exact search of one namespace: (up to ``limit`` (prompt_id, similarity) best first, the namespace's
    row count).

    The rows are read through the namespace btree in a materialized CTE, so the HNSW index cannot serve the
    ORDER BY: the answer is the true nearest (ties by id) whatever the namespace's share of the table. The
    count comes with it at no extra scan. Sequential scans are off for the query (``SET LOCAL``): with stale
    statistics (a namespace evicted from large to small) the planner could otherwise read the whole table.
    """
    q = query_vector(embedding, dim, limit)
    d = int(dim)
    sql = (
        f"WITH c AS MATERIALIZED (SELECT id, embedding::vector({d}) <=> %(q)s::vector({d}) AS dist "
        f"FROM cache_prompts WHERE dim = {d} AND model_key = %(mk)s AND tenant = %(t)s AND embed_space = %(es)s) "
        "SELECT id, dist, (SELECT count(*) FROM c) FROM c ORDER BY dist, id LIMIT %(lim)s"
    )
    params = {"q": q, "lim": limit, "mk": space.model_key, "t": space.tenant, "es": space.embed_space}
    with conn.pipeline(), conn.transaction():  # one round trip, as nearest_on
        conn.execute("SELECT set_config('enable_seqscan', 'off', true)")
        if explain:
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + sql, params))  # type: ignore[call-overload]
            return [(0, 1.0 if f"cache_prompts_hnsw_{d}" in plan else 0.0)], 0
        rows = conn.execute(sql, params).fetchall()  # type: ignore[call-overload]
    if not rows:
        return [], 0
    return [(int(r[0]), 1.0 - float(r[1])) for r in rows], int(rows[0][2])


def count_rows_on(conn: psycopg.Connection[Any], space: Space, cap: int) -> int:
    """The namespace's prompt count, counted up to ``cap`` (an index-only walk of the namespace btree of at
    most ``cap`` entries: cheap whatever the namespace's size). The dimension is not checked: an embedding
    space has one."""
    r = conn.execute(
        "SELECT count(*) FROM (SELECT 1 FROM cache_prompts WHERE model_key = %s AND tenant = %s "
        "AND embed_space = %s LIMIT %s) x",
        (space.model_key, space.tenant, space.embed_space, cap),
    ).fetchone()
    return int(r[0]) if r else 0
