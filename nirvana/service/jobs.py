"""Job rows in Postgres: creation (with idempotency keys), reads, and every state change as a guarded UPDATE.

State machine (also in ``migrations/0100_jobs.sql``)::

    queued → routing → routed → rendering → done | failed | cancelled
    routing → done                      (the router serves an exact hit itself)
    rendering → routed                  (reaper: the worker died; attempts < max_attempts) | failed

Invariants:
    * Every transition names the state(s) it leaves (``WHERE status = ...``); a render transition also names the
      attempt it belongs to, so a redelivered or superseded task changes nothing.
    * ``attempts`` counts render claims; the reaper re-dispatches with the current value, and a claim only
      succeeds for the message carrying it.
    * A job's image object is written before the row that points at it (``image_uri``).
    * Terminal states (done, failed, cancelled) are never left.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg.rows import dict_row

from nirvana.generation import GenerationRequest
from nirvana.pipeline.plan import CachePlan, RenderPlan
from nirvana.service.errors import Conflict, FieldError, NotFound
from nirvana.service.schemas import TERMINAL

ACTIVE = ("queued", "routing", "routed", "rendering")


def new_id() -> str:
    return uuid.uuid4().hex


def request_hash(body: dict[str, Any]) -> str:
    """Digest of a request body (canonical JSON): same key + same body ⇒ same job."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def make_pool(url: str, max_size: int = 8, name: str = "nirvana-jobs", timeout: float = 30.0) -> Any:
    """A psycopg pool of autocommit connections returning dict rows.

    Connections are checked when handed out, so after a database restart no caller gets a dead one; while the
    database is down, a caller waits at most ``timeout`` seconds, then gets ``psycopg_pool.PoolTimeout`` (an
    ``OperationalError``: the API answers 503).
    """
    from psycopg_pool import ConnectionPool

    return ConnectionPool(
        url,
        min_size=1,
        max_size=max_size,
        kwargs={"autocommit": True, "row_factory": dict_row},
        open=True,
        name=name,
        timeout=timeout,
        check=ConnectionPool.check_connection,
    )


@dataclass
class NewJob:
    """A validated job to insert: its generation request (defaults already applied, seed concrete; stored in the
    columns of the same names) and where and how it runs."""

    id: str
    tenant: str
    request: GenerationRequest
    model: str
    model_key: str
    render_queue: str
    cache_mode: str
    request_hash: str
    idempotency_key: str | None = None
    batch_id: str | None = None
    batch_index: int | None = None
    cache_tenant: str | None = None  # the cache namespace's tenant: this tenant, or the shared pool

    def columns(self) -> dict[str, Any]:
        """Column → value of the job's row (``_INSERT_COLS``)."""
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "request"}
        return {**own, **self.request.fields()}


_INSERT_COLS = (
    "id",
    "tenant",
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance",
    "width",
    "height",
    "model",
    "model_key",
    "render_queue",
    "cache_mode",
    "request_hash",
    "idempotency_key",
    "batch_id",
    "batch_index",
    "cache_tenant",
)


