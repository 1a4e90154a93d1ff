"""Concurrency on the real stack: several processes hit, record (with redeliveries) and evict the same entries
— counters exact, no errors; and the eviction-during-read race made deterministic with a barrier."""

from __future__ import annotations

import multiprocessing as mp
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from nirvana.cache.core import ApproximateCache, Namespace
from nirvana.cache.eviction import PaperLCBFU
from nirvana.cache.store import BlobMissing, LatentStore
from tests.cache.helpers import make_cache, request, states, unit

NS = Namespace("m-32x32-ddim", "t")
N_PROMPTS = 8
WORKERS = 4
JOBS_PER_WORKER = 30
SHARED_JOBS = 8


def _cache(url: str, blob_dir: str) -> ApproximateCache:
    # Hits are not admitted as new entries, so the set of entries only shrinks (by eviction).
    return make_cache(url, LatentStore(blob_dir), eviction=PaperLCBFU(admit_hits=False), budget_bytes=10**12)


def _worker(url: str, blob_dir: str, wid: int, plan: list[tuple[str, list[float], int]], budgets: list[int],
            out: Any) -> None:  # fmt: skip
    outcomes: list[tuple[str, bool, bool, int | None]] = []
    errors: list[str] = []
    loads = 0
    try:
        cache = _cache(url, blob_dir)
        for i, (job, emb, seed) in enumerate(plan):
            try:
                req = request(np.asarray(emb, np.float32), NS, prompt=f"q-{job}", seed=seed)
                hit = cache.lookup(req)
                if hit.tier == "approximate":
                    loads += cache.load_state(hit) is not None
                for _attempt in range(2):  # a redelivered job
                    res = cache.record(job, req, [], None, hit)
                    outcomes.append((job, res["recorded"], res["hit_counted"], hit.state_id))
                if wid < 2 and i % 3 == 0:  # two evictors with a shrinking budget
                    cache.budget_bytes = budgets[min(i // 3, len(budgets) - 1)]
                    cache.evict_to_budget()
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
        cache.close()
    except Exception as e:  # pragma: no cover
        errors.append(f"setup {type(e).__name__}: {e}")
    out.put((wid, outcomes, errors, loads))


def test_processes_hit_record_and_evict_the_same_entries(new_database: Callable[..., str], tmp_path: Path) -> None:
    url = new_database()
    blob_dir = str(tmp_path / "blobs")
    rng = np.random.default_rng(0)
    embs = unit(rng, N_PROMPTS)
    with _cache(url, blob_dir) as cache:
        for p in range(N_PROMPTS):
            req = request(embs[p], NS, prompt=f"p{p}", seed=p)
            cache.record(f"seed-{p}", req, states(NS.model_key, [5, 10, 15, 20, 25], seed=p), b"png", None)
        total = cache.stats()["bytes"]
    budgets = [int(total * f) for f in np.linspace(0.9, 0.3, 10)]
    shared = [(f"shared-{j}", embs[j % N_PROMPTS].tolist(), 1000 + j) for j in range(SHARED_JOBS)]
    plans = []
    for w in range(WORKERS):
        own = [(f"w{w}-{j}", embs[int(rng.integers(0, 3))].tolist(), 100 + j) for j in range(JOBS_PER_WORKER)]
        plan = own + shared
        rng.shuffle(plan)  # type: ignore[arg-type]
        plans.append(plan)
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(url, blob_dir, w, plans[w], budgets, q)) for w in range(WORKERS)]
    for p in procs:
        p.start()
    results = [q.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    errors = [e for _, _, errs, _ in results for e in errs]
    assert errors == []
    outcomes = [o for _, outs, _, _ in results for o in outs]
    recorded = Counter(job for job, rec, _, _ in outcomes if rec)
    all_jobs = {job for job, _, _, _ in outcomes}
    assert all(recorded[j] == 1 for j in all_jobs), "every job is recorded exactly once"
    counted = Counter(sid for _, _, hc, sid in outcomes if hc)
    assert sum(counted.values()) > 0 and sum(r[3] for r in results) > 0
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT count(*) FROM cache_jobs").fetchone() == (len(all_jobs) + N_PROMPTS,)
        db_hits = dict(conn.execute("SELECT id, hits FROM cache_states").fetchall())
        db_bytes = conn.execute("SELECT coalesce(sum(bytes), 0) FROM cache_blobs").fetchone()
    # Counters are exact: each surviving state has exactly the hits whose record reported them counted.
    for sid, hits in db_hits.items():
        assert hits == counted.get(sid, 0)
    # Evictions ran during the hits: some counted states are gone, some survive.
    assert len(db_hits) < N_PROMPTS * 5 and any(counted.get(sid) for sid in db_hits)
    assert db_bytes is not None and db_bytes[0] < total
    with _cache(url, blob_dir) as cache:
        cache.budget_bytes = budgets[-1]
        cache.evict_to_budget()
        assert cache.stats()["bytes"] <= budgets[-1]
        assert set(cache.store.iter_objects(0)) == cache.index.known_uris()


def test_eviction_during_read_is_a_miss(new_database: Callable[..., str], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Worker A has read the state's row and is about to fetch its object when B evicts it (rows, then
    objects): A gets a miss (None), never an exception. The interleaving is forced with events in a patched
    ``LatentStore.get_bytes``."""
    url = new_database()
    with _cache(url, str(tmp_path / "blobs")) as cache:
        e = unit(np.random.default_rng(1))
        cache.record("seed", request(e, NS), states(NS.model_key, [5, 25]), b"png", None)
        hit = cache.lookup(request(e, NS, seed=2))
        assert hit.tier == "approximate" and hit.k == 25
        row = cache.index.state_row(hit.state_id or -1)
        assert row is not None

        row_read, evicted = threading.Event(), threading.Event()
        real_get = LatentStore.get_bytes
        seen: list[Exception] = []

        def get_bytes(self: LatentStore, uri: str, expected_checksum: str | None = None) -> bytes:
            row_read.set()  # load_state has the row and is about to read the object
            assert evicted.wait(30)
            try:
                return real_get(self, uri, expected_checksum)
            except BlobMissing as err:
                seen.append(err)
                raise

        monkeypatch.setattr(LatentStore, "get_bytes", get_bytes)
        result: list[Any] = []
        reader = threading.Thread(target=lambda: result.append(cache.load_state(hit)))
        reader.start()
        assert row_read.wait(30)
        with _cache(url, str(tmp_path / "blobs")) as evictor:
            evictor.budget_bytes = 0
            res = evictor.evict_to_budget()
        assert res["states"] == 2 and res["objects_deleted"] == 3  # two states + the image
        evicted.set()
        reader.join(30)
        assert result == [None] and len(seen) == 1  # the object was gone: a miss, not an error
        monkeypatch.setattr(LatentStore, "get_bytes", real_get)
        # Evicted before the row is read: also a miss.
        assert cache.load_state(hit) is None
        # Counting a hit on an evicted state is a no-op, not an error; the job is still recorded once.
        out = cache.record("late", request(e, NS, seed=2, prompt="late"), [], None, hit)
        assert out["recorded"] and not out["hit_counted"]
