"""The cache's SQL behind one object: :class:`CacheIndex`, composed of its parts, plus the entry reads and the
maintenance queries (ledger, orphan check, gate models, stats).

The parts, one module each: connections and deadlock retry (:mod:`~nirvana.cache.index_conn`), row types
(:mod:`~nirvana.cache.index_rows`), nearest-neighbour search (:mod:`~nirvana.cache.index_search`) with its exact
scan of small namespaces (:mod:`~nirvana.cache.index_exact`), recording (:mod:`~nirvana.cache.index_record`) and
eviction (:mod:`~nirvana.cache.index_evict`). Their public names are re-exported here, so
``from nirvana.cache.index import …`` keeps working for every one of them.

Invariants:
    * All cache SQL goes through a ``CacheIndex`` over one psycopg pool; connections are used in autocommit mode
      with explicit transactions.
    * Reads never write, except :meth:`CacheIndex.drop_blob`, which removes a bad blob with its state rows and
      the prompts left with neither state nor image, in one (retried) transaction.
    * Concurrency: hit counting is one UPDATE of one row; recording is one transaction that claims its job id
      first; eviction batches hold a transaction-level advisory lock. Transactions that lose a deadlock are
      retried.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from psycopg.rows import dict_row

from nirvana.cache.index_conn import configure_connection, retry
from nirvana.cache.index_evict import EVICT_LOCK_KEY, EvictionSql, eviction_queries
from nirvana.cache.index_exact import DEFAULT_EXACT_SCAN_MAX_ROWS
from nirvana.cache.index_record import RecordSql
from nirvana.cache.index_rows import NewImage, NewPrompt, NewState, Space, StateRow
from nirvana.cache.index_search import VectorSearch

__all__ = [
    "DEFAULT_EXACT_SCAN_MAX_ROWS",
    "EVICT_LOCK_KEY",
    "CacheIndex",
    "NewImage",
    "NewPrompt",
    "NewState",
    "Space",
    "StateRow",
    "configure_connection",
    "eviction_queries",
]


class CacheIndex(VectorSearch, RecordSql, EvictionSql):
    """All cache SQL, over a psycopg connection pool (connections are used in autocommit mode with explicit
    transactions).

    Search (:class:`~nirvana.cache.index_search.VectorSearch`), recording
    (:class:`~nirvana.cache.index_record.RecordSql`) and eviction (:class:`~nirvana.cache.index_evict.EvictionSql`)
    come from their modules; the entry reads and maintenance queries are here.

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
        super().__init__(pool)
        self.exact_scan_max_rows = exact_scan_max_rows
        self.size_ttl_s = size_ttl_s
        self._indexed_dims = {384}
        # Space → (rows, capped at exact_scan_max_rows + 1; time.monotonic() of the count). Plain dict: a race
        # only repeats a count.
        self._rows = {}

    # ------------------------------------------------------------------ entry reads
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

        return retry(run)

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