class JobStore:
    """All SQL on ``jobs`` and ``batches``. Thread-safe (a connection pool)."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool

    @classmethod
    def connect(cls, url: str, max_size: int = 8, timeout: float = 30.0) -> JobStore:
        return cls(make_pool(url, max_size=max_size, timeout=timeout))

    def close(self) -> None:
        self.pool.close()

    @contextmanager
    def conn(self) -> Iterator[psycopg.Connection[Any]]:
        with self.pool.connection() as c:
            yield c

    def _one(self, sql: str, args: Sequence[Any] | dict[str, Any]) -> dict[str, Any] | None:
        with self.conn() as c:
            row: dict[str, Any] | None = c.execute(sql, args).fetchone()  # type: ignore[arg-type]
            return row

    # ------------------------------------------------------------------ creation
    def create(self, job: NewJob) -> tuple[dict[str, Any], bool]:
        """Insert ``job``; with an idempotency key, return the existing job instead when the key was used.

        Returns:
            (row, created): ``created`` is False when an earlier job with the same key was returned.

        Raises:
            FieldError("Idempotency-Key"): the key was used with a different body (HTTP 422).
            Conflict: the original job with this key is still being created (not yet enqueued; HTTP 409).
        """
        cols = job.columns()
        vals = [cols[c] for c in _INSERT_COLS]
        sql = (
            f"INSERT INTO jobs ({', '.join(_INSERT_COLS)}) VALUES ({', '.join(['%s'] * len(vals))}) "
            "ON CONFLICT (tenant, idempotency_key) DO NOTHING RETURNING *"
        )
        row = self._one(sql, vals)
        if row is not None:
            return row, True
        existing = self._one(
            "SELECT * FROM jobs WHERE tenant = %s AND idempotency_key = %s", (job.tenant, job.idempotency_key)
        )
        if existing is None:  # deleted in between (its enqueue failed): let the client retry
            raise Conflict("a job with this Idempotency-Key is being created or was rolled back; retry")
        if existing["request_hash"] != job.request_hash:
            raise FieldError("Idempotency-Key", "already used with a different request body")
        if existing["enqueued_at"] is None and existing["batch_id"] is None:
            raise Conflict("the original job with this Idempotency-Key is still being created; retry")
        return existing, False

    def create_batch(self, tenant: str, jobs: list[NewJob]) -> str:
        """Insert a batch and its jobs in one transaction; returns the batch id."""
        batch_id = new_id()
        with self.conn() as c, c.transaction():
            c.execute("INSERT INTO batches (id, tenant, total) VALUES (%s, %s, %s)", (batch_id, tenant, len(jobs)))
            rows = [{**j.columns(), "batch_id": batch_id} for j in jobs]
            with c.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO jobs ({', '.join(_INSERT_COLS)}) VALUES ({', '.join(['%s'] * len(_INSERT_COLS))})",
                    [[r[col] for col in _INSERT_COLS] for r in rows],
                )
        return batch_id

    def mark_enqueued(self, job_ids: Sequence[str]) -> None:
        with self.conn() as c:
            c.execute(
                "UPDATE jobs SET enqueued_at = coalesce(enqueued_at, clock_timestamp()) WHERE id = ANY(%s)",
                (list(job_ids),),
            )

    def delete_unenqueued(self, job_id: str) -> None:
        """Roll back a job whose task could not be sent (so its idempotency key can be reused)."""
        with self.conn() as c:
            c.execute("DELETE FROM jobs WHERE id = %s AND enqueued_at IS NULL", (job_id,))

    # ------------------------------------------------------------------ reads
    def get(self, job_id: str, tenant: str | None = None) -> dict[str, Any]:
        """The job row (of ``tenant`` when given). Raises NotFound (also for another tenant's job)."""
        row = self._one("SELECT * FROM jobs WHERE id = %s", (job_id,))
        if row is None or (tenant is not None and row["tenant"] != tenant):
            raise NotFound(f"job {job_id} not found")
        return row

    def get_batch(self, batch_id: str, tenant: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        b = self._one("SELECT * FROM batches WHERE id = %s", (batch_id,))
        if b is None or (tenant is not None and b["tenant"] != tenant):
            raise NotFound(f"batch {batch_id} not found")
        with self.conn() as c:
            jobs = c.execute(
                "SELECT id, batch_index, status, tier, k, error, image_uri FROM jobs WHERE batch_id = %s "
                "ORDER BY batch_index",
                (batch_id,),
            ).fetchall()
        return b, list(jobs)

    def batch_job_ids(self, batch_id: str, only_unenqueued: bool = False) -> list[str]:
        cond = " AND enqueued_at IS NULL" if only_unenqueued else ""
        with self.conn() as c:
            rows = c.execute(
                f"SELECT id FROM jobs WHERE batch_id = %s{cond} ORDER BY batch_index", (batch_id,)
            ).fetchall()
        return [r["id"] for r in rows]

    # ------------------------------------------------------------------ cancellation
    def cancel(self, job_id: str, tenant: str | None = None) -> dict[str, Any]:
        """Request cancellation: a job not yet rendering is cancelled at once; a rendering one stops at its next
        denoising step (the worker sees ``cancel_requested``). Terminal jobs are returned unchanged."""
        self.get(job_id, tenant)
        row = self._one(
            "UPDATE jobs SET cancel_requested = true, "
            "status = CASE WHEN status IN ('queued', 'routing', 'routed') THEN 'cancelled' ELSE status END, "
            "finished_at = CASE WHEN status IN ('queued', 'routing', 'routed') THEN clock_timestamp() "
            "ELSE finished_at END, updated_at = clock_timestamp() "
            "WHERE id = %s AND status IN ('queued', 'routing', 'routed', 'rendering') RETURNING *",
            (job_id,),
        )
        return row if row is not None else self.get(job_id, tenant)

    def cancel_batch(self, batch_id: str, tenant: str | None = None) -> int:
        self.get_batch(batch_id, tenant)
        with self.conn() as c:
            c.execute("UPDATE batches SET cancel_requested = true WHERE id = %s", (batch_id,))
            cur = c.execute(
                "UPDATE jobs SET cancel_requested = true, "
                "status = CASE WHEN status IN ('queued', 'routing', 'routed') THEN 'cancelled' ELSE status END, "
                "finished_at = CASE WHEN status IN ('queued', 'routing', 'routed') THEN clock_timestamp() "
                "ELSE finished_at END, updated_at = clock_timestamp() "
                "WHERE batch_id = %s AND status IN ('queued', 'routing', 'routed', 'rendering')",
                (batch_id,),
            )
            return int(cur.rowcount or 0)

    # ------------------------------------------------------------------ router transitions
    def claim_route(self, job_id: str, max_attempts: int = 5) -> dict[str, Any] | None:
        """queued|routing → routing, counting the attempt (routing is re-entrant: a redelivered route task
        redoes a lookup, which writes nothing). None when the job is past routing or gone, or when it already
        had ``max_attempts`` route claims: then it ends ``failed`` naming the count and its last route error."""
        return self.claim_routes([job_id], max_attempts).get(job_id)

    def claim_routes(self, job_ids: Sequence[str], max_attempts: int = 5) -> dict[str, dict[str, Any]]:
        """:meth:`claim_route` for many jobs in two statements; the claimed rows by job id (a job id given
        twice is claimed once)."""
        ids = list(dict.fromkeys(job_ids))
        with self.conn() as c:
            c.execute(
                "UPDATE jobs SET status = 'failed', finished_at = clock_timestamp(), updated_at = clock_timestamp(), "
                "error = format('route attempts exhausted (%%s)%%s', route_attempts, "
                "coalesce(': ' || route_error, '')) "
                "WHERE id = ANY(%s) AND status IN ('queued', 'routing') AND route_attempts >= %s",
                (ids, max_attempts),
            )
            # A route task that arrives proves the job was enqueued, even if the API failed to record it (database
            # gone between the send and mark_enqueued): without this, an Idempotency-Key replay answered 409 forever.
            rows = c.execute(
                "UPDATE jobs SET status = 'routing', updated_at = clock_timestamp(), "
                "route_attempts = route_attempts + 1, enqueued_at = coalesce(enqueued_at, clock_timestamp()) "
                "WHERE id = ANY(%s) AND status IN ('queued', 'routing') RETURNING *",
                (ids,),
            ).fetchall()
        return {str(r["id"]): r for r in rows}

    def note_route_error(self, job_id: str, error: str) -> None:
        """Keep a failed route attempt's reason (the job's ``error`` once its route attempts run out)."""
        with self.conn() as c:
            c.execute(
                "UPDATE jobs SET route_error = %s WHERE id = %s AND status IN ('queued', 'routing')",
                (error[:500], job_id),
            )

    def set_plan(self, job_id: str, plan: CachePlan) -> dict[str, Any] | None:
        """routing → routed with the router's plan; None if the job left ``routing`` (e.g. cancelled)."""
        return self.set_plans([(job_id, plan)]).get(job_id)

    def set_plans(self, plans: Sequence[tuple[str, CachePlan]]) -> dict[str, dict[str, Any]]:
        """:meth:`set_plan` for many jobs in one pipelined round trip; the routed rows by job id (a job that
        left ``routing`` is absent)."""
        if not plans:
            return {}
        args = [_plan_args(job_id, plan) for job_id, plan in plans]
        out: dict[str, dict[str, Any]] = {}
        with self.conn() as c, c.cursor() as cur:
            cur.executemany(
                "UPDATE jobs SET status = 'routed', routed_at = clock_timestamp(), updated_at = clock_timestamp(), "
                "lease_until = NULL, tier = %(tier)s, k = %(k)s, k_policy = %(k_policy)s, "
                "similarity = %(similarity)s, source_prompt_id = %(source_prompt_id)s, "
                "source_job_id = %(source_job_id)s, state_id = %(state_id)s, image_blob_id = %(image_blob_id)s, "
                "exact_key = %(exact_key)s, embedding = %(embedding)s, lookup_ms = %(lookup_ms)s, "
                "gate_novel = %(gate_novel)s, capture_steps = %(capture_steps)s "
                "WHERE id = %(id)s AND status = 'routing' RETURNING *",
                args,
                returning=True,
            )
            while True:
                for row in cur.fetchall():
                    out[str(row["id"])] = row
                if not cur.nextset():
                    break
        return out

    def finish_exact(self, job_id: str, plan: dict[str, Any], image_uri: str, image_bytes: int) -> bool:
        """routing → done for an exact hit served by the router (image already written)."""
        row = self._one(
            "UPDATE jobs SET status = 'done', tier = 'exact', k = 0, similarity = 1.0, "
            "source_prompt_id = %s, source_job_id = %s, image_blob_id = %s, exact_key = %s, lookup_ms = %s, "
            "start_step = steps, steps_run = 0, progress_step = steps, engine_s = 0, image_uri = %s, "
            "image_bytes = %s, routed_at = clock_timestamp(), finished_at = clock_timestamp(), "
            "updated_at = clock_timestamp() WHERE id = %s AND status = 'routing' RETURNING id",
            (
                plan.get("source_prompt_id"),
                plan.get("source_job_id"),
                plan.get("image_blob_id"),
                plan.get("exact_key"),
                plan.get("lookup_ms"),
                image_uri,
                image_bytes,
                job_id,
            ),
        )
        return row is not None

    # ------------------------------------------------------------------ render transitions
    def claim_render(self, job_id: str, attempt: int, worker: str, shared_pool: bool = False) -> RenderPlan | None:
        """routed → rendering for the message of ``attempt`` (attempts becomes attempt + 1); the job's typed
        plan. None otherwise: the message is stale (redelivered, superseded by the reaper) or the job was
        cancelled. ``shared_pool`` only matters for rows older than ``cache_tenant``."""
        row = self._one(
            "UPDATE jobs SET status = 'rendering', attempts = attempts + 1, worker = %s, "
            "heartbeat_at = clock_timestamp(), render_started_at = clock_timestamp(), progress_step = 0, "
            "updated_at = clock_timestamp() "
            "WHERE id = %s AND status = 'routed' AND attempts = %s AND NOT cancel_requested RETURNING *",
            (worker, job_id, attempt),
        )
        return None if row is None else RenderPlan.from_row(row, shared_pool)

    def heartbeat(self, job_id: str, attempts: int, step: int) -> bool:
        """Record progress and liveness; returns True when cancellation was requested (or the job was taken
        away from this attempt)."""
        row = self._one(
            "UPDATE jobs SET progress_step = greatest(progress_step, %s), heartbeat_at = clock_timestamp() "
            "WHERE id = %s AND status = 'rendering' AND attempts = %s RETURNING cancel_requested",
            (step, job_id, attempts),
        )
        return row is None or bool(row["cancel_requested"])

    def downgrade_to_miss(self, job_id: str, attempts: int, reason: str = "missing") -> None:
        """The planned state is unusable (``reason``: missing, error, rejected): the job renders from noise and
        says so (``cache_fallback``, counted in /metrics)."""
        with self.conn() as c:
            c.execute(
                "UPDATE jobs SET tier = 'miss', k = 0, state_id = NULL, cache_fallback = %s "
                "WHERE id = %s AND attempts = %s",
                (reason, job_id, attempts),
            )

    def record_failed(self, job_id: str, error: str) -> None:
        """The finished job's cache record failed for good: the job stays done; the error is kept for /metrics."""
        with self.conn() as c:
            c.execute("UPDATE jobs SET cache_record_error = %s WHERE id = %s", (error[:500], job_id))

    def finish(
        self,
        job_id: str,
        attempts: int,
        image_uri: str,
        image_bytes: int,
        start_step: int,
        steps_run: int,
        engine_s: float,
    ) -> bool:
        """rendering → done (image already written); False if this attempt no longer owns the job."""
        row = self._one(
            "UPDATE jobs SET status = 'done', image_uri = %s, image_bytes = %s, start_step = %s, steps_run = %s, "
            "engine_s = %s, progress_step = steps, finished_at = clock_timestamp(), updated_at = clock_timestamp() "
            "WHERE id = %s AND status = 'rendering' AND attempts = %s RETURNING id",
            (image_uri, image_bytes, start_step, steps_run, engine_s, job_id, attempts),
        )
        return row is not None

    def mark_cancelled(self, job_id: str, attempts: int | None = None) -> bool:
        cond = "" if attempts is None else " AND attempts = %s"
        args: list[Any] = [job_id] + ([] if attempts is None else [attempts])
        row = self._one(
            "UPDATE jobs SET status = 'cancelled', finished_at = clock_timestamp(), updated_at = clock_timestamp() "
            f"WHERE id = %s AND status IN ('queued', 'routing', 'routed', 'rendering'){cond} RETURNING id",
            args,
        )
        return row is not None

    def fail(self, job_id: str, error: str, attempts: int | None = None) -> bool:
        cond = "" if attempts is None else " AND attempts = %s"
        args: list[Any] = [error[:2000], job_id] + ([] if attempts is None else [attempts])
        row = self._one(
            "UPDATE jobs SET status = 'failed', error = %s, finished_at = clock_timestamp(), "
            "updated_at = clock_timestamp() "
            f"WHERE id = %s AND status IN ('queued', 'routing', 'routed', 'rendering'){cond} RETURNING id",
            args,
        )
        return row is not None

    def release_for_retry(self, job_id: str, attempts: int) -> bool:
        """rendering → routed after a transient render error (the caller re-sends with ``attempts``)."""
        row = self._one(
            "UPDATE jobs SET status = 'routed', worker = NULL, updated_at = clock_timestamp(), lease_until = NULL "
            "WHERE id = %s AND status = 'rendering' AND attempts = %s RETURNING id",
            (job_id, attempts),
        )
        return row is not None

    # ------------------------------------------------------------------ reaper
    def reap(self, stale_s: float, requeue_s: float, max_attempts: int) -> dict[str, list[dict[str, Any]]]:
        """Find stuck jobs and move them (guarded); returns what the caller must re-send.

        * rendering with a heartbeat older than ``stale_s`` (its worker died): back to routed when attempts <
          ``max_attempts`` (→ ``render``), else failed (→ ``failed``).
        * routed or queued/routing whose lease ran out (a task lost between the row and the broker, or still
          waiting in a backlog): re-sent as is (→ ``render`` / ``route``). The lease starts at the transition
          that sent the job's message (``updated_at``, ``requeue_s`` long) and each re-send doubles it (capped
          at 64 × ``requeue_s``), so a job in a long backlog gets a bounded number of duplicates, not one
          every ``requeue_s``. Duplicates are harmless (guarded claims); route attempts are capped apart.
        """
        out: dict[str, list[dict[str, Any]]] = {"render": [], "route": [], "failed": []}
        lease = "coalesce(lease_until, updated_at + make_interval(secs => %(requeue)s)) < clock_timestamp()"
        renew = (
            "lease_until = clock_timestamp() + make_interval(secs => %(requeue)s * power(2, least(resends + 1, 6))), "
            "resends = resends + 1"
        )
        args = {"stale": stale_s, "requeue": requeue_s, "max": max_attempts}
        with self.conn() as c:
            out["failed"] = c.execute(
                "UPDATE jobs SET status = 'failed', finished_at = clock_timestamp(), updated_at = clock_timestamp(), "
                "error = format('render attempts exhausted (%%s): the worker stopped responding', attempts) "
                "WHERE status = 'rendering' AND heartbeat_at < clock_timestamp() - make_interval(secs => %(stale)s) "
                "AND attempts >= %(max)s RETURNING id",
                args,
            ).fetchall()
            out["render"] = c.execute(
                "UPDATE jobs SET status = 'routed', worker = NULL, updated_at = clock_timestamp(), lease_until = NULL "
                "WHERE status = 'rendering' AND heartbeat_at < clock_timestamp() - make_interval(secs => %(stale)s) "
                "AND attempts < %(max)s RETURNING id, attempts, render_queue",
                args,
            ).fetchall()
            out["render"] += c.execute(
                f"UPDATE jobs SET {renew} WHERE status = 'routed' AND {lease} RETURNING id, attempts, render_queue",
                args,
            ).fetchall()
            out["route"] = c.execute(
                f"UPDATE jobs SET {renew} WHERE status IN ('queued', 'routing') AND enqueued_at IS NOT NULL "
                f"AND {lease} RETURNING id",
                args,
            ).fetchall()
        return out

    # ------------------------------------------------------------------ maintenance
    def get_state(self, name: str) -> str | None:
        """A maintenance task's saved position (``maintenance_state``), or None."""
        row = self._one("SELECT value FROM maintenance_state WHERE name = %s", (name,))
        return None if row is None else str(row["value"])

    def set_state(self, name: str, value: str) -> None:
        with self.conn() as c:
            c.execute(
                "INSERT INTO maintenance_state (name, value) VALUES (%s, %s) "
                "ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, updated_at = now()",
                (name, value),
            )

    def expire_images(self, older_than_s: float, limit: int) -> list[str]:
        """Finished jobs older than ``older_than_s`` lose their image (``image_uri`` NULL: the API then answers
        that the image is gone); returns the URIs to delete, at most ``limit``."""
        with self.conn() as c:
            rows = c.execute(
                "WITH old AS (SELECT id, image_uri FROM jobs WHERE status = 'done' AND image_uri IS NOT NULL "
                "AND finished_at < clock_timestamp() - make_interval(secs => %s) ORDER BY finished_at LIMIT %s "
                "FOR UPDATE SKIP LOCKED) "
                "UPDATE jobs j SET image_uri = NULL, updated_at = clock_timestamp() FROM old WHERE j.id = old.id "
                "RETURNING old.image_uri",
                (older_than_s, limit),
            ).fetchall()
        return [str(r["image_uri"]) for r in rows]

    def delete_finished(self, older_than_s: float, limit: int) -> list[str | None]:
        """Delete the rows of jobs finished longer ago than ``older_than_s`` (at most ``limit``; their
        idempotency keys go with them); returns each deleted job's image URI (None: it had none left)."""
        with self.conn() as c:
            rows = c.execute(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE status IN ('done', 'failed', 'cancelled') "
                "AND finished_at < clock_timestamp() - make_interval(secs => %s) ORDER BY finished_at LIMIT %s "
                "FOR UPDATE SKIP LOCKED) RETURNING image_uri",
                (older_than_s, limit),
            ).fetchall()
        return [None if r["image_uri"] is None else str(r["image_uri"]) for r in rows]

    # ------------------------------------------------------------------ aggregates (metrics, stats)
    def counts_by_status(self) -> dict[str, int]:
        with self.conn() as c:
            rows = c.execute("SELECT status, count(*) AS n FROM jobs GROUP BY status").fetchall()
        return {r["status"]: int(r["n"]) for r in rows}

    def tenant_summary(self, tenant: str) -> dict[str, Any]:
        with self.conn() as c:
            row = c.execute(
                "SELECT count(*) AS jobs, count(*) FILTER (WHERE status = 'done') AS done, "
                "count(*) FILTER (WHERE tier = 'exact' AND status = 'done') AS exact, "
                "count(*) FILTER (WHERE tier = 'approximate' AND status = 'done') AS approximate, "
                "count(*) FILTER (WHERE tier = 'miss' AND status = 'done') AS miss, "
                "coalesce(sum(steps) FILTER (WHERE status = 'done'), 0) AS steps, "
                "coalesce(sum(steps - steps_run) FILTER (WHERE status = 'done'), 0) AS steps_saved "
                "FROM jobs WHERE tenant = %s",
                (tenant,),
            ).fetchone()
        assert row is not None
        return {k: int(v) for k, v in row.items()}


def iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.isoformat()


def seconds(a: datetime | None, b: datetime | None) -> float | None:
    if a is None or b is None:
        return None
    return round((b - a).total_seconds(), 6)


TERMINAL_STATES = TERMINAL


def _plan_args(job_id: str, plan: CachePlan) -> dict[str, Any]:
    """The jobs-row columns a plan sets (the parameters of :meth:`JobStore.set_plans`)."""
    src = plan.source
    return {
        "id": job_id,
        "tier": plan.tier,
        "k": 0 if src is None else src.k,
        "k_policy": None if src is None else src.k_policy,
        "similarity": plan.similarity,
        "source_prompt_id": None if src is None else src.source_prompt_id,
        "source_job_id": None if src is None else src.source_job_id,
        "state_id": None if src is None else src.state_id,
        "image_blob_id": plan.image_blob_id,
        "exact_key": plan.exact_key,
        "embedding": None if plan.embedding is None else np.asarray(plan.embedding, dtype=np.float32).tobytes(),
        "lookup_ms": plan.lookup_ms,
        "gate_novel": plan.gate_novel,
        "capture_steps": None if plan.capture_steps is None else list(plan.capture_steps),
    }
