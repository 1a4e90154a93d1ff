"""Maintenance tasks on real Postgres and a file store: the orphan sweep covers the store a slice per run (its
cursor in Postgres), referenced and young objects survive; retention forgets old finished jobs' images and rows,
bounded per run."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nirvana.cache.store import LatentStore
from nirvana.config import Settings
from nirvana.generation import GenerationRequest
from nirvana.pipeline.maintenance import Maintenance
from nirvana.service.errors import NotFound
from nirvana.service.jobs import JobStore, NewJob
from tests.cache.helpers import make_cache, request, states, unit
from tests.service.test_plan import RecordingSender


@pytest.fixture
def env(pg_url: str, tmp_path: Path) -> Iterator[dict[str, Any]]:
    store = JobStore.connect(pg_url, max_size=2)
    cache = make_cache(pg_url, LatentStore(str(tmp_path / "blobs")))
    yield {"store": store, "cache": cache, "root": tmp_path / "blobs"}
    cache.close()
    store.close()


def _age(path: Path, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def _orphan(root: Path, shard: str) -> Path:
    p = root / "states" / "ns-orphans" / shard / uuid.uuid4().hex / "k0005.nvl"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"orphan")
    _age(p, 7200)
    return p


def test_sweep_covers_the_store_a_slice_per_run(env: dict[str, Any]) -> None:
    import numpy as np

    from nirvana.cache.core import Namespace

    store, cache, root = env["store"], env["cache"], env["root"]
    ns = Namespace("m-32x32-ddim", f"t-{uuid.uuid4().hex[:6]}")
    req = request(unit(np.random.default_rng(0)), ns)
    cache.record(f"job-{uuid.uuid4().hex}", req, states(ns.model_key, [5, 10]), None, None)
    kept = [p for p in root.rglob("*.nvl")]
    assert len(kept) == 2
    for p in kept:
        _age(p, 7200)  # old enough, but referenced
    orphans = {s: _orphan(root, s) for s in ("00", "10", "ff")}
    young = root / "states" / "ns-orphans" / "00" / "young" / "k0005.nvl"
    young.parent.mkdir(parents=True)
    young.write_bytes(b"in flight")  # its row may still come: spared
    m = Maintenance(Settings(sweep_shards_per_run=16), store, cache, RecordingSender())
    store.set_state(Maintenance.SWEEP_CURSOR, "0")
    first = m.sweep()
    assert first["shards"] == "00..0f" and first["orphans_deleted"] == 1
    assert not orphans["00"].exists() and orphans["10"].exists() and orphans["ff"].exists()
    assert young.exists() and all(p.exists() for p in kept)
    assert store.get_state(Maintenance.SWEEP_CURSOR) == "16"
    results = [m.sweep() for _ in range(15)]  # the other 240 shards, 16 at a time
    assert sum(r["orphans_deleted"] for r in results) == 2 and results[-1]["shards"] == "f0..ff"
    assert not any(p.exists() for p in orphans.values()) and all(p.exists() for p in kept)
    assert store.get_state(Maintenance.SWEEP_CURSOR) == "0"  # wrapped around


def _finished_job(store: JobStore, root: Path, days_ago: float) -> tuple[str, Path]:
    jid = uuid.uuid4().hex
    store.create(NewJob(jid, "alice", GenerationRequest("a red cat", "", 1, 10, 1.0, 32, 32), "m", "m-32x32-ddim",
                        "render.m", "auto", jid))  # fmt: skip
    img = root / "jobs" / f"{jid}.png"
    img.parent.mkdir(parents=True, exist_ok=True)
    img.write_bytes(b"png")
    with store.conn() as c:
        c.execute(
            "UPDATE jobs SET status = 'done', image_uri = %s, "
            "finished_at = now() - make_interval(secs => %s) WHERE id = %s",
            (f"file://{img}", days_ago * 86400, jid),
        )
    return jid, img


def test_retention_forgets_old_images_then_old_rows(env: dict[str, Any]) -> None:
    store, cache, root = env["store"], env["cache"], env["root"]
    recent = _finished_job(store, root, 1)
    old_image = [_finished_job(store, root, 40) for _ in range(3)]
    old_row = _finished_job(store, root, 100)
    s = Settings(retention_images_s=30 * 86400, retention_jobs_s=90 * 86400, retention_batch=2)
    m = Maintenance(s, store, cache, RecordingSender())
    out = m.retention()
    assert out["job_images"] == 2 and out["job_rows"] == 1  # bounded per run
    out = m.retention()
    assert out["job_images"] == 2 and out["job_rows"] == 0  # the other two 40-day-old images
    assert m.retention() == {"ledger_rows": 0, "job_images": 0, "job_rows": 0}
    for jid, img in old_image:
        row = store.get(jid)
        assert row["status"] == "done" and row["image_uri"] is None and not img.exists()
    with pytest.raises(NotFound):
        store.get(old_row[0])
    assert not old_row[1].exists()
    assert store.get(recent[0])["image_uri"] and recent[1].exists()
    keep = Maintenance(Settings(retention_images_s=0, retention_jobs_s=0, retention_ledger_s=0), store, cache, None)  # type: ignore[arg-type]
    assert keep.retention() == {"ledger_rows": 0, "job_images": 0, "job_rows": 0}


@pytest.mark.parametrize("duty", [0.5, 1.0])
def test_eviction_runs_in_paced_batches(env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, duty: float) -> None:
    """Maintenance.evict removes ``evict_batch`` entries per transaction and, below duty 1, sleeps after each
    batch for busy × (1 − duty) / duty (so a large eviction leaves the CPU to routing); all go in the end."""
    import numpy as np

    import nirvana.pipeline.maintenance as pipeline
    from nirvana.cache.core import Namespace

    store, cache = env["store"], env["cache"]
    ns = Namespace("m-32x32-ddim", f"t-{uuid.uuid4().hex[:6]}")
    rng = np.random.default_rng(1)
    for i in range(6):
        req = request(unit(rng), ns, prompt=f"prompt {i}", seed=i)
        cache.record(f"job-{uuid.uuid4().hex}", req, states(ns.model_key, [5, 10], seed=i), None, None)
    sleeps: list[float] = []
    monkeypatch.setattr(pipeline.time, "sleep", sleeps.append)
    cache.budget_bytes = 0
    res = Maintenance(Settings(evict_batch=2, evict_duty=duty), store, cache, RecordingSender()).evict()
    assert res["states"] >= 12 and cache.stats()["states"] == 0  # (with what earlier tests left)
    assert res["wall_s"] >= 0
    if duty < 1:
        assert len(sleeps) >= 6 and all(s > 0 for s in sleeps)  # one pause per batch of at most 2 entries
    else:
        assert sleeps == []
