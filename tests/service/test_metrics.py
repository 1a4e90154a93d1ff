"""The Prometheus collector against a real jobs table: tiers, steps saved and the novelty gate's shadow verdicts."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from nirvana.generation import GenerationRequest
from nirvana.pipeline.plan import CachePlan, SourceState
from nirvana.service.jobs import JobStore, NewJob
from nirvana.service.metrics import JobsCollector


def _finished_job(store: JobStore, tier: str, k: int, gate_novel: bool | None, steps: int = 50) -> None:
    jid = uuid.uuid4().hex
    store.create(NewJob(jid, "alice", GenerationRequest(f"prompt {jid}", "", 1, steps, 7.0, 32, 32), "bundled",
                        "m-32x32-ddim", "render.bundled", "auto", jid))  # fmt: skip
    assert store.claim_route(jid) is not None
    src = SourceState(k, k, 0.9, None, None) if tier == "approximate" else None
    assert store.set_plan(jid, CachePlan(tier, source=src, gate_novel=gate_novel)) is not None
    assert store.claim_render(jid, 0, "w1") is not None
    assert store.finish(jid, 1, f"file:///{jid}.png", 10, k, steps - k, 1.0)


def _samples(collector: JobsCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in collector.collect():
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_gate_verdicts_are_counted_by_tier(new_database: Callable[..., str]) -> None:
    store = JobStore.connect(new_database(), max_size=2)
    try:
        _finished_job(store, "approximate", 20, gate_novel=True)  # a hit enforcing the gate would have lost
        _finished_job(store, "approximate", 10, gate_novel=False)
        _finished_job(store, "miss", 0, gate_novel=True)
        _finished_job(store, "miss", 0, gate_novel=None)  # no gate model yet
        _finished_job(store, "miss", 0, gate_novel=None)
        with store.conn() as c:  # a job rendered with the cache off has no tier: counted as a miss, not twice
            c.execute("UPDATE jobs SET tier = NULL WHERE id = (SELECT id FROM jobs WHERE gate_novel IS NULL LIMIT 1)")
        m: dict[Any, float] = _samples(JobsCollector(store.pool))
    finally:
        store.close()
    assert m[("nirvana_cache_hits_total", (("tier", "approximate"),))] == 2
    assert m[("nirvana_cache_hits_total", (("tier", "miss"),))] == 3
    assert m[("nirvana_cache_hits_total", (("tier", "exact"),))] == 0
    assert m[("nirvana_steps_saved_total", ())] == 30
    assert m[("nirvana_gate_novel_total", (("tier", "approximate"),))] == 1
    assert m[("nirvana_gate_novel_total", (("tier", "miss"),))] == 1
    assert m[("nirvana_gate_novel_total", (("tier", "exact"),))] == 0
    assert m[("nirvana_gate_novel_steps_saved_total", ())] == 20


def test_queue_depth_workers_and_backlog(pg_url: str) -> None:
    """The autoscaling signal counts what Celery's list length misses (prefetched and running jobs) and turns the
    render backlog into seconds at the queue's recent pace."""
    from nirvana.service.liveness import beat

    store = JobStore.connect(pg_url, max_size=1)
    q = f"render.q{uuid.uuid4().hex[:6]}"
    try:

        def job(status: str, steps: int = 50, k: int = 0, progress: int = 0) -> None:
            jid = uuid.uuid4().hex
            store.create(NewJob(jid, "bob", GenerationRequest(f"p {jid}", "", 1, steps, 7.0, 32, 32), "bundled",
                                "m-32x32-ddim", q, "auto", jid))  # fmt: skip
            with store.conn() as c:
                c.execute(
                    "UPDATE jobs SET status = %s, k = %s, progress_step = %s, engine_s = %s, steps_run = %s, "
                    "finished_at = CASE WHEN %s = 'done' THEN now() END WHERE id = %s",
                    (status, k, progress, 10.0 if status == "done" else None, steps if status == "done" else None,
                     status, jid),
                )  # fmt: skip

        job("done")  # recent pace: 10 s / 50 steps = 0.2 s per step per job
        job("routed")  # in the list or prefetched: 50 steps left
        job("routed", k=20)  # a hit: 30 steps left
        job("rendering", progress=40)  # active: 10 steps left
        beat(store.pool, f"render@{q}", "render", q)
        samples = {
            (s.name, s.labels.get("queue")): s.value
            for fam in JobsCollector(store.pool, jobs_per_render_worker=4).collect()
            for s in fam.samples
        }
        assert samples[("nirvana_queue_depth", q)] == 3
        assert samples[("nirvana_queue_workers", q)] == 1
        assert samples[("nirvana_render_backlog_seconds", q)] == pytest.approx(90 * 0.2 / 4)
    finally:
        store.close()
