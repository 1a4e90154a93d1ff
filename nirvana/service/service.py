"""The job service protocol the HTTP layer depends on (vLLM-style: routers are thin, logic lives here).

``JobService`` validates requests against the deployment's limits and the served model, writes job rows, hands
tasks to a ``TaskSender`` (Celery in production, anything in tests) and shapes responses. It knows neither
FastAPI nor Celery.

Invariants:
    * A job row exists before its task is sent; a job whose task could not be sent is deleted again (HTTP 503),
      so an idempotency key never points at a job nobody will run.
    * Tenants only ever see their own jobs and batches (another tenant's id is "not found").
    * Responses never contain another tenant's prompt text: the cache outcome names a source job only when it
      is the caller's, and a shared-pool job reports no similarity unless its source is the caller's own.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any, Protocol

from nirvana.cache.store import LatentStore, token
from nirvana.config import Settings
from nirvana.generation import GenerationRequest
from nirvana.service import jobs as J
from nirvana.service.errors import Conflict, FieldError, NotFound, Unavailable
from nirvana.service.keys import KeyVerifier, Principal
from nirvana.service.models import ModelRegistry, served_name
from nirvana.service.schemas import (
    TERMINAL,
    Batch,
    BatchJobResult,
    Job,
    JobCache,
    JobProgress,
    JobRequest,
    JobTimings,
)
from nirvana.service.tenants import SHARED_TENANT, TenantPools

log = logging.getLogger(__name__)


class TaskSender(Protocol):
    """Hands tasks to workers. The task id is always the job id."""

    def send_route(self, job_id: str) -> None: ...

    def send_render(self, job_id: str, queue: str, attempt: int) -> None: ...


def image_key(tenant: str, job_id: str, attempt: int = 0) -> str:
    """Deterministic storage key of a job's PNG for one render attempt (0: served by the router).

    Why the attempt: a worker the reaper gave up on may still be running; its late write must not replace the
    image of the attempt whose row made it visible (``finish`` is guarded by the attempt)."""
    base = f"jobs/{token('tenant', tenant)}/{job_id[:2]}/{job_id}"
    return f"{base}.png" if attempt == 0 else f"{base}.a{attempt}.png"


class JobService:
    """Create, read and cancel jobs and batches.

    Args:
        settings: limits and defaults.
        store: job rows.
        sender: task hand-off.
        storage: where job images live (the cache's store root).
        registry: served models (default: built from ``store.pool``).
    """

    def __init__(
        self,
        settings: Settings,
        store: J.JobStore,
        sender: TaskSender,
        storage: LatentStore,
        registry: ModelRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.sender = sender
        self.storage = storage
        self.registry = registry or ModelRegistry(store.pool, served_name(settings))
        self.keys = KeyVerifier(store.pool, ttl_s=settings.api_key_cache_s)
        self.pools = TenantPools(store.pool, ttl_s=settings.api_key_cache_s, all_shared=settings.cache_shared_pool)

    # ------------------------------------------------------------------ validation
    def _new_job(
        self,
        p: Principal,
        req: JobRequest,
        idempotency_key: str | None = None,
        prefix: str = "",
        batch_index: int | None = None,
        cache_tenant: str | None = None,
    ) -> J.NewJob:
        s = self.settings
        if len(req.prompt) > s.max_prompt_chars:
            raise FieldError(f"{prefix}prompt", f"at most {s.max_prompt_chars} characters")
        if not req.prompt.strip():
            raise FieldError(f"{prefix}prompt", "must not be blank")
        if len(req.negative_prompt) > s.max_prompt_chars:
            raise FieldError(f"{prefix}negative_prompt", f"at most {s.max_prompt_chars} characters")
        model = self.registry.resolve(req.model)
        steps = req.steps if req.steps is not None else s.default_steps
        if steps > s.max_steps:
            raise FieldError(f"{prefix}steps", f"must be in 1..{s.max_steps}")
        guidance = req.guidance if req.guidance is not None else model.default_guidance
        if guidance > s.max_guidance:
            raise FieldError(f"{prefix}guidance", f"must be in 0..{s.max_guidance}")
        width = req.width or model.width
        height = req.height or model.height
        for name, v in (("width", width), ("height", height)):
            if v > s.max_image_size or v % model.size_multiple:
                raise FieldError(
                    f"{prefix}{name}",
                    f"must be a multiple of {model.size_multiple} and at most {s.max_image_size} for model "
                    f"{model.name!r}",
                )
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
        if idempotency_key is not None and not (1 <= len(idempotency_key) <= 200 and idempotency_key.isprintable()):
            raise FieldError("Idempotency-Key", "must be 1-200 printable characters")
        request = GenerationRequest(
            prompt=req.prompt,
            negative_prompt=req.negative_prompt,
            seed=seed,
            steps=steps,
            guidance=float(guidance),
            width=width,
            height=height,
        )
        return J.NewJob(
            id=J.new_id(),
            tenant=p.tenant,
            request=request,
            model=model.name,
            model_key=model.model_key(height, width),
            render_queue=model.queue,
            cache_mode=req.cache,
            request_hash=J.request_hash(req.model_dump(mode="json")),
            idempotency_key=idempotency_key,
            batch_index=batch_index,
            cache_tenant=cache_tenant or self.pools.cache_tenant(p.tenant),
        )

    # ------------------------------------------------------------------ jobs
    def create_job(
        self, p: Principal, req: JobRequest, idempotency_key: str | None = None, base_url: str = ""
    ) -> tuple[Job, bool]:
        """Validate, insert and enqueue one job. Returns (job, created); see ``JobStore.create`` for the
        idempotency semantics."""
        job = self._new_job(p, req, idempotency_key)
        row, created = self.store.create(job)
        if created:
            try:
                self.sender.send_route(job.id)
            except Exception as e:
                log.error("could not enqueue job %s: %s", job.id, e)
                self.store.delete_unenqueued(job.id)
                raise Unavailable(f"broker unavailable: {type(e).__name__}") from e
            self.store.mark_enqueued([job.id])
            row = self.store.get(job.id)
        return self.to_job(row, base_url), created

    def get_job(self, p: Principal, job_id: str, base_url: str = "") -> Job:
        return self.to_job(self.store.get(job_id, p.tenant), base_url)

    def job_rows(self, p: Principal, job_ids: list[str]) -> list[dict[str, Any]]:
        return [self.store.get(j, p.tenant) for j in job_ids]

    def job_image(self, p: Principal, job_id: str) -> bytes:
        """PNG bytes of a finished job. Raises NotFound (unknown job, or no image yet: 404 with the status)."""
        row = self.store.get(job_id, p.tenant)
        if row["status"] not in TERMINAL:
            raise Conflict(f"job {job_id} is not finished (status {row['status']})")
        if row["status"] != "done" or not row["image_uri"]:
            raise NotFound(f"job {job_id} has no image (status {row['status']})")
        return self.storage.get_bytes(row["image_uri"])

    def cancel_job(self, p: Principal, job_id: str, base_url: str = "") -> Job:
        return self.to_job(self.store.cancel(job_id, p.tenant), base_url)

    def wait(self, p: Principal, job_ids: list[str], timeout_s: float, poll_s: float = 0.1) -> list[dict[str, Any]]:
        """Block until every job is terminal or ``timeout_s`` passes; returns the rows (sync: run it in a
        thread from async code)."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.job_rows(p, job_ids)
            if all(r["status"] in TERMINAL for r in rows) or time.monotonic() > deadline:
                return rows
            time.sleep(poll_s)

    # ------------------------------------------------------------------ batches
    def create_batch(self, p: Principal, reqs: list[JobRequest], base_url: str = "") -> Batch:
        """Insert all jobs in one transaction, then enqueue them. A job whose send fails is retried by the
        reaper (it stays queued with ``enqueued_at`` NULL until sent)."""
        limit = self.settings.max_batch_jobs
        if not reqs:
            raise FieldError("jobs", "at least one job is required")
        if len(reqs) > limit:
            raise FieldError("jobs", f"at most {limit} jobs per batch (got {len(reqs)})")
        ns = self.pools.cache_tenant(p.tenant)  # one namespace for the whole batch
        new = [self._new_job(p, r, prefix=f"jobs[{i}].", batch_index=i, cache_tenant=ns) for i, r in enumerate(reqs)]
        batch_id = self.store.create_batch(p.tenant, new)
        sent: list[str] = []
        try:
            for j in new:
                self.sender.send_route(j.id)
                sent.append(j.id)
        except Exception as e:
            log.error("batch %s: enqueued %d of %d jobs: %s", batch_id, len(sent), len(new), e)
            self.store.mark_enqueued(sent)
            self.store.cancel_batch(batch_id, p.tenant)
            raise Unavailable(f"broker unavailable: {type(e).__name__}; batch {batch_id} cancelled") from e
        self.store.mark_enqueued(sent)
        return self.get_batch(p, batch_id, base_url, include_jobs=False)

    def get_batch(self, p: Principal, batch_id: str, base_url: str = "", include_jobs: bool = True) -> Batch:
        b, rows = self.store.get_batch(batch_id, p.tenant)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        completed = sum(counts.get(s, 0) for s in TERMINAL)
        return Batch(
            id=b["id"],
            total=b["total"],
            counts=counts,
            completed=completed,
            done=completed == b["total"],
            cancel_requested=b["cancel_requested"],
            created_at=b["created_at"].isoformat(),
            jobs=[
                BatchJobResult(
                    id=r["id"],
                    index=r["batch_index"],
                    status=r["status"],
                    tier=r["tier"],
                    k=r["k"],
                    image_url=f"{base_url}/v1/jobs/{r['id']}/image" if r["status"] == "done" else None,
                    error=r["error"],
                )
                for r in rows
            ]
            if include_jobs
            else [],
        )

    def cancel_batch(self, p: Principal, batch_id: str, base_url: str = "") -> Batch:
        self.store.cancel_batch(batch_id, p.tenant)
        return self.get_batch(p, batch_id, base_url)

    # ------------------------------------------------------------------ responses
    def to_job(self, r: dict[str, Any], base_url: str = "") -> Job:
        request = GenerationRequest.from_row(r)
        total = request.steps
        step = int(r["progress_step"] or 0)
        if r["start_step"] is not None and r["status"] == "done":
            step = total
        done_at = r["finished_at"]
        saved = None
        if r["status"] == "done" and r["steps_run"] is not None:
            saved = total - int(r["steps_run"])
        similarity = None if r["similarity"] is None else round(float(r["similarity"]), 6)
        if r.get("cache_tenant") == SHARED_TENANT and not r["source_job_id"]:
            # In the shared pool the nearest cached prompt may be another tenant's: its exact cosine (reported even
            # on a miss) would be an oracle for recovering that prompt by search (docs/SECURITY.md).
            similarity = None
        return Job(
            id=r["id"],
            status=r["status"],
            batch_id=r["batch_id"],
            **request.fields(),
            model=r["model"],
            progress=JobProgress(step=step, total=total, fraction=round(step / total, 4)),
            timings=JobTimings(
                queued_at=r["created_at"].isoformat(),
                routed_at=J.iso(r["routed_at"]),
                rendering_at=J.iso(r["render_started_at"]),
                done_at=J.iso(done_at),
                queue_s=J.seconds(r["created_at"], r["routed_at"]),
                wait_render_s=J.seconds(r["routed_at"], r["render_started_at"]),
                render_s=J.seconds(r["render_started_at"], done_at),
                total_s=J.seconds(r["created_at"], done_at),
                engine_s=r["engine_s"],
            ),
            cache=JobCache(
                mode=r["cache_mode"],
                tier=r["tier"],
                k=r["k"],
                similarity=similarity,
                steps_saved=saved,
                source_job_id=r["source_job_id"],
            ),
            attempts=int(r["attempts"]),
            steps_run=r["steps_run"],
            image_url=f"{base_url}/v1/jobs/{r['id']}/image" if r["status"] == "done" else None,
            error=r["error"],
        )

    # ------------------------------------------------------------------ health
    def check_database(self) -> None:
        with self.store.conn() as c:
            row = c.execute("SELECT to_regclass('jobs') IS NOT NULL AS ok").fetchone()
        if not row or not row["ok"]:
            raise Unavailable("database is not migrated (run `nirvana migrate`)")

    def check_storage(self) -> None:
        key = f"health/{J.new_id()}"
        ref = self.storage.put_bytes(key, b"ok")
        if self.storage.get_bytes(ref.uri) != b"ok":
            raise Unavailable("storage read-back mismatch")
        self.storage.delete([ref.uri])

    def served_models(self) -> list[str]:
        return sorted(self.registry.models(refresh=True))


__all__ = ["JobService", "NotFound", "TaskSender", "image_key"]
