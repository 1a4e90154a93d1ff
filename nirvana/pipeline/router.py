"""The router: claims route tasks' jobs, embeds, looks the cache up and sends each job its plan (or serves
an exact hit) — batched per micro-batch, one outcome per job (see :class:`Router`)."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from nirvana.cache.core import ApproximateCache, CacheRequest, LookupResult
from nirvana.config import Settings
from nirvana.pipeline.batcher import MicroBatcher
from nirvana.pipeline.plan import CachePlan, SourceState, cache_request
from nirvana.service.jobs import JobStore
from nirvana.service.service import TaskSender, image_key

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


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
        claimed = _stage(self.claims, self.claim_and_embed, job_id)
        if claimed is None:
            return "skipped"
        try:
            if claimed.error is not None:
                raise claimed.error
            plan = self._plan(claimed.job, claimed.req)
            if isinstance(plan, str):  # served by the exact tier
                return plan
            return _stage(self.commits, self.commit_plans, (job_id, plan))
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


def _stage(batcher: MicroBatcher[T, R] | None, fn: Callable[[list[T]], Sequence[R | BaseException]], item: T) -> R:
    """``item``'s answer from a stage: through its batcher when the router is batched, else ``fn([item])``
    (an exception answered for the item is raised, as the batcher does)."""
    if batcher is not None:
        return batcher.submit(item)
    out = fn([item])[0]
    if isinstance(out, BaseException):
        raise out
    return out
