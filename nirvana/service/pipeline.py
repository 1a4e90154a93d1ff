"""What the workers do, without Celery: route a job (cache lookup → plan), render it, and keep the system tidy.

``workers/`` wraps these in Celery tasks; tests can call them directly.

Invariants:
    * Every step starts with a guarded claim of the job row (``JobStore``), so a redelivered task is a no-op.
    * Render order: image object (keyed by the attempt) → one cache record attempt (its blobs, then its rows;
      errors caught) → the job row that makes the image visible → retries of a failed record. A crash before
      the row leaves nothing visible; a cache fault costs the cache an entry, never the job its image.
    * A planned source state that cannot be loaded or resumed is a miss for that job (``cache_fallback``).
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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from nirvana.cache.core import ApproximateCache, CacheRequest, LookupResult
from nirvana.config import Settings
from nirvana.service.batcher import MicroBatcher
from nirvana.service.jobs import JobStore
from nirvana.service.liveness import prune
from nirvana.service.models import ServedModel
from nirvana.service.plan import CachePlan, RenderPlan, SourceState, cache_request
from nirvana.service.service import TaskSender, image_key

if TYPE_CHECKING:
    from nirvana.engine.core import RenderRequest, RowResult
    from nirvana.engine.state import CapturedState

log = logging.getLogger(__name__)


def worker_name(role: str) -> str:
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


def png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class _Claimed:
    """A job this route attempt claimed, with its cache request (embedded unless its cache is off); ``error``:
    why its embedding failed."""

    job: dict[str, Any]
    req: CacheRequest
    error: Exception | None = None


class Router:
    """Routes jobs: exact tier (served here, no render), else a plan (approximate K or miss) sent to the job's
    render queue.

    Thread-safe. ``batched`` (the router worker: ``NIRVANA_ROUTE_MAX_BATCH`` task threads) runs the per-job work
    that is cheaper in bulk once for the jobs being routed at once, in two :class:`MicroBatcher` stages:

    1. claim + embed: one claim statement for the batch, then one embedding call for its prompts;
    2. per job, on its own task thread (concurrently, overlapping the next batch's embedding): exact tier, gate,
       pgvector lookup, K (an exact hit is served right there);
    3. plan + send: the batch's plans written in one pipelined round trip, then its render messages.

    Each job keeps its own guarded, idempotent outcome: a job claimed by no one else, its error noted on it
    alone, a redelivered route task a no-op once the job left ``routing``. Two near-duplicates routed in one
    batch both miss (neither has states yet); the cache learns from both once they are rendered, as it did when
    they were routed one after the other faster than the first rendered. Unbatched, ``route`` runs the same
    stages for one job.
    """

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        cache: ApproximateCache,
        sender: TaskSender,
        batched: bool = False,
    ) -> None:
        self.settings = settings
        self.store = store
        self.cache = cache
        self.sender = sender
        self._memo: OrderedDict[str, Any] = OrderedDict()  # prompt → embedding, least recently used first
        self._memo_lock = threading.Lock()
        self.claims: MicroBatcher[str, _Claimed | None] | None = None
        self.commits: MicroBatcher[tuple[str, CachePlan], str] | None = None
        if batched:
            n, wait = settings.route_max_batch, settings.route_max_wait_ms
            self.claims = MicroBatcher(self.claim_and_embed, n, wait, name="route-claim")
            self.commits = MicroBatcher(self.commit_plans, n, wait, name="route-commit")

    def close(self) -> None:
        """Stop the batchers' threads (a batched router only)."""
        for b in (self.claims, self.commits):
            if b is not None:
                b.stop()

    def route(self, job_id: str) -> str:
        """Route one job; returns what happened (``exact``, ``approximate``, ``miss``, ``skipped``).

        Each call is one route attempt; an error after the claim is noted on the job and re-raised (Celery
        retries transient ones, the reaper re-sends the rest) until ``max_route_attempts`` ends the job
        ``failed`` with it."""
        claimed = self.claims.submit(job_id) if self.claims is not None else self.claim_and_embed([job_id])[0]
        if claimed is None:
            return "skipped"
        try:
            if claimed.error is not None:
                raise claimed.error
            plan = self._plan(claimed.job, claimed.req)
            if isinstance(plan, str):  # served by the exact tier
                return plan
            if self.commits is not None:
                return self.commits.submit((job_id, plan))
            outcome = self.commit_plans([(job_id, plan)])[0]
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        except Exception as e:
            try:
                self.store.note_route_error(job_id, f"{type(e).__name__}: {e}")
            except Exception as note:  # the database itself may be what failed
                log.warning("job %s: could not note the route error: %s", job_id, note)
            raise

    def claim_and_embed(self, job_ids: list[str]) -> list[_Claimed | None]:
        """Stage 1 for a batch: claim the jobs (None: not claimed, e.g. already routed) and embed the prompts of
        those whose cache is on, in one call. An embedding error becomes each claimed job's ``error``; a claim
        error is raised for the whole batch (nothing was claimed)."""
        rows = self.store.claim_routes(job_ids, self.settings.max_route_attempts)
        claimed = {jid: _Claimed(job, cache_request(job, self.settings.cache_shared_pool)) for jid, job in rows.items()}
        todo = [c for c in claimed.values() if c.job["cache_mode"] != "off" and c.req.embedding is None]
        if todo:
            try:
                embs = self.embed([c.req.prompt for c in todo])
                for c in todo:
                    c.req = replace(c.req, embedding=embs[c.req.prompt])  # the request is frozen
            except Exception as e:
                for c in todo:
                    c.error = e
        return [claimed.get(jid) for jid in job_ids]

    def embed(self, prompts: list[str]) -> dict[str, Any]:
        """Embeddings of ``prompts`` by prompt: the distinct ones the memo (``route_embed_memo`` most recently
        used prompts) lacks are embedded in one call. Users re-roll a prompt with new seeds (12 % of the
        dreambot trace's prompts repeat an earlier one); the embedding depends on the text alone."""
        out: dict[str, Any] = {}
        with self._memo_lock:
            for p in prompts:
                if p in self._memo:
                    self._memo.move_to_end(p)
                    out[p] = self._memo[p]
        new = [p for p in dict.fromkeys(prompts) if p not in out]
        if new:
            out.update(zip(new, self.cache.embed(new), strict=True))
            with self._memo_lock:
                for p in new:
                    self._memo[p] = out[p]
                while len(self._memo) > self.settings.route_embed_memo:
                    self._memo.popitem(last=False)
        return out

    def _plan(self, job: dict[str, Any], req: CacheRequest) -> CachePlan | str:
        """Stage 2 for one job: the cache's answer as a plan, or the outcome when the exact tier served it."""
        if job["cache_mode"] == "off":
            return CachePlan(tier="miss")
        # The steps to capture come from the policy the lookup scales K with: every stored state is askable.
        caps = tuple(self.cache.policy.cached_steps(req.steps))
        res = self.cache.lookup(req)
        plan = CachePlan(
            tier="miss",
            capture_steps=caps,
            similarity=res.similarity,
            lookup_ms=res.lookup_ms,
            gate_novel=res.gate_novel,
            exact_key=res.exact_key,
            embedding=req.embedding if res.embedding is None else res.embedding,
        )
        if res.tier == "exact":
            png = self.cache.load_image(res)
            if png is not None:
                return self._serve_exact(job, req, res, png)
        elif res.tier == "approximate" and job["cache_mode"] == "auto":
            source = SourceState(
                k=res.k,
                k_policy=res.k_policy,
                similarity=res.similarity,
                state_id=res.state_id,
                source_prompt_id=res.source_prompt_id,
                source_job_id=self._source_job(res.source_prompt_id, job["tenant"]),
            )
            plan = replace(plan, tier="approximate", source=source)
        return plan

    def commit_plans(self, plans: list[tuple[str, CachePlan]]) -> list[str | Exception]:
        """Stage 3 for a batch: write the plans (one round trip), then send each routed job's render message.
        Per job: its tier, ``skipped`` (it left ``routing``, e.g. cancelled), or the error sending it."""
        rows = self.store.set_plans(plans)
        out: list[str | Exception] = []
        for job_id, plan in plans:
            row = rows.get(job_id)
            if row is None:
                out.append("skipped")
                continue
            try:
                self.sender.send_render(job_id, row["render_queue"], int(row["attempts"]))
                out.append(plan.tier)
            except Exception as e:  # this job's message only; the others of the batch went out
                out.append(e)
        return out

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
    """Renders jobs of one served model through the process's engine loop (``EngineLoop``: one thread owns the
    model and batches every job in flight; ``engine`` is anything with its ``run(RenderRequest) -> RowResult``).
    """

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
        # Test-only fault injection (tests/faults/hooks.py, passed only by the fault suite's worker entry point):
        # called as fault_hook(point, job) at "step", "rendered", "stored" and "recorded".
        self.fault_hook = fault_hook
        self.record_retry_delays_s: tuple[float, ...] = (0.2, 1.0, 3.0)  # a transient record error gets retries

    def _heartbeat(self, job_id: str, attempts: int, prog: _Progress) -> None:
        while not prog.stop.wait(self.settings.progress_interval_s):
            try:
                if self.store.heartbeat(job_id, attempts, prog.step):
                    prog.cancelled.set()
            except Exception as e:  # a DB blip must not kill the render; the reaper has the final word
                log.warning("heartbeat of %s failed: %s", job_id, e)

    def _load_start(self, job_id: str, hit: LookupResult) -> tuple[CapturedState | None, str | None]:
        """The planned source state, or (None, reason) when it cannot be used: never an exception (a cache
        that fails to load a state costs the job its shortcut, not its image)."""
        try:
            state = self.cache.load_state(hit)
        except Exception as e:
            log.warning("job %s: loading state %s failed (%s: %s): rendering from noise", job_id, hit.state_id,
                        type(e).__name__, e)  # fmt: skip
            return None, "error"
        return (state, None) if state is not None else (None, "missing")

    def _try_record(self, plan: RenderPlan, res: RowResult, png: bytes, hit: LookupResult | None) -> str | None:
        """One cache record attempt; the error text, or None when recorded. Never raises."""
        try:
            self.cache.record(plan.job_id, plan.request, res.states, png, hit, attempt=plan.attempts)
            return None
        except Exception as e:
            return f"{type(e).__name__}: {e}"

    def _record_retries(
        self, plan: RenderPlan, res: RowResult, png: bytes, hit: LookupResult | None, error: str
    ) -> None:
        """After the job is done: retry a failed record on its own (never re-rendering), then give up and note
        it (``cache_record_error``, /metrics). A check that failed (ValueError) fails every time: no retry."""
        for delay in () if error.startswith("ValueError") else self.record_retry_delays_s:
            log.warning("job %s: cache record failed (%s), retrying in %.1f s", plan.job_id, error, delay)
            time.sleep(delay)
            again = self._try_record(plan, res, png, hit)
            if again is None:
                return
            error = again
        log.error("job %s: not recorded in the cache (%s); the job stays done", plan.job_id, error)
        try:
            self.store.record_failed(plan.job_id, error)
        except Exception as e:  # the count is best-effort too
            log.warning("job %s: could not note the record failure: %s", plan.job_id, e)

    def render(self, job_id: str, attempt: int) -> str:
        """Render one job for the message of ``attempt``; returns ``done``, ``cancelled``, ``failed``,
        ``retry`` or ``skipped``. Thread-safe: with a batching engine loop several render at once.

        Order: claim → source state (any failure to load or resume it: render from noise, ``cache_fallback``)
        → render → image object → one cache record attempt (errors caught) → job ``done`` (the row makes the
        image visible) → if the record failed, its retries (never a re-render). A cache fault never fails or
        re-renders a job; in the normal case a job is in the cache by the time it is done.
        """
        from nirvana.engine.core import GenerationCancelled, StateRejected
        from nirvana.engine.engine import to_pil

        plan = self.store.claim_render(job_id, attempt, self.name, self.settings.cache_shared_pool)
        if plan is None:
            return "skipped"
        attempts = plan.attempts
        hit = plan.lookup()
        start: CapturedState | None = None
        if hit is not None and plan.tier == "approximate":
            start, reason = self._load_start(job_id, hit)
            if start is None:
                self.store.downgrade_to_miss(job_id, attempts, reason or "missing")
                plan, hit = plan.as_miss(), None
        caps = plan.plan.capture_steps
        if plan.cache_mode == "off":
            caps = ()
        elif caps is None:  # routed before the plan carried its capture steps
            caps = tuple(self.cache.policy.cached_steps(plan.request.steps))
        prog = _Progress()
        beat = threading.Thread(target=self._heartbeat, args=(job_id, attempts, prog), daemon=True)
        beat.start()
        hook = self.fault_hook
        info = {"id": job_id, "prompt": plan.request.prompt, "attempts": attempts}

        def callback(i: int, n: int) -> None:
            prog.step = i
            if hook is not None:
                hook("step", info)
            if prog.cancelled.is_set():
                raise GenerationCancelled(job_id)

        try:
            res = self.engine.run(self._request(plan, start, caps, callback))
            if isinstance(res.error, StateRejected):
                log.warning("job %s: the engine refused state %s (%s): rendering from noise", job_id,
                            hit.state_id if hit else None, res.error)  # fmt: skip
                self.store.downgrade_to_miss(job_id, attempts, "rejected")
                plan, hit = plan.as_miss(), None
                res = self.engine.run(self._request(plan, None, caps, callback))
            if res.error is not None:
                raise res.error
            assert res.image is not None
            if hook is not None:
                hook("rendered", info)
            png = png_bytes(to_pil(res.image.unsqueeze(0))[0])
            ref = self.cache.store.put_bytes(image_key(plan.tenant, job_id, attempts), png, "png")
            if hook is not None:
                hook("stored", info)
            # One record attempt before the row: a user who refines a prompt as soon as the last one is done
            # must find it in the cache. It cannot fail the job; a failure is retried after the row.
            record_error = None if plan.cache_mode == "off" else self._try_record(plan, res, png, hit)
            if hook is not None:
                hook("recorded", info)
            ok = self.store.finish(job_id, attempts, ref.uri, len(png), res.start_step, res.steps_run, res.seconds)
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
                self.sender.send_render(job_id, plan.render_queue, attempts)
            return "retry"
        finally:
            prog.stop.set()
            beat.join(timeout=5)
        if not ok:
            return "skipped"  # another attempt owns the job now
        if record_error is not None:
            self._record_retries(plan, res, png, hit, record_error)
        return "done"

    @staticmethod
    def _request(plan: RenderPlan, start: CapturedState | None, caps: Any, callback: Any) -> RenderRequest:
        from nirvana.engine.core import RenderRequest

        r = plan.request
        return RenderRequest(
            prompt=r.prompt,
            seed=r.seed,
            negative_prompt=r.negative_prompt,
            steps=r.steps,
            guidance=r.guidance,
            height=r.height,
            width=r.width,
            start=start,
            capture=caps,
            callback=callback,
            tag=plan.job_id,
        )


class Maintenance:
    """Beat tasks, on the ``maintenance`` queue: eviction to budget, orphan sweep (a slice per run), gate
    refit, the reaper, retention. Every run does bounded work and is safe to repeat."""

    SWEEP_CURSOR = "sweep_orphans.next_shard"

    def __init__(self, settings: Settings, store: JobStore, cache: ApproximateCache | None, sender: TaskSender) -> None:
        self.settings = settings
        self.store = store
        self.cache = cache
        self.sender = sender

    def evict(self) -> dict[str, Any]:
        """Evict to budget in batches of ``evict_batch``, busy at most ``evict_duty`` of the time (the rest
        asleep, so Postgres and the CPU stay with routing while 100k states go)."""
        if self.cache is None:
            return {}
        duty = self.settings.evict_duty

        def pace(busy_s: float) -> None:
            if duty < 1:
                time.sleep(busy_s * (1 - duty) / duty)

        t0 = time.monotonic()
        res = self.cache.evict_to_budget(batch=self.settings.evict_batch, pace=pace)
        res["wall_s"] = round(time.monotonic() - t0, 3)
        return res

    def sweep(self) -> dict[str, Any]:
        """Delete unreferenced objects in the next ``sweep_shards_per_run`` of the store's 256 key shards; the
        cursor lives in Postgres, so the whole store is covered every 256 / n runs whoever runs them."""
        if self.cache is None:
            return {}
        n = self.settings.sweep_shards_per_run
        first = int(self.store.get_state(self.SWEEP_CURSOR) or 0) % 256
        shards = [f"{(first + i) % 256:02x}" for i in range(n)]
        deleted = self.cache.sweep_orphans(shards=shards)
        self.store.set_state(self.SWEEP_CURSOR, str((first + n) % 256))
        return {"shards": f"{shards[0]}..{shards[-1]}", "orphans_deleted": deleted}

    def retention(self) -> dict[str, int]:
        """Forget what is older than its retention (``NIRVANA_RETENTION_*``; 0 keeps it forever), at most
        ``retention_batch`` jobs per kind and run: the cache's job ledger, finished jobs' images, finished jobs."""
        s = self.settings
        out = {"ledger_rows": 0, "job_images": 0, "job_rows": 0}
        if self.cache is not None and s.retention_ledger_s > 0:
            out["ledger_rows"] = self.cache.prune_ledger(s.retention_ledger_s)
        uris: list[str] = []
        if s.retention_images_s > 0:
            expired = self.store.expire_images(s.retention_images_s, s.retention_batch)
            out["job_images"] = len(expired)
            uris += expired
        if s.retention_jobs_s > 0:
            deleted = self.store.delete_finished(s.retention_jobs_s, s.retention_batch)
            out["job_rows"] = len(deleted)
            uris += [u for u in deleted if u]
        if uris and self.cache is not None:
            self.cache.store.delete(uris)  # rows first: an image no row points at is never served
        return out

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
