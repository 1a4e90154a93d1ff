"""Routing is bounded: a job whose route task keeps failing ends ``failed`` with the reason after
``max_route_attempts``; the reaper re-sends a waiting job on a doubling lease (one outstanding message per job);
two checkpoints of one served name coexist and new jobs go to the newest live one. Real Postgres, the real
router and cache (a job row with a corrupt embedding is the poison)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from nirvana.cache.store import LatentStore
from nirvana.config import Settings
from nirvana.generation import GenerationRequest
from nirvana.pipeline.router import Router
from nirvana.service import models as served
from nirvana.service.jobs import JobStore, NewJob
from tests.cache.helpers import make_cache
from tests.service.test_plan import RecordingSender


@pytest.fixture
def store(pg_url: str) -> Iterator[JobStore]:
    s = JobStore.connect(pg_url, max_size=2)
    yield s
    s.close()


def _new_job(store: JobStore, embedding: bytes | None = None) -> str:
    jid = uuid.uuid4().hex
    store.create(NewJob(jid, "alice", GenerationRequest("a red cat", "", 1, 10, 1.0, 32, 32), "m", "m-32x32-ddim",
                        "render.m", "auto", jid))  # fmt: skip
    store.mark_enqueued([jid])
    if embedding is not None:
        with store.conn() as c:
            c.execute("UPDATE jobs SET embedding = %s WHERE id = %s", (embedding, jid))
    return jid


def test_poisoned_route_fails_after_max_attempts(pg_url: str, store: JobStore, tmp_path: Path) -> None:
    cache = make_cache(pg_url, LatentStore(str(tmp_path / "b")))
    sender = RecordingSender()
    router = Router(Settings(database_url=pg_url, max_route_attempts=3, cache_novelty_gate=False), store, cache, sender)
    try:
        jid = _new_job(store, embedding=np.ones(7, dtype=np.float32).tobytes())  # not a 384-d embedding
        errors = []
        for _ in range(3):  # each delivery of the route task (Celery retry or reaper re-send) is one attempt
            with pytest.raises(ValueError) as e:
                router.route(jid)
            errors.append(str(e.value))
        assert store.get(jid)["status"] == "routing" and store.get(jid)["route_attempts"] == 3
        assert router.route(jid) == "skipped"  # the fourth delivery ends it
        row = store.get(jid)
        assert row["status"] == "failed" and row["error"].startswith("route attempts exhausted (3): ValueError")
        assert errors[-1] in row["error"] and sender.sent == []
        assert router.route(jid) == "skipped"  # terminal: later duplicates change nothing
    finally:
        cache.close()


def test_reaper_resends_on_a_doubling_lease(store: JobStore) -> None:
    jid = _new_job(store)
    with store.conn() as c:  # the route message was sent long ago and is still not consumed (a backlog)
        c.execute("UPDATE jobs SET updated_at = clock_timestamp() - interval '10 s' WHERE id = %s", (jid,))
    requeue = 0.4
    sends = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.3:
        found = store.reap(stale_s=60, requeue_s=requeue, max_attempts=3)
        if any(r["id"] == jid for r in found["route"]):
            sends.append(time.monotonic() - t0)
        time.sleep(0.05)
    # at once (lease over), then after 2 × 0.4 s, then after 4 × 0.4 s: not every 0.4 s (which would be 9)
    assert len(sends) == 3, sends
    assert sends[1] - sends[0] == pytest.approx(0.8, abs=0.25) and sends[2] - sends[1] == pytest.approx(1.6, abs=0.3)
    assert store.get(jid)["resends"] == 3


def test_two_checkpoints_of_a_name_coexist(store: JobStore) -> None:
    name = f"model-{uuid.uuid4().hex[:6]}"
    old = served.ServedModel(name, "x", "ckpt-old", "ddim", 32, 32, 8, 1.0, f"render.{name}-old")
    new = served.ServedModel(name, "x", "ckpt-new", "ddim", 32, 32, 8, 1.0, f"render.{name}-new")
    served.register(store.pool, old)
    time.sleep(0.01)
    served.register(store.pool, new)
    for _ in range(3):  # rolling deploy: both sets of workers keep heart-beating
        served.register(store.pool, old)
        served.register(store.pool, new)
        rows = [r for r in served.list_models(store.pool) if r[0].name == name]
        assert {m.checkpoint_id for m, _ in rows} == {"ckpt-old", "ckpt-new"}
        assert served.current(rows)[name].queue == new.queue  # never flaps back to the old checkpoint
    with store.conn() as c:  # the new checkpoint's workers are gone: jobs go where a worker is alive
        c.execute("UPDATE served_models SET heartbeat_at = now() - interval '5 min' WHERE checkpoint_id = 'ckpt-new'")
    rows = [r for r in served.list_models(store.pool) if r[0].name == name]
    assert served.current(rows)[name].queue == old.queue


def test_router_embeds_the_jobs_in_flight_together(pg_url: str, store: JobStore, tmp_path: Path) -> None:
    """Route tasks running at once (the router worker's threads) share embedding calls; each job still gets its
    own outcome, and one job's prompt embedding equals the one-at-a-time embedding."""
    import threading

    from nirvana.cache.core import ApproximateCache
    from nirvana.cache.embedder import MiniLMEmbedder
    from nirvana.cache.policy import KPolicy

    cache = ApproximateCache(pg_url, LatentStore(str(tmp_path / "b")), MiniLMEmbedder(), KPolicy.paper(), pool_size=4)
    sender = RecordingSender()
    settings = Settings(database_url=pg_url, route_max_batch=8, route_max_wait_ms=100, cache_novelty_gate=False)
    router = Router(settings, store, cache, sender, batched=True)
    try:
        jobs = [_new_job(store) for _ in range(8)]
        with store.conn() as c:  # distinct prompts, no embeddings yet: the router computes them
            for i, jid in enumerate(jobs):
                c.execute("UPDATE jobs SET prompt = %s WHERE id = %s", (f"a red cat number {i}", jid))
        out: dict[str, str] = {}
        threads = [threading.Thread(target=lambda j=j: out.__setitem__(j, router.route(j))) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert set(out.values()) == {"miss"} and len(out) == 8
        for stage in (router.claims, router.commits):  # claim + embed, then plan + send: shared by the jobs
            assert stage is not None and stage.items == 8 and stage.batches < 8
        assert sorted(j for _, j, _ in sender.sent) == sorted(jobs)  # one render message per job
        row = store.get(jobs[3])
        stored = np.frombuffer(bytes(row["embedding"]), dtype=np.float32)
        assert np.allclose(stored, cache.embed(["a red cat number 3"])[0], atol=1e-5)
    finally:
        router.close()
        cache.close()


def test_one_jobs_failure_in_a_route_batch_is_its_own(pg_url: str, store: JobStore, tmp_path: Path) -> None:
    """A batched router whose render message fails for one job: that job's route attempt raises (its plan is
    written, so the reaper's lease re-sends its render message); the other jobs of the same batch are routed
    and sent."""
    import threading

    from nirvana.cache.core import ApproximateCache
    from nirvana.cache.embedder import MiniLMEmbedder
    from nirvana.cache.policy import KPolicy

    jobs = [_new_job(store) for _ in range(6)]
    bad = jobs[2]

    class FlakySender(RecordingSender):
        def send_render(self, job_id: str, queue: str, attempt: int) -> None:
            if job_id == bad:
                raise ConnectionError("broker went away")
            super().send_render(job_id, queue, attempt)

    cache = ApproximateCache(pg_url, LatentStore(str(tmp_path / "b")), MiniLMEmbedder(), KPolicy.paper(), pool_size=4)
    sender = FlakySender()
    settings = Settings(database_url=pg_url, route_max_batch=6, route_max_wait_ms=200, cache_novelty_gate=False)
    router = Router(settings, store, cache, sender, batched=True)
    out: dict[str, object] = {}

    def run(j: str) -> None:
        try:
            out[j] = router.route(j)
        except Exception as e:
            out[j] = e

    try:
        threads = [threading.Thread(target=run, args=(j,)) for j in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert router.commits is not None and router.commits.batches < 6  # they did share a batch
        assert isinstance(out[bad], ConnectionError)
        assert all(out[j] == "miss" for j in jobs if j != bad)
        assert sorted(j for _, j, _ in sender.sent) == sorted(j for j in jobs if j != bad)
        assert all(store.get(j)["status"] == "routed" for j in jobs)
    finally:
        router.close()
        cache.close()


def test_router_remembers_recent_prompt_embeddings(pg_url: str, store: JobStore, tmp_path: Path) -> None:
    """A re-rolled prompt (same text, new seed) is not embedded again while it is among the
    ``route_embed_memo`` most recent prompts; the job gets the same embedding either way."""
    from nirvana.cache.core import ApproximateCache
    from nirvana.cache.embedder import MiniLMEmbedder
    from nirvana.cache.policy import KPolicy

    cache = ApproximateCache(pg_url, LatentStore(str(tmp_path / "b")), MiniLMEmbedder(), KPolicy.paper(), pool_size=4)
    calls: list[list[str]] = []
    real = cache.embed
    cache.embed = lambda prompts: calls.append(list(prompts)) or real(prompts)  # type: ignore[method-assign]
    settings = Settings(database_url=pg_url, route_embed_memo=1, cache_novelty_gate=False)
    router = Router(settings, store, cache, RecordingSender())
    try:
        jobs = []
        for prompt in ["a red fox", "a red fox", "a castle", "a red fox"]:
            jid = _new_job(store)
            with store.conn() as c:
                c.execute("UPDATE jobs SET prompt = %s WHERE id = %s", (prompt, jid))
            assert router.route(jid) == "miss"
            jobs.append(jid)
        # The second fox was remembered; the memo (1 prompt) forgot it for the castle.
        assert calls == [["a red fox"], ["a castle"], ["a red fox"]]
        embs = [np.frombuffer(bytes(store.get(j)["embedding"]), dtype=np.float32) for j in jobs]
        assert np.array_equal(embs[0], embs[1]) and np.allclose(embs[0], embs[3], atol=1e-6)
        assert router.embed(["a boat", "a boat"]).keys() == {"a boat"} and calls[-1] == ["a boat"]  # once
    finally:
        cache.close()
