"""Recording one served generation in SQL: the job ledger claim, the prompt row, its state and image blob rows,
borrowed states, and the hit counted on the state it used.

Invariants:
    * One recorded job is one transaction that starts by claiming its job id in ``cache_jobs``; a redelivered
      job finds it taken and changes nothing, so a hit is counted at most once per job id.
    * A blob row is inserted with (or before) the row that references it, in the same transaction; a re-put of
      the same uri updates the blob row instead of adding one.
    * Hit counting is one UPDATE of one row (atomic under any number of workers); a state evicted meanwhile is
      simply not counted.
    * Borrowed states reference the source prompt's blobs (``borrowed`` true): they free no bytes on eviction.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import psycopg
from psycopg import errors as pg_errors

from nirvana.cache.eviction import EvictionPolicy
from nirvana.cache.index_conn import IndexConnection, retry
from nirvana.cache.index_rows import NewImage, NewPrompt, NewState, Space

log = logging.getLogger(__name__)

# One blob row (a re-put of the same uri updates it): used alone for images and inside the states' insert.
_INSERT_BLOB = (
    "INSERT INTO cache_blobs (kind, uri, codec, bytes, checksum, model_key, tenant) "
    "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (uri) DO UPDATE SET codec = EXCLUDED.codec, "
    "bytes = EXCLUDED.bytes, checksum = EXCLUDED.checksum RETURNING id"
)


class RecordSql(IndexConnection):
    """The recording part of :class:`nirvana.cache.index.CacheIndex`."""

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

        return retry(run)

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
            image_blob_id = RecordSql._insert_blob(
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
