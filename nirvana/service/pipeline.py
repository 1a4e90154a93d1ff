"""What the workers do, without Celery: route a job (cache lookup → plan), render it, and keep the system tidy.

``workers/`` wraps these in Celery tasks; tests can call them directly.

Invariants:
    * Every step starts with a guarded claim of the job row (``JobStore``), so a redelivered task is a no-op.
    * Render order: image object → cache record (its blobs, then its rows) → the job row that makes the image
      visible. A crash anywhere leaves either nothing visible or everything.
    * The cache counts a hit once per job id (``ApproximateCache.record`` is idempotent per job).
    * Cancellation is honoured between denoising steps: a heartbeat thread polls ``cancel_requested`` and the
      progress callback raises ``GenerationCancelled``.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nirvana.cache.core import SHARED_TENANT, ApproximateCache, CacheRequest, LookupResult, Namespace
from nirvana.config import Settings
from nirvana.service.jobs import JobStore
from nirvana.service.liveness import prune
from nirvana.service.models import ServedModel
from nirvana.service.service import TaskSender, image_key

log = logging.getLogger(__name__)


def worker_name(role: str) -> str:
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


def cache_request(job: dict[str, Any], shared_pool: bool) -> CacheRequest:
    """The cache's view of a job row (namespace: the job's model_key × the cache tenant chosen when the job was
    created — its tenant, or the shared pool when the tenant opted in; ``shared_pool`` only for older rows)."""
    ns_tenant = job.get("cache_tenant") or (SHARED_TENANT if shared_pool else job["tenant"])
    emb = job.get("embedding")
    return CacheRequest(
        prompt=job["prompt"],
        negative_prompt=job["negative_prompt"],
        seed=int(job["seed"]),
        steps=int(job["steps"]),
        guidance=float(job["guidance"]),
        width=int(job["width"]),
        height=int(job["height"]),
        namespace=Namespace(job["model_key"], ns_tenant),
        embedding=None if emb is None else np.frombuffer(bytes(emb), dtype=np.float32).copy(),
    )


def lookup_from_job(job: dict[str, Any]) -> LookupResult | None:
    """Rebuild the router's plan (a ``LookupResult``) from the job row; None for a miss."""
    if job["tier"] not in ("exact", "approximate"):
        return None
    return LookupResult(
        tier=job["tier"],
        k=int(job["k"] or 0),
        similarity=job["similarity"],
        source_prompt_id=job["source_prompt_id"],
        state_id=job["state_id"],
        image_uri=None,
        gate_novel=job["gate_novel"],
        gate_score=None,
        lookup_ms=float(job["lookup_ms"] or 0.0),
        k_policy=int(job["k_policy"] or 0),
        num_steps=int(job["steps"]),
        image_blob_id=job["image_blob_id"],
        exact_key=job["exact_key"] or "",
    )


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Router:
    """Routes jobs: exact tier (served here, no render), else a plan (approximate K or miss) sent to the job's
    render queue."""

    def __init__(self, settings: Settings, store: JobStore, cache: ApproximateCache, sender: TaskSender) -> None:
        self.settings = settings
        self.store = store
        self.cache = cache
        self.sender = sender

    def _source_job(self, source_prompt_id: int | None, tenant: str) -> str | None:
        """The job that produced a cached prompt, only when it is the caller's own."""
        if source_prompt_id is None:
            return None
        with self.store.conn() as c:
            row = c.execute(
                "SELECT j.id FROM cache_prompts p JOIN jobs j ON j.id = p.job_id WHERE p.id = %s AND j.tenant = %s",
                (source_prompt_id, tenant),
            ).fetchone()
        return None if row is None else str(row["id"])

    def route(self, job_id: str) -> str:
        """Route one job; returns what happened (``exact``, ``approximate``, ``miss``, ``skipped``)."""
        job = self.store.claim_route(job_id)
        if job is None:
            return "skipped"
        req = cache_request(job, self.settings.cache_shared_pool)
        plan: dict[str, Any] = {"tier": "miss", "k": 0}
        if job["cache_mode"] != "off":
            res = self.cache.lookup(req)
            plan.update(
                similarity=res.similarity,
                lookup_ms=res.lookup_ms,
                gate_novel=res.gate_novel,
                exact_key=res.exact_key,
                embedding=res.embedding,
            )
            if res.tier == "exact":
                png = self.cache.load_image(res)
                if png is not None:
                    return self._serve_exact(job, req, res, png)
                plan["embedding"] = self.cache.embed([req.prompt])[0]
            elif res.tier == "approximate" and job["cache_mode"] == "auto":
                plan.update(
                    tier="approximate",
                    k=res.k,
                    k_policy=res.k_policy,
                    source_prompt_id=res.source_prompt_id,
                    source_job_id=self._source_job(res.source_prompt_id, job["tenant"]),
                    state_id=res.state_id,
                )
        routed = self.store.set_plan(job_id, plan)
        if routed is None:
            return "skipped"
        self.sender.send_render(job_id, routed["render_queue"], int(routed["attempts"]))
        return str(plan["tier"])

    def _serve_exact(self, job: dict[str, Any], req: CacheRequest, res: LookupResult, png: bytes) -> str:
        ref = self.cache.store.put_bytes(image_key(job["tenant"], job["id"]), png, "png")
        self.cache.record(job["id"], req, [], None, res)
        plan = {
            "source_prompt_id": res.source_prompt_id,
            "source_job_id": self._source_job(res.source_prompt_id, job["tenant"]),
            "image_blob_id": res.image_blob_id,
            "exact_key": res.exact_key,
            "lookup_ms": res.lookup_ms,
        }
        return "exact" if self.store.finish_exact(job["id"], plan, ref.uri, len(png)) else "skipped"


