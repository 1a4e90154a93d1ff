"""The exact tier's image cap (``ours``): images are evicted on their own, least recently stored or served first,
down to ``image_budget_fraction`` of the budget, while their prompts and states stay; the SQL phase 0 and the
in-memory ``evict_images`` agree; other policies keep images with their prompts; concurrent evictors and readers
are safe; the setting is wired from Settings to the cache and the trace benchmark."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pytest

from nirvana.cache.core import ApproximateCache, Namespace
from nirvana.cache.eviction import DEFAULT_IMAGE_BUDGET_FRACTION, ImageMeta, OursPolicy, make_policy
from nirvana.cache.index import CacheIndex
from nirvana.cache.store import LatentStore
from tests.cache.helpers import make_cache, request, states, unit

KS = [5, 10, 15, 20, 25]
IMAGE_BYTES = 4000


def _png(i: int) -> bytes:
    return np.random.default_rng(1000 + i).bytes(IMAGE_BYTES)  # incompressible, the size stored is known


def _image_bytes(url: str) -> int:
    with psycopg.connect(url) as conn:
        r = conn.execute(
            "SELECT coalesce(sum(b.bytes), 0) FROM cache_prompts p JOIN cache_blobs b ON b.id = p.image_blob_id"
        ).fetchone()
    assert r is not None
    return int(r[0])


# ---------------------------------------------------------------------- pure
def test_evict_images_in_memory() -> None:
    p = OursPolicy(image_budget_fraction=0.25)
    imgs = [ImageMeta(1, 100, 5.0), ImageMeta(2, 100, 1.0), ImageMeta(3, 100, 3.0), ImageMeta(4, 100, 1.0),
            ImageMeta(5, 100, 9.0)]  # fmt: skip
    assert p.image_cap(1000) == 250
    # 500 B of images, cap 250: the three least recently used go (ties by prompt id), the rest fit.
    assert p.evict_images(imgs, 1000) == [2, 4, 3]
    assert p.evict_images(imgs, 2000) == []  # under the cap
    assert p.evict_images(imgs, 0) == [2, 4, 3, 1, 5]  # cap 0: every image
    assert OursPolicy(image_budget_fraction=None).evict_images(imgs, 0) == []
    assert make_policy("ours").image_budget_fraction == DEFAULT_IMAGE_BUDGET_FRACTION == 0.1
    for name in ("paper", "lru", "lfu", "fifo"):  # no exact-tier cap: images leave with their prompts
        pol = make_policy(name, image_budget_fraction=0.5)
        assert pol.image_budget_fraction is None and pol.image_cap(1000) is None and pol.evict_images(imgs, 0) == []
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="image_budget_fraction"):
            make_policy("ours", image_budget_fraction=bad)


def test_setting_is_wired_to_cache_and_bench(monkeypatch: pytest.MonkeyPatch, pg_url: str, tmp_path: Path) -> None:
    from pydantic import ValidationError

    from nirvana.bench.trace import default_specs, run_trace_bench
    from nirvana.cache.embedder import MiniLMEmbedder
    from nirvana.config import Settings

    assert Settings().cache_image_budget_fraction == DEFAULT_IMAGE_BUDGET_FRACTION
    monkeypatch.setenv("NIRVANA_CACHE_IMAGE_BUDGET_FRACTION", "0.3")
    s = Settings(database_url=pg_url, storage_url=str(tmp_path / "blobs"))
    assert s.cache_image_budget_fraction == 0.3
    with ApproximateCache.from_settings(s, embedder=MiniLMEmbedder()) as cache:
        assert cache.eviction.name == "ours" and cache.eviction.image_budget_fraction == 0.3
    monkeypatch.setenv("NIRVANA_CACHE_IMAGE_BUDGET_FRACTION", "1.5")
    with pytest.raises(ValidationError):
        Settings()
    # The trace bench builds ours with the same default; ours_nocap is the uncapped ablation.
    specs = {sp.name: sp for sp in default_specs(Path("/nonexistent.json"))}
    assert specs["ours"].eviction_policy().image_budget_fraction == DEFAULT_IMAGE_BUDGET_FRACTION
    assert specs["ours_nocap"].eviction_policy().image_budget_fraction is None
    assert specs["ours_nocap"].exact_tier and specs["lru"].eviction_policy().image_budget_fraction is None
    other = {sp.name: sp for sp in default_specs(Path("/nonexistent.json"), 0.25)}
    assert other["ours"].eviction_policy().image_budget_fraction == 0.25
    with pytest.raises(ValueError, match="image_budget_fraction"):
        run_trace_bench([], image_budget_fraction=2.0)


# ---------------------------------------------------------------------- on PostgreSQL
@pytest.fixture
def ns() -> Namespace:
    return Namespace("m-32x32-ddim", f"t-{uuid.uuid4().hex[:8]}")


def _seed(cache: ApproximateCache, ns: Namespace, embs: np.ndarray, now: list[float] | None = None) -> list[Any]:
    """One prompt per embedding (at clock t = i if ``now`` is the cache's clock), each with five states and an
    image; returns the requests."""
    reqs = []
    for i, e in enumerate(embs):
        if now is not None:
            now[0] = float(i)
        req = request(e, ns, prompt=f"p{i}", seed=i)
        out = cache.record(f"job-{ns.tenant}-{i}", req, states(ns.model_key, KS, seed=i), _png(i), cache.lookup(req))
        assert out["recorded"] and out["states"] == 5
        reqs.append(req)
    return reqs


def test_cap_drops_least_recently_used_images_first(new_database: Callable[..., str], tmp_path: Path,
                                                    ns: Namespace) -> None:  # fmt: skip
    url = new_database()
    store = LatentStore(str(tmp_path / "blobs"))
    now = [0.0]
    with make_cache(url, store, eviction="ours", clock=lambda: now[0]) as cache:
        assert cache.eviction.image_budget_fraction == DEFAULT_IMAGE_BUDGET_FRACTION
        reqs = _seed(cache, ns, unit(np.random.default_rng(3), 6), now)
        # Prompt 0 is served from the exact tier at t = 10: its image becomes the most recently used.
        now[0] = 10.0
        hit0 = cache.lookup(reqs[0])
        assert hit0.tier == "exact"
        cache.record("exact-0", reqs[0], [], None, hit0)
        stale = cache.lookup(reqs[1])  # an exact result taken before the drop
        assert stale.tier == "exact"
        before = cache.stats()
        assert before["image_bytes"] == 6 * IMAGE_BYTES and before["states"] == 30
        cache.budget_bytes = before["bytes"] - 1  # just over budget
        cache.eviction.image_budget_fraction = 2.5 * IMAGE_BYTES / cache.budget_bytes  # two images fit the cap
        cap = cache.eviction.image_cap(cache.budget_bytes)
        assert cap is not None and 2 * IMAGE_BYTES <= cap < 3 * IMAGE_BYTES
        res = cache.evict_to_budget()
        after = cache.stats()
        # Four images went (more than the 1 B overflow: down to the cap), no state and no prompt.
        assert res["images"] == 4 and res["states"] == 0 and res["prompts"] == 0
        assert res["bytes"] == 4 * IMAGE_BYTES == before["bytes"] - after["bytes"]
        assert res["objects_deleted"] == 4 and set(store.iter_objects(0)) == cache.index.known_uris()
        assert after["image_bytes"] == _image_bytes(url) == 2 * IMAGE_BYTES <= cap
        assert after["prompts"] == 6 and after["states"] == 30
        with psycopg.connect(url) as conn:
            kept = {r[0] for r in conn.execute("SELECT prompt FROM cache_prompts WHERE image_blob_id IS NOT NULL")}
        assert kept == {"p0", "p5"}  # the exact hit's and the newest; p1..p4 (least recently used) went
        # Dropped image: an identical request is no exact hit, but its own states serve it (s = 1 → K = 25).
        again = cache.lookup(reqs[1])
        assert again.tier == "approximate" and again.k == 25 and again.source_prompt_id == stale.source_prompt_id
        assert cache.load_state(again) is not None
        assert cache.load_image(stale) is None  # the result read before the drop: a miss, not an error
        hit0 = cache.lookup(reqs[0])
        assert hit0.tier == "exact" and cache.load_image(hit0) == _png(0)
        # Under budget nothing happens, even with the images above a lower cap.
        cache.eviction.image_budget_fraction = 0.0
        assert cache.evict_to_budget()["bytes"] == 0
        # Budget 0 (cap 0): the last images go first, then every state and prompt.
        cache.budget_bytes = 0
        res = cache.evict_to_budget()
        assert res["images"] == 2 and cache.stats()["bytes"] == 0 and cache.stats()["prompts"] == 0
        assert list(store.iter_objects(0)) == []


def test_other_policies_keep_images_with_prompts(new_database: Callable[..., str], tmp_path: Path,
                                                 ns: Namespace) -> None:  # fmt: skip
    url = new_database()
    with make_cache(url, LatentStore(str(tmp_path / "blobs")), eviction="lru", image_budget_fraction=0.0) as cache:
        assert cache.eviction.image_budget_fraction is None
        _seed(cache, ns, unit(np.random.default_rng(4), 4))
        before = cache.stats()
        cache.budget_bytes = before["bytes"] - 1
        res = cache.evict_to_budget()
        after = cache.stats()
        assert res["images"] == 0 and res["states"] >= 1
        assert after["image_bytes"] == before["image_bytes"]  # lru evicted a state, no image


def _load(conn: psycopg.Connection[Any], images: list[ImageMeta], state_bytes: int) -> dict[int, int]:
    """A prompt per image (with one state of ``state_bytes``), inserted in prompt-id order; meta id → row id."""
    from pgvector.psycopg import register_vector

    register_vector(conn)
    emb = np.ones(384, dtype=np.float32) / np.sqrt(384)
    ids: dict[int, int] = {}
    for img in sorted(images, key=lambda m: m.prompt_id):
        b = conn.execute(
            "INSERT INTO cache_blobs (kind, uri, codec, bytes, model_key, tenant) "
            "VALUES ('image', NULL, 'virtual', %s, 'm', 't') RETURNING id",
            (img.bytes,),
        ).fetchone()
        assert b is not None
        r = conn.execute(
            "INSERT INTO cache_prompts (model_key, tenant, embed_space, dim, embedding, prompt, seed, steps, "
            "guidance, width, height, exact_key, image_blob_id, created_ts, last_used_ts, image_used_ts) VALUES "
            "('m', 't', 'e', 384, %s, 'p', 0, 50, 7, 32, 32, %s, %s, 0, 0, %s) RETURNING id",
            (emb, uuid.uuid4().hex, b[0], img.used_ts),
        ).fetchone()
        assert r is not None
        ids[img.prompt_id] = int(r[0])
        s = conn.execute(
            "INSERT INTO cache_blobs (kind, uri, codec, bytes, model_key, tenant) "
            "VALUES ('state', NULL, 'virtual', %s, 'm', 't') RETURNING id",
            (state_bytes,),
        ).fetchone()
        assert s is not None
        conn.execute(
            "INSERT INTO cache_states (prompt_id, blob_id, k, num_steps, timestep, scheduler_family, shape, "
            "dhits, dhits_ts, created_ts, last_used_ts) VALUES (%s, %s, 5, 50, 0, 'virtual', '{}', 1, 0, 0, 0)",
            (r[0], s[0]),
        )
    conn.commit()
    return ids


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3])
def test_sql_phase0_matches_evict_images(new_database: Callable[..., str], fraction: float) -> None:
    from psycopg_pool import ConnectionPool

    rng = np.random.default_rng(int(fraction * 100))
    # Ties on used_ts are frequent (rounded), so the prompt-id tie-break is exercised.
    images = [ImageMeta(i + 1, int(rng.integers(100, 400)), float(rng.integers(0, 20))) for i in range(40)]
    pol = make_policy("ours", image_budget_fraction=fraction)
    state_bytes = 50
    total = sum(i.bytes for i in images) + state_bytes * len(images)
    budget = total - 1
    expected = pol.evict_images(images, budget)
    url = new_database()
    with psycopg.connect(url) as conn:
        ids = _load(conn, images, state_bytes)
    with ConnectionPool(url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        # Small batches: phase 0 continues to the cap after the overflow is gone.
        res = CacheIndex(pool).evict_to_budget(pol, budget, 100.0, batch=3)
        with pool.connection() as conn:
            left = {int(r[0]) for r in conn.execute("SELECT id FROM cache_prompts WHERE image_blob_id IS NOT NULL")}
            n_states = conn.execute("SELECT count(*) FROM cache_states").fetchone()
    dropped = {m for m, rid in ids.items() if rid not in left}
    assert dropped == set(expected) and res["images"] == len(expected) and res["states"] == 0
    assert sum(i.bytes for i in images if i.prompt_id not in dropped) <= (pol.image_cap(budget) or 0)
    assert n_states == (len(images),)


def test_concurrent_evictors_and_exact_readers(new_database: Callable[..., str], tmp_path: Path,
                                               ns: Namespace) -> None:  # fmt: skip
    """Two evictors (advisory lock, small batches) and an exact-tier reader at once: no error, every image
    dropped once, the cap met, prompts and states intact, every read either the right bytes or a miss."""
    url = new_database()
    blob_dir = str(tmp_path / "blobs")
    n = 12
    kept = 3
    with make_cache(url, LatentStore(blob_dir), eviction="ours") as cache:
        reqs = _seed(cache, ns, unit(np.random.default_rng(5), n))
        before = cache.stats()
    # Over budget until the ninth image is gone, so both evictors find work; the cap keeps three images.
    budget = before["bytes"] - int((n - kept - 0.5) * IMAGE_BYTES)
    fraction = (kept + 0.5) * IMAGE_BYTES / budget
    errors: list[str] = []
    results: list[dict[str, Any]] = []
    reads: list[tuple[int, bytes | None]] = []
    go = threading.Barrier(3)

    def evictor() -> None:
        try:
            with make_cache(url, LatentStore(blob_dir), eviction="ours", image_budget_fraction=fraction,
                            budget_bytes=budget) as c:  # fmt: skip
                go.wait(30)
                r = c.index.evict_to_budget(c.eviction, budget, c.clock(), batch=1)
                r["objects_deleted"] = c.store.delete(r.pop("uris"))
                results.append(r)
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(f"{type(e).__name__}: {e}")

    def reader() -> None:
        try:
            with make_cache(url, LatentStore(blob_dir), eviction="ours") as c:
                go.wait(30)
                for _round in range(3):
                    for i, req in enumerate(reqs):
                        hit = c.lookup(req)
                        assert hit.tier in ("exact", "approximate")
                        if hit.tier == "exact":
                            reads.append((i, c.load_image(hit)))
        except Exception as e:  # pragma: no cover
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=evictor), threading.Thread(target=evictor), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    cap = int(fraction * budget)
    assert sum(r["images"] for r in results) == n - kept
    assert sum(r["bytes"] for r in results) == (n - kept) * IMAGE_BYTES
    assert _image_bytes(url) == kept * IMAGE_BYTES <= cap
    assert all(data is None or data == _png(i) for i, data in reads)
    with make_cache(url, LatentStore(blob_dir), eviction="ours") as cache:
        after = cache.stats()
        assert after["prompts"] == n and after["states"] == 5 * n
        assert set(cache.store.iter_objects(0)) == cache.index.known_uris()


def test_migration_backfills_image_used_ts(new_database: Callable[..., str], tmp_path: Path) -> None:
    """0002 on a database written under 0001: images get a use time (last use if exact-hit, else creation)."""
    from nirvana.cache.migrate import discover, migrate, migrations_dir

    old_dir = tmp_path / "migrations"
    old_dir.mkdir()
    first = next(m for m in discover(migrations_dir()) if m.version == 1)
    (old_dir / first.path.name).write_text(first.sql)
    url = new_database(migrated=False)
    assert migrate(url, old_dir) == [1]
    emb = np.ones(384, dtype=np.float32) / np.sqrt(384)
    with psycopg.connect(url) as conn:
        from pgvector.psycopg import register_vector

        register_vector(conn)
        for exact_hits, img in ((0, True), (3, True), (0, False)):
            blob = None
            if img:
                b = conn.execute(
                    "INSERT INTO cache_blobs (kind, uri, codec, bytes, model_key, tenant) "
                    "VALUES ('image', NULL, 'virtual', 10, 'm', 't') RETURNING id"
                ).fetchone()
                assert b is not None
                blob = b[0]
            conn.execute(
                "INSERT INTO cache_prompts (model_key, tenant, embed_space, dim, embedding, prompt, seed, steps, "
                "guidance, width, height, exact_key, image_blob_id, exact_hits, created_ts, last_used_ts) VALUES "
                "('m', 't', 'e', 384, %s, 'p', 0, 50, 7, 32, 32, 'k', %s, %s, 1, 7)",
                (emb, blob, exact_hits),
            )
        conn.commit()
    assert 2 in migrate(url)
    with psycopg.connect(url) as conn:
        got = [r[0] for r in conn.execute("SELECT image_used_ts FROM cache_prompts ORDER BY id")]
    assert got == [1.0, 7.0, None]
