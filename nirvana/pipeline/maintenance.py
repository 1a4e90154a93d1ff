"""Maintenance: the beat tasks on the ``maintenance`` queue (see :class:`Maintenance`)."""

from __future__ import annotations

import logging
import time
from typing import Any

from nirvana.cache.core import ApproximateCache
from nirvana.config import Settings
from nirvana.service.jobs import JobStore
from nirvana.service.liveness import prune
from nirvana.service.service import TaskSender

log = logging.getLogger(__name__)


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