@dataclass
class _Progress:
    step: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)


class Renderer:
    """Renders jobs of one served model with one loaded engine (one per process; not thread-safe)."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        cache: ApproximateCache,
        engine: Any,
        model: ServedModel,
        sender: TaskSender,
        name: str | None = None,
        fault_hook: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.cache = cache
        self.engine = engine
        self.model = model
        self.sender = sender
        self.name = name or worker_name("render")
        # Test-only fault injection (nirvana.service.faults; None unless NIRVANA_FAULT_INJECTION=1): called as
        # fault_hook(point, job) at "step", "rendered" and "recorded".
        self.fault_hook = fault_hook

    def _heartbeat(self, job_id: str, attempts: int, prog: _Progress) -> None:
        while not prog.stop.wait(self.settings.progress_interval_s):
            try:
                if self.store.heartbeat(job_id, attempts, prog.step):
                    prog.cancelled.set()
            except Exception as e:  # a DB blip must not kill the render; the reaper has the final word
                log.warning("heartbeat of %s failed: %s", job_id, e)

    def render(self, job_id: str, attempt: int) -> str:
        """Render one job for the message of ``attempt``; returns ``done``, ``cancelled``, ``failed``,
        ``retry`` or ``skipped``."""
        from nirvana.engine.engine import GenerationCancelled

        job = self.store.claim_render(job_id, attempt, self.name)
        if job is None:
            return "skipped"
        attempts = int(job["attempts"])
        req = cache_request(job, self.settings.cache_shared_pool)
        hit = lookup_from_job(job)
        start = None
        if hit is not None and hit.tier == "approximate":
            start = self.cache.load_state(hit)
            if start is None:
                self.store.downgrade_to_miss(job_id, attempts)
                hit = None
        prog = _Progress()
        beat = threading.Thread(target=self._heartbeat, args=(job_id, attempts, prog), daemon=True)
        beat.start()

        hook = self.fault_hook

        def callback(i: int, n: int) -> None:
            prog.step = i
            if hook is not None:
                hook("step", job)
            if prog.cancelled.is_set():
                raise GenerationCancelled(job_id)

        try:
            out = self.engine.generate(
                [job["prompt"]],
                seeds=[int(job["seed"])],
                negative_prompts=[job["negative_prompt"]],
                steps=int(job["steps"]),
                guidance=float(job["guidance"]),
                height=int(job["height"]),
                width=int(job["width"]),
                start=start,
                capture=[] if job["cache_mode"] == "off" else None,
                callback=callback,
            )
            if hook is not None:
                hook("rendered", job)
            png = png_bytes(out.pil_images()[0])
            ref = self.cache.store.put_bytes(image_key(job["tenant"], job_id), png, "png")
            if job["cache_mode"] != "off":
                self.cache.record(job_id, req, out.states[0], png, hit)
            if hook is not None:
                hook("recorded", job)
            ok = self.store.finish(job_id, attempts, ref.uri, len(png), out.start_step, out.steps_run, out.seconds)
            return "done" if ok else "skipped"
        except GenerationCancelled:
            self.store.mark_cancelled(job_id, attempts)
            return "cancelled"
        except ValueError as e:  # a request the engine rejects will never succeed
            log.warning("job %s failed: %s", job_id, e)
            self.store.fail(job_id, f"invalid request: {e}", attempts)
            return "failed"
        except Exception as e:
            log.exception("job %s attempt %d failed", job_id, attempts)
            if attempts >= self.settings.max_attempts:
                self.store.fail(job_id, f"{type(e).__name__}: {e}", attempts)
                return "failed"
            if self.store.release_for_retry(job_id, attempts):
                self.sender.send_render(job_id, job["render_queue"], attempts)
            return "retry"
        finally:
            prog.stop.set()
            beat.join(timeout=5)


class Maintenance:
    """Beat tasks: eviction to budget (+ orphan sweep), novelty-gate refit, the reaper."""

    def __init__(self, settings: Settings, store: JobStore, cache: ApproximateCache | None, sender: TaskSender) -> None:
        self.settings = settings
        self.store = store
        self.cache = cache
        self.sender = sender

    def evict(self) -> dict[str, Any]:
        if self.cache is None:
            return {}
        res = self.cache.evict_to_budget()
        res["orphans_deleted"] = self.cache.sweep_orphans()
        return res

    def refit_gate(self) -> dict[str, Any]:
        return {} if self.cache is None else self.cache.refit_gate()

    def reap(self) -> dict[str, int]:
        """Re-send jobs stuck on a dead worker (or lost between row and broker); fail exhausted ones."""
        t0 = time.monotonic()
        s = self.settings
        found = self.store.reap(s.reaper_stale_s, s.reaper_requeue_s, s.max_attempts)
        for r in found["render"]:
            self.sender.send_render(r["id"], r["render_queue"], int(r["attempts"]))
        for r in found["route"]:
            self.sender.send_route(r["id"])
        out = {k: len(v) for k, v in found.items()}
        out["workers_forgotten"] = prune(self.store.pool)
        if any(out.values()):
            log.warning("reaper: %s (%.0f ms)", out, (time.monotonic() - t0) * 1000)
        return out
