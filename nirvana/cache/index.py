"""SQL side of the cache: pgvector nearest-neighbour search within a namespace, state/blob rows, atomic hit
counting, policy-ordered eviction, the job ledger and persisted gate models.

Filtering and HNSW: pgvector applies WHERE clauses *after* the index scan, so a namespace holding 1% of the
rows would leave an ``ef_search``-sized candidate list almost empty. Every search therefore enables pgvector ≥
0.8 iterative scans (``hnsw.iterative_scan = relaxed_order``, bounded by ``hnsw.max_scan_tuples``) and
re-sorts the few candidates it returns. The index is partial per embedding dimension over the expression
``embedding::vector(D)``; queries repeat both the expression and a literal ``dim = D``.

Concurrency: hit counting is one UPDATE of one row (atomic under any number of workers); recording is one
transaction that starts by claiming its job id in ``cache_jobs`` (a redelivered job finds it taken and records
nothing); eviction holds a transaction-level advisory lock, so evictors run one at a time while hits and
records continue. Transactions that lose a deadlock are retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row

from nirvana.cache.eviction import EvictionPolicy, tenant_overflows

log = logging.getLogger(__name__)

# One blob row (a re-put of the same uri updates it): used alone for images and inside the states' insert.
_INSERT_BLOB = (
    "INSERT INTO cache_blobs (kind, uri, codec, bytes, checksum, model_key, tenant) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (uri) DO UPDATE SET codec = EXCLUDED.codec, "
    "bytes = EXCLUDED.bytes, checksum = EXCLUDED.checksum RETURNING id"
)

EVICT_LOCK_KEY = 0x6E766576  # "nvev"
T = TypeVar("T")
# Namespaces of at most this many prompts are searched exactly (NIRVANA_CACHE_EXACT_SCAN_MAX_ROWS): the filtered
# HNSW scan walks the whole table's graph and keeps only the namespace's rows, so a namespace holding a small
# share of a large table loses recall (100k rows, 1 % namespace: recall@1 0.91 at ef 100), while reading a few
# thousand rows costs a few ms. Measured: docs/CACHE.md, "Small namespaces".
DEFAULT_EXACT_SCAN_MAX_ROWS = 5000


def configure_connection(conn: psycopg.Connection[Any]) -> None:
    """Register pgvector types on a connection (use as a pool's ``configure`` callback)."""
    from pgvector.psycopg import register_vector

    register_vector(conn)


def _has_vector_adapter(conn: psycopg.Connection[Any]) -> bool:
    try:
        return conn.adapters.types.get("vector") is not None
    except Exception:  # pragma: no cover - defensive
        return False


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


@dataclass(frozen=True)
class Space:
    """Where vectors are comparable: a (model_key, tenant) namespace in one embedding space."""

    model_key: str
    tenant: str
    embed_space: str
    dim: int


@dataclass(frozen=True)
class StateRow:
    state_id: int
    prompt_id: int
    k: int
    num_steps: int
    timestep: float
    sigma: float | None
    scheduler_family: str
    shape: list[int]
    model_key: str
    blob_id: int
    uri: str | None
    codec: str
    bytes: int
    checksum: str | None


@dataclass(frozen=True)
class NewState:
    """A state row to insert: its own blob (``uri`` None for a virtual blob)."""

    k: int
    num_steps: int
    timestep: float
    sigma: float | None
    scheduler_family: str
    shape: list[int]
    uri: str | None
    codec: str
    bytes: int
    checksum: str | None


@dataclass(frozen=True)
class NewImage:
    uri: str | None
    bytes: int
    checksum: str | None
    codec: str = "png"


@dataclass(frozen=True)
class NewPrompt:
    prompt: str
    negative_prompt: str
    embedding: np.ndarray
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    exact_key: str


def _retry(fn: Callable[[], T], attempts: int = 8) -> T:
    for i in range(attempts):
        try:
            return fn()
        except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as e:
            if i == attempts - 1:
                raise
            log.info("retrying after %s", type(e).__name__)
            time.sleep(0.005 * (2**i))
    raise AssertionError("unreachable")


class CacheIndex:
    """All cache SQL, over a psycopg connection pool (connections are used in autocommit mode with explicit
    transactions).

    Args:
        pool: a psycopg pool.
        exact_scan_max_rows: :meth:`nearest` searches a namespace of at most this many prompts exactly (every row
            of the namespace, read through the namespace btree) instead of through the filtered HNSW scan; 0:
            always HNSW (the planner may still pick the btree on its own).
        size_ttl_s: how long a namespace's row count is trusted before :meth:`nearest` counts it again (an exact
            search refreshes it for free; see :meth:`namespace_rows`).
    """

    def __init__(
        self, pool: Any, exact_scan_max_rows: int = DEFAULT_EXACT_SCAN_MAX_ROWS, size_ttl_s: float = 60.0
    ) -> None:
        if exact_scan_max_rows < 0:
            raise ValueError(f"exact_scan_max_rows must be >= 0, got {exact_scan_max_rows}")
        if size_ttl_s < 0:
            raise ValueError(f"size_ttl_s must be >= 0, got {size_ttl_s}")
        self.pool = pool
        self.exact_scan_max_rows = exact_scan_max_rows
        self.size_ttl_s = size_ttl_s
        self._indexed_dims: set[int] = {384}
        # Space → (rows, capped at exact_scan_max_rows + 1; time.monotonic() of the count). Plain dict: a race
        # only repeats a count.
        self._rows: dict[Space, tuple[int, float]] = {}

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self.pool.connection() as conn:
            if not conn.autocommit:
                conn.commit()
                conn.autocommit = True
            if not _has_vector_adapter(conn):
                configure_connection(conn)
            yield conn

    # ------------------------------------------------------------------ vector search
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
            return CacheIndex.exact_nearest_on(conn, space, dim, embedding, limit=limit, explain=explain)[0]
        if not 1 <= ef_search <= 1000:
            raise ValueError(f"ef_search must be in 1..1000, got {ef_search}")
        if not 1 <= limit <= 1000:
            raise ValueError(f"limit must be in 1..1000, got {limit}")
        q = np.asarray(embedding, dtype=np.float32).ravel()
        if q.shape[0] != dim:
            raise ValueError(f"embedding dim must be {dim}, got {q.shape[0]}")
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

    @staticmethod
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
        if not 1 <= limit <= 1000:
            raise ValueError(f"limit must be in 1..1000, got {limit}")
        q = np.asarray(embedding, dtype=np.float32).ravel()
        if q.shape[0] != dim:
            raise ValueError(f"embedding dim must be {dim}, got {q.shape[0]}")
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

    @staticmethod
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

    def usable_states(self, prompt_ids: Sequence[int], num_steps: int) -> dict[int, list[tuple[int, int]]]:
        """prompt_id → [(state_id, k)] of states of a ``num_steps`` schedule, k ascending."""
        if not prompt_ids:
            return {}
        out: dict[int, list[tuple[int, int]]] = {}
        with self.connection() as conn:
            for pid, sid, k in conn.execute(
                "SELECT prompt_id, id, k FROM cache_states WHERE prompt_id = ANY(%s) AND num_steps = %s "
                "ORDER BY prompt_id, k",
                (list(prompt_ids), num_steps),
            ):
                out.setdefault(int(pid), []).append((int(sid), int(k)))
        return out

    def exact_match(self, space: Space, exact_key: str) -> dict[str, Any] | None:
        """Newest prompt of the namespace with this exact key that still has an image blob."""
        with self.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            return cur.execute(
                "SELECT p.id AS prompt_id, b.id AS blob_id, b.uri, b.checksum, b.bytes FROM cache_prompts p "
                "JOIN cache_blobs b ON b.id = p.image_blob_id WHERE p.model_key = %s AND p.tenant = %s "
                "AND p.exact_key = %s ORDER BY p.id DESC LIMIT 1",
                (space.model_key, space.tenant, exact_key),
            ).fetchone()

    def state_row(self, state_id: int) -> StateRow | None:
        with self.connection() as conn:
            r = conn.execute(
                "SELECT s.id, s.prompt_id, s.k, s.num_steps, s.timestep, s.sigma, s.scheduler_family, "
                "s.shape, "
                "p.model_key, b.id, b.uri, b.codec, b.bytes, b.checksum FROM cache_states s "
                "JOIN cache_blobs b ON b.id = s.blob_id JOIN cache_prompts p ON p.id = s.prompt_id "
                "WHERE s.id = %s",
                (state_id,),
            ).fetchone()
        if r is None:
            return None
        return StateRow(
            int(r[0]),
            int(r[1]),
            int(r[2]),
            int(r[3]),
            float(r[4]),
            None if r[5] is None else float(r[5]),
            str(r[6]),
            list(r[7]),
            str(r[8]),
            int(r[9]),
            r[10],
            str(r[11]),
            int(r[12]),
            r[13],
        )

    def image_blob(self, blob_id: int) -> tuple[str | None, str | None] | None:
        with self.connection() as conn:
            r = conn.execute("SELECT uri, checksum FROM cache_blobs WHERE id = %s", (blob_id,)).fetchone()
        return None if r is None else (r[0], r[1])

    def drop_blob(self, blob_id: int) -> str | None:
        """Delete a (bad) blob row; its state rows go with it (cascade), as do prompts left without states or
        image. Returns the blob's URI (for the caller to delete the object)."""

        def run() -> str | None:
            with self.connection() as conn, conn.transaction():
                pids = [
                    int(r[0])
                    for r in conn.execute("SELECT DISTINCT prompt_id FROM cache_states WHERE blob_id = %s", (blob_id,))
                ]
                pids += [
                    int(r[0]) for r in conn.execute("SELECT id FROM cache_prompts WHERE image_blob_id = %s", (blob_id,))
                ]
                r = conn.execute("DELETE FROM cache_blobs WHERE id = %s RETURNING uri", (blob_id,)).fetchone()
                conn.execute(
                    "DELETE FROM cache_prompts p WHERE p.id = ANY(%s) AND p.image_blob_id IS NULL AND NOT "
                    "EXISTS "
                    "(SELECT 1 FROM cache_states s WHERE s.prompt_id = p.id)",
                    (pids,),
                )
                return None if r is None else r[0]

        return _retry(run)

    # ------------------------------------------------------------------ recording
    def record(
        self,
        *,
        job_id: str,
        tier: str,
        space: Space,
        now: float,
        policy: EvictionPolicy,
        hit_state_id: int | None,
        source_prompt_id: int | None,
        hit_k: int,
        admit: bool,
        prompt: NewPrompt | None,
        states: Sequence[NewState],
        image: NewImage | None,
    ) -> dict[str, Any]:
        """Record one served generation in one transaction; idempotent per ``job_id``.

        Returns ``{"recorded": bool, "prompt_id": int | None, "states": n, "borrowed": n, "hit_counted":
        bool}``. ``recorded`` is False when the job was recorded before (nothing changes then).
        """

        def run() -> dict[str, Any]:
            out: dict[str, Any] = {
                "recorded": False,
                "prompt_id": None,
                "states": 0,
                "borrowed": 0,
                "hit_counted": False,
            }
            with self.connection() as conn, conn.transaction():
                claimed = conn.execute(
                    "INSERT INTO cache_jobs (job_id, tier, hit_state_id) VALUES (%s, %s, %s) "
                    "ON CONFLICT (job_id) DO NOTHING RETURNING job_id",
                    (job_id, tier, hit_state_id),
                ).fetchone()
                if claimed is None:
                    return out
                out["recorded"] = True
                if admit and prompt is not None:
                    pid = self._insert_entry(
                        conn, job_id, space, now, policy, source_prompt_id, hit_k, prompt, states, image, out
                    )
                    out["prompt_id"] = pid
                    conn.execute("UPDATE cache_jobs SET prompt_id = %s WHERE job_id = %s", (pid, job_id))
                if tier == "approximate" and hit_state_id is not None:
                    out["hit_counted"] = self.count_hit(conn, hit_state_id, now, policy.half_life_s)
                if source_prompt_id is not None and tier in ("approximate", "exact"):
                    exact = tier == "exact"
                    conn.execute(
                        "UPDATE cache_prompts SET last_used_ts = greatest(last_used_ts, %s), "
                        "exact_hits = exact_hits + %s, image_used_ts = CASE WHEN %s AND image_blob_id IS NOT NULL "
                        "THEN greatest(image_used_ts, %s) ELSE image_used_ts END WHERE id = %s",
                        (now, 1 if exact else 0, exact, now, source_prompt_id),
                    )
            return out

        return _retry(run)

    @staticmethod
    def _insert_entry(
        conn: psycopg.Connection[Any],
        job_id: str,
        space: Space,
        now: float,
        policy: EvictionPolicy,
        source_prompt_id: int | None,
        hit_k: int,
        p: NewPrompt,
        states: Sequence[NewState],
        image: NewImage | None,
        out: dict[str, Any],
    ) -> int:
        image_blob_id = None
        if image is not None:
            image_blob_id = CacheIndex._insert_blob(
                conn, "image", image.uri, image.codec, image.bytes, image.checksum, space
            )
        row = conn.execute(
            "INSERT INTO cache_prompts (model_key, tenant, embed_space, dim, embedding, prompt, "
            "negative_prompt, "
            "seed, steps, guidance, width, height, exact_key, image_blob_id, job_id, source_prompt_id, "
            "hit_k, "
            "created_ts, last_used_ts, image_used_ts) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
            "%s, %s, %s, %s, "
            "%s, %s, %s) RETURNING id",
            (
                space.model_key,
                space.tenant,
                space.embed_space,
                space.dim,
                np.asarray(p.embedding, dtype=np.float32).ravel(),
                p.prompt,
                p.negative_prompt,
                p.seed,
                p.steps,
                p.guidance,
                p.width,
                p.height,
                p.exact_key,
                image_blob_id,
                job_id,
                source_prompt_id,
                hit_k or None,
                now,
                now,
                now if image_blob_id is not None else None,
            ),
        ).fetchone()
        assert row is not None
        pid = int(row[0])
        # One statement per state inserts its blob and its row (a data-modifying CTE), and executemany sends
        # them all in one pipeline: one round trip for the five states of a generation instead of ten.
        own_ks = {s.k for s in states}
        if states:
            with conn.cursor() as cur:
                cur.executemany(
                    f"WITH b AS ({_INSERT_BLOB}) "
                    "INSERT INTO cache_states (prompt_id, blob_id, k, num_steps, timestep, sigma, scheduler_family, "
                    "shape, dhits, dhits_ts, created_ts, last_used_ts) "
                    "SELECT %s::bigint, b.id, %s::integer, %s::integer, %s::double precision, "
                    "%s::double precision, %s::text, %s::integer[], %s::double precision, %s::double precision, "
                    "%s::double precision, %s::double precision FROM b",
                    [
                        (
                            "state",
                            s.uri,
                            s.codec,
                            s.bytes,
                            s.checksum,
                            space.model_key,
                            space.tenant,
                            pid,
                            s.k,
                            s.num_steps,
                            s.timestep,
                            s.sigma,
                            s.scheduler_family,
                            s.shape,
                            policy.insert_credit,
                            now,
                            now,
                            now,
                        )
                        for s in states
                    ],
                )
        out["states"] = len(own_ks)
        if source_prompt_id is not None and hit_k > 0:
            # The source's states at k <= hit_k: this prompt's trajectory passed through them.
            try:
                with conn.transaction():
                    cur = conn.execute(
                        "INSERT INTO cache_states (prompt_id, blob_id, k, num_steps, timestep, sigma, "
                        "scheduler_family, shape, borrowed, dhits, dhits_ts, created_ts, last_used_ts) "
                        "SELECT %s, s.blob_id, s.k, s.num_steps, s.timestep, s.sigma, s.scheduler_family, "
                        "s.shape, "
                        "true, %s, %s, %s, %s FROM cache_states s WHERE s.prompt_id = %s AND s.k <= %s "
                        "AND s.num_steps = %s AND NOT (s.k = ANY(%s)) ON CONFLICT (prompt_id, k) DO NOTHING",
                        (
                            pid,
                            policy.insert_credit,
                            now,
                            now,
                            now,
                            source_prompt_id,
                            hit_k,
                            p.steps,
                            sorted(own_ks),
                        ),
                    )
                    out["borrowed"] = cur.rowcount
            except pg_errors.ForeignKeyViolation:
                log.info("source blobs of prompt %s evicted while borrowing; borrowed none", source_prompt_id)
        return pid

    @staticmethod
    def _insert_blob(
        conn: psycopg.Connection[Any],
        kind: str,
        uri: str | None,
        codec: str,
        nbytes: int,
        checksum: str | None,
        space: Space,
    ) -> int:
        row = conn.execute(_INSERT_BLOB, (kind, uri, codec, nbytes, checksum, space.model_key, space.tenant)).fetchone()
        assert row is not None
        return int(row[0])

    @staticmethod
    def count_hit(conn: psycopg.Connection[Any], state_id: int, now: float, half_life_s: float) -> bool:
        """One atomic UPDATE: hits + 1, decayed uses decayed to ``now`` + 1, last use. False if the state is
        gone (evicted meanwhile)."""
        cur = conn.execute(
            "UPDATE cache_states SET hits = hits + 1, "
            "dhits = dhits * power(2.0, -greatest(0, %(now)s - dhits_ts) / %(hl)s) + 1, "
            "dhits_ts = greatest(dhits_ts, %(now)s), last_used_ts = greatest(last_used_ts, %(now)s), "
            "last_hit_at = now() WHERE id = %(id)s",
            {"now": now, "hl": half_life_s, "id": state_id},
        )
        return cur.rowcount == 1

    # ------------------------------------------------------------------ eviction
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
        one transaction holding the eviction advisory lock.
        Returns counts (``images``: images dropped in phase 0), bytes freed, ``tenants`` (bytes the per-tenant
        stage freed, per tenant over its budget) and the URIs whose rows are gone (the caller deletes those
        objects after this returns).
        """
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
                self._evict_scope(policy, tenant_budget_bytes, now, batch, res, tenant)
                res["tenants"][tenant] = res["bytes"] - before
        self._evict_scope(policy, budget_bytes, now, batch, res, None)
        return res

    def _evict_scope(
        self,
        policy: EvictionPolicy,
        budget_bytes: int,
        now: float,
        batch: int,
        res: dict[str, Any],
        tenant: str | None,
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
                ids = [] if drop else [int(x[0]) for x in conn.execute(q["states"], p)]  # type: ignore[call-overload]
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
            if not _retry(step):
                break

    # ------------------------------------------------------------------ maintenance
    def known_uris(self) -> set[str]:
        with self.connection() as conn:
            return {str(r[0]) for r in conn.execute("SELECT uri FROM cache_blobs WHERE uri IS NOT NULL")}

    def known_among(self, uris: list[str]) -> set[str]:
        """Those of ``uris`` a blob row references (one indexed query, not a scan of every row)."""
        with self.connection() as conn:
            return {str(r[0]) for r in conn.execute("SELECT uri FROM cache_blobs WHERE uri = ANY(%s)", (uris,))}

    def prune_ledger(self, older_than_s: float) -> int:
        with self.connection() as conn:
            cur = conn.execute(
                "DELETE FROM cache_jobs WHERE recorded_at < now() - make_interval(secs => %s)",
                (older_than_s,),
            )
            return cur.rowcount

    def namespaces(self) -> list[tuple[Space, int]]:
        """Every (namespace, embedding space) with its prompt count."""
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT model_key, tenant, embed_space, dim, count(*) FROM cache_prompts "
                "GROUP BY model_key, tenant, embed_space, dim ORDER BY 1, 2, 3"
            ).fetchall()
        return [(Space(r[0], r[1], r[2], int(r[3])), int(r[4])) for r in rows]

    def sample_embeddings(self, space: Space, n: int) -> np.ndarray:
        with self.connection() as conn:
            rows = conn.execute(
                "SELECT embedding FROM cache_prompts WHERE model_key = %s AND tenant = %s AND embed_space "
                "= %s "
                "AND dim = %s ORDER BY random() LIMIT %s",
                (space.model_key, space.tenant, space.embed_space, space.dim, n),
            ).fetchall()
        if not rows:
            return np.zeros((0, space.dim), dtype=np.float32)
        return np.stack([np.asarray(r[0].to_numpy() if hasattr(r[0], "to_numpy") else r[0], np.float32) for r in rows])

    def save_gate(self, space: Space, n_samples: int, fitted_ts: float, model: bytes | None) -> None:
        with self.connection() as conn:
            if model is None:
                conn.execute(
                    "DELETE FROM cache_gate_models WHERE model_key = %s AND tenant = %s AND embed_space = %s",
                    (space.model_key, space.tenant, space.embed_space),
                )
                return
            conn.execute(
                "INSERT INTO cache_gate_models (model_key, tenant, embed_space, n_samples, fitted_ts, model) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (model_key, tenant, embed_space) DO UPDATE SET "
                "n_samples = EXCLUDED.n_samples, fitted_ts = EXCLUDED.fitted_ts, model = EXCLUDED.model",
                (space.model_key, space.tenant, space.embed_space, n_samples, fitted_ts, model),
            )

    def load_gate(self, space: Space) -> bytes | None:
        with self.connection() as conn:
            r = conn.execute(
                "SELECT model FROM cache_gate_models WHERE model_key = %s AND tenant = %s AND embed_space = %s",
                (space.model_key, space.tenant, space.embed_space),
            ).fetchone()
        return None if r is None else bytes(r[0])

    def stats(self, tenant: str | None = None) -> dict[str, Any]:
        cond, args = ("WHERE tenant = %s", [tenant]) if tenant is not None else ("", [])
        pcond = "WHERE p.tenant = %s" if tenant is not None else ""
        with self.connection() as conn:
            b = conn.execute(
                f"SELECT kind, count(*), coalesce(sum(bytes), 0), count(uri) FROM cache_blobs {cond} GROUP BY kind",
                args,
            ).fetchall()
            p = conn.execute(
                f"SELECT count(*), coalesce(sum(exact_hits), 0), count(DISTINCT (model_key, tenant)) "
                f"FROM cache_prompts {cond}",
                args,
            ).fetchone()
            s = conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE s.borrowed), coalesce(sum(s.hits), 0) "
                f"FROM cache_states s JOIN cache_prompts p ON p.id = s.prompt_id {pcond}",
                args,
            ).fetchone()
            by_k = conn.execute(
                f"SELECT s.k, count(*) FROM cache_states s JOIN cache_prompts p ON p.id = s.prompt_id "
                f"{pcond} "
                "GROUP BY s.k ORDER BY s.k",
                args,
            ).fetchall()
            jobs = conn.execute("SELECT tier, count(*) FROM cache_jobs GROUP BY tier").fetchall()
        blobs = {str(r[0]): {"count": int(r[1]), "bytes": int(r[2]), "stored": int(r[3])} for r in b}
        assert p is not None and s is not None
        return {
            "tenant": tenant,
            "prompts": int(p[0]),
            "namespaces": int(p[2]),
            "exact_hits": int(p[1]),
            "states": int(s[0]),
            "borrowed_states": int(s[1]),
            "state_hits": int(s[2]),
            "states_by_k": {int(k): int(n) for k, n in by_k},
            "state_bytes": blobs.get("state", {}).get("bytes", 0),
            "image_bytes": blobs.get("image", {}).get("bytes", 0),
            "bytes": sum(v["bytes"] for v in blobs.values()),
            "blobs": blobs,
            "jobs_by_tier": {str(t): int(n) for t, n in jobs} if tenant is None else None,
        }
