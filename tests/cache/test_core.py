"""The facade on real PostgreSQL + pgvector and a real file store: tiers, K selection, recording (idempotent,
hits included, borrowed states), misses on lost/corrupt blobs, eviction, sweeping, virtual states, the gate."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psycopg
import pytest
import torch

from nirvana.cache.core import ApproximateCache, Namespace
from nirvana.cache.embedder import MiniLMEmbedder
from nirvana.cache.gate import NoveltyGate
from nirvana.cache.store import LatentStore
from tests.cache.helpers import at_similarity, make_cache, request, states, unit

KS = [5, 10, 15, 20, 25]


@pytest.fixture
def ns() -> Namespace:
    return Namespace("model-a-32x32-ddim", f"tenant-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def cache(pg_url: str, tmp_path: Path) -> ApproximateCache:
    c = make_cache(pg_url, LatentStore(str(tmp_path / "blobs")), eviction="paper", budget_bytes=10**12)
    yield c  # type: ignore[misc]
    c.close()


def seed_entry(cache: ApproximateCache, ns: Namespace, emb: np.ndarray, ks: list[int] = KS, **kw) -> str:  # type: ignore[no-untyped-def]
    job = f"job-{uuid.uuid4().hex}"
    req = request(emb, ns, **kw)
    hit = cache.lookup(req)
    res = cache.record(job, req, states(ns.model_key, ks, seed=len(job)), b"\x89PNG-" + job.encode(), hit)
    assert res["recorded"]
    return job


def test_miss_then_exact_then_approximate(cache: ApproximateCache, ns: Namespace) -> None:
    rng = np.random.default_rng(0)
    a = unit(rng)
    req = request(a, ns)
    first = cache.lookup(req)
    assert (first.tier, first.k, first.similarity, first.candidates) == ("miss", 0, None, 0)
    sts = states(ns.model_key, KS)
    out = cache.record("job-a", req, sts, b"\x89PNG-a", first)
    assert out["recorded"] and out["states"] == 5 and out["borrowed"] == 0
    # Identical request: exact tier, no denoising.
    again = cache.lookup(request(a, ns))
    assert again.tier == "exact" and cache.load_image(again) == b"\x89PNG-a"
    # Another seed: no exact match; the same embedding → s = 1 → K = 25.
    other_seed = cache.lookup(request(a, ns, seed=2))
    assert other_seed.tier == "approximate" and other_seed.k == 25
    for sim, k in ((0.97, 25), (0.92, 20), (0.87, 15), (0.8, 10), (0.7, 5), (0.6, 0)):
        r = cache.lookup(request(at_similarity(a, sim, rng), ns, prompt="x", seed=9))
        assert r.k == k and r.similarity == pytest.approx(sim, abs=1e-3)
        assert r.tier == ("approximate" if k else "miss")
        if k:
            st = cache.load_state(r)
            assert st is not None and st.step == k and st.num_steps == 50 and st.model_key == ns.model_key
            ref = sts[KS.index(k)].latent
            assert torch.allclose(st.latent, ref, rtol=2e-3, atol=2e-3)
            assert st.timestep == sts[KS.index(k)].timestep and st.scheduler_family == "ddim"
    # Other step counts: the table scales and only states of that schedule count.
    assert cache.lookup(request(a, ns, steps=25, seed=3)).tier == "miss"


def test_largest_stored_state_at_most_k(cache: ApproximateCache, ns: Namespace) -> None:
    rng = np.random.default_rng(1)
    a = unit(rng)
    seed_entry(cache, ns, a, ks=[5, 15])
    r = cache.lookup(request(at_similarity(a, 0.97, rng), ns, seed=5))
    assert (r.tier, r.k_policy, r.k) == ("approximate", 25, 15)
    r = cache.lookup(request(at_similarity(a, 0.88, rng), ns, seed=5))
    assert (r.k_policy, r.k) == (15, 15)
    r = cache.lookup(request(at_similarity(a, 0.8, rng), ns, seed=5))
    assert (r.k_policy, r.k) == (10, 5)


def test_namespaces_are_isolated(cache: ApproximateCache, ns: Namespace) -> None:
    rng = np.random.default_rng(2)
    a = unit(rng)
    seed_entry(cache, ns, a)
    for other in (Namespace(ns.model_key, ns.tenant + "-x"), Namespace("model-b", ns.tenant)):
        r = cache.lookup(request(a, other))
        assert r.tier == "miss" and r.candidates == 0
    assert cache.lookup(request(a, ns, seed=77)).tier == "approximate"


def test_record_is_idempotent_and_counts_hits_once(cache: ApproximateCache, ns: Namespace, pg_url: str) -> None:
    rng = np.random.default_rng(3)
    a = unit(rng)
    seed_entry(cache, ns, a)
    b = at_similarity(a, 0.92, rng)
    req = request(b, ns, prompt="b", seed=4)
    hit = cache.lookup(req)
    assert hit.k == 20
    sts = states(ns.model_key, [25], seed=4)
    first = cache.record("job-b", req, sts, b"\x89PNG-b", hit)
    again = cache.record("job-b", req, sts, b"\x89PNG-b", hit)
    assert first["recorded"] and first["hit_counted"] and first["states"] == 1 and first["borrowed"] == 4
    assert not again["recorded"] and not again["hit_counted"]
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT hits, score FROM cache_states WHERE id = %s", (hit.state_id,)).fetchone() == (
            1,
            20.0,
        )
        rows = conn.execute(
            "SELECT k, borrowed, blob_id FROM cache_states WHERE prompt_id = %s ORDER BY k", (first["prompt_id"],)
        ).fetchall()
        src = dict(
            conn.execute("SELECT k, blob_id FROM cache_states WHERE prompt_id = %s", (hit.source_prompt_id,)).fetchall()
        )
    assert [(k, bor) for k, bor, _ in rows] == [(5, True), (10, True), (15, True), (20, True), (25, False)]
    assert all(blob == src[k] for k, bor, blob in rows if bor)
    # A neighbour of b now resumes from b's own k = 25 state, or from a borrowed one at lower similarity.
    c = cache.lookup(request(at_similarity(b, 0.999, rng), ns, seed=6))
    assert (c.source_prompt_id, c.k) == (first["prompt_id"], 25)
    st = cache.load_state(c)
    assert st is not None and torch.allclose(st.latent, sts[0].latent, atol=2e-3, rtol=2e-3)


def test_lost_and_corrupt_blobs_are_misses(cache: ApproximateCache, ns: Namespace, pg_url: str) -> None:
    rng = np.random.default_rng(4)
    a = unit(rng)
    seed_entry(cache, ns, a)
    r25 = cache.lookup(request(a, ns, seed=8))
    row = cache.index.state_row(r25.state_id or -1)
    assert row is not None and row.uri is not None
    # Corrupt: flip bytes in place.
    path = cache.store._fs_path(row.uri)[1]
    data = bytearray(Path(path).read_bytes())
    data[-5] ^= 0xFF
    Path(path).write_bytes(bytes(data))
    assert cache.load_state(r25) is None
    assert cache.index.state_row(r25.state_id or -1) is None and not Path(path).exists()
    # Missing: the object vanished underneath the row.
    r20 = cache.lookup(request(a, ns, seed=8))
    assert r20.k == 20
    row20 = cache.index.state_row(r20.state_id or -1)
    assert row20 is not None and row20.uri is not None
    Path(cache.store._fs_path(row20.uri)[1]).unlink()
    assert cache.load_state(r20) is None and cache.index.state_row(r20.state_id or -1) is None
    # The next lookup falls back to the largest remaining state.
    assert cache.lookup(request(a, ns, seed=8)).k == 15
    # Truncated image: exact tier miss, image reference dropped, the entry's states stay.
    ex = cache.lookup(request(a, ns))
    assert ex.tier == "exact" and ex.image_uri is not None
    ipath = Path(cache.store._fs_path(ex.image_uri)[1])
    ipath.write_bytes(ipath.read_bytes()[:3])
    assert cache.load_image(ex) is None
    assert cache.lookup(request(a, ns)).tier == "approximate"
    # A result that is not a hit loads nothing.
    miss = cache.lookup(request(unit(rng), Namespace("nothing-here", "t")))
    assert cache.load_state(miss) is None and cache.load_image(miss) is None


def test_validation(cache: ApproximateCache, ns: Namespace) -> None:
    e = unit(np.random.default_rng(5))
    with pytest.raises(ValueError, match="steps"):
        cache.lookup(request(e, ns, steps=0))
    with pytest.raises(ValueError, match="guidance"):
        cache.lookup(request(e, ns, guidance=float("nan")))
    with pytest.raises(ValueError, match="prompt"):
        cache.lookup(request(e, ns, prompt="x" * 1001))
    with pytest.raises(ValueError, match="embedding"):
        cache.lookup(request(e[:10], ns))
    with pytest.raises(ValueError, match=r"namespace\.tenant"):
        Namespace("m", "")
    with pytest.raises(ValueError, match="job_id"):
        cache.record("", request(e, ns), [], None, None)
    with pytest.raises(ValueError, match="model_key"):
        cache.record("j-bad", request(e, ns), states("other-model", [5]), None, None)
    with pytest.raises(ValueError, match="num_steps"):
        cache.record("j-bad2", request(e, ns), states(ns.model_key, [5], steps=40), None, None)
    with pytest.raises(ValueError, match="codec"):
        make_cache("postgresql://unused", cache.store, codec="jpeg")


def test_ours_admission_skips_near_duplicates(pg_url: str, tmp_path: Path, ns: Namespace) -> None:
    with make_cache(pg_url, LatentStore(str(tmp_path / "b")), eviction="ours", budget_bytes=10**12) as cache:
        rng = np.random.default_rng(6)
        a = unit(rng)
        seed_entry(cache, ns, a)
        dup = request(a, ns, prompt="a red cube on grass ", seed=99)
        hit = cache.lookup(dup)
        assert hit.tier == "approximate" and hit.similarity is not None and hit.similarity >= 0.99
        out = cache.record("job-dup", dup, states(ns.model_key, []), b"png", hit)
        assert out["recorded"] and out["hit_counted"] and out["prompt_id"] is None
        near = request(at_similarity(a, 0.92, rng), ns, prompt="refined", seed=3)
        out = cache.record("job-near", near, states(ns.model_key, [20, 25]), b"png", cache.lookup(near))
        assert out["prompt_id"] is not None and out["states"] == 1  # k = 25 own; k = 20 was the hit → borrowed
        assert cache.stats(ns.tenant)["prompts"] == 2


def test_eviction_sweep_and_virtual_states(new_database: Callable[..., str], tmp_path: Path) -> None:
    url = new_database()
    store = LatentStore(str(tmp_path / "blobs"))
    ns = Namespace("m", "t")
    clock = iter(float(t) for t in range(10**6))
    with make_cache(url, store, eviction="ours", min_states_per_prompt=2, clock=lambda: next(clock)) as cache:
        rng = np.random.default_rng(7)
        for i in range(6):
            seed_entry(cache, ns, unit(rng), prompt=f"p{i}")
        before = cache.stats()
        assert before["prompts"] == 6 and before["states"] == 30
        per_state = before["state_bytes"] // 30
        cache.budget_bytes = before["bytes"] - 10 * per_state
        res = cache.evict_to_budget()
        after = cache.stats()
        assert after["bytes"] <= cache.budget_bytes and res["bytes"] == before["bytes"] - after["bytes"]
        assert res["objects_deleted"] == res["blobs"] and after["prompts"] == 6  # floor keeps every prompt
        # Under a budget the floor cannot meet, whole prompts go (with their images).
        cache.budget_bytes = 3 * 2 * per_state
        cache.evict_to_budget()
        left = cache.stats()
        assert left["bytes"] <= cache.budget_bytes and left["prompts"] < 6 and left["states"] == 2 * left["prompts"]
        live = set(store.iter_objects(0))
        assert live == cache.index.known_uris()
        # Orphans (e.g. a crash between blob write and row insert) are swept after the grace period only.
        orphan = store.put_bytes("states/orphan/x.nvl", b"junk").uri
        assert cache.sweep_orphans(min_age_s=3600) == 0 and store.exists(orphan)
        assert cache.sweep_orphans(min_age_s=0) == 1 and not store.exists(orphan)
        assert set(store.iter_objects(0)) == cache.index.known_uris()
        # Virtual states: rows with a byte size and no object (trace replays).
        e = unit(rng)
        vreq = request(e, Namespace("m", "virtual"))
        out = cache.record_virtual("v1", vreq, cache.lookup(vreq), bytes_per_state=1000, image_bytes=50)
        assert out["states"] == 5
        assert cache.record_virtual("v1", vreq, None, bytes_per_state=1000)["recorded"] is False
        e2 = at_similarity(e, 0.96, rng)
        hit = cache.lookup(request(e2, Namespace("m", "virtual"), seed=2))
        assert hit.tier == "approximate" and hit.k == 25 and cache.load_state(hit) is None
        vr = cache.record_virtual("v2", request(e2, Namespace("m", "virtual"), seed=2, prompt="p2"), hit, 1000)
        assert vr["hit_counted"] and vr["borrowed"] == 5 and vr["states"] == 0
        assert cache.stats("virtual")["state_bytes"] == 5000 and cache.stats("virtual")["image_bytes"] == 50
        cache.budget_bytes = 0
        cache.evict_to_budget()
        assert cache.stats()["bytes"] == 0 and cache.stats()["prompts"] == 0
        assert list(store.iter_objects(0)) == []


def test_gate_shadow_by_default_and_enforced_on_request(new_database: Callable[..., str], tmp_path: Path) -> None:
    url = new_database()
    ns = Namespace("m", "gate")
    gate = NoveltyGate(nu=0.05, gamma=2.0, min_samples=20, reload_s=0.0)
    rng = np.random.default_rng(8)
    center = unit(rng)
    with make_cache(url, LatentStore(str(tmp_path / "b")), gate=gate) as cache:
        assert cache.refit_gate()["fitted"] == 0
        for i in range(40):
            v = at_similarity(center, 0.8, rng)
            cache.record_virtual(f"g{i}", request(v, ns, prompt=f"p{i}"), None, bytes_per_state=10)
        assert cache.refit_gate() == {"fitted": 1, "removed": 0, "unchanged": 0, "namespaces": 1}
        assert cache.refit_gate()["unchanged"] == 1
        # Default: shadow mode — the verdict is recorded, the lookup still runs (and may hit).
        assert cache.gate_enforce is False
        far = cache.lookup(request(at_similarity(center, 0.1, rng), ns, seed=5))
        assert far.gate_novel is True and not far.gate_skipped_lookup and far.candidates > 0
        assert far.gate_score is not None and far.gate_score < 0
        near = cache.lookup(request(at_similarity(center, 0.95, rng), ns, seed=5))
        assert near.gate_novel is False and near.tier == "approximate"
        cache.gate_enforce = True  # enforced: a novel prompt's lookup is skipped
        far2 = cache.lookup(request(unit(rng), ns, seed=5))
        assert far2.gate_novel is True and far2.gate_skipped_lookup and far2.candidates == 0 and far2.tier == "miss"


def test_gate_enforce_setting_is_wired(monkeypatch: pytest.MonkeyPatch, pg_url: str, tmp_path: Path) -> None:
    from nirvana.cache.gate import DEFAULT_GATE_ENFORCE
    from nirvana.config import Settings

    s = Settings(database_url=pg_url, storage_url=str(tmp_path / "blobs"))
    assert s.cache_gate_enforce is DEFAULT_GATE_ENFORCE is False
    with ApproximateCache.from_settings(s, embedder=MiniLMEmbedder()) as cache:
        assert cache.gate is not None and cache.gate_enforce is False
    monkeypatch.setenv("NIRVANA_CACHE_GATE_ENFORCE", "true")
    s = Settings(database_url=pg_url, storage_url=str(tmp_path / "blobs"))
    with ApproximateCache.from_settings(s, embedder=MiniLMEmbedder()) as cache:
        assert cache.gate_enforce is True


def test_a_hit_updates_its_rows_in_place(new_database: Callable[..., str], tmp_path: Path) -> None:
    """Counting a hit leaves the source's prompt and state rows on their pages (HOT updates, no new entry in
    the HNSW index): migration 0003's fillfactor keeps room on each page. On full pages (fillfactor 100) the
    updated prompt moved to another page and its vector was inserted into the graph again."""
    url = new_database()
    ns = Namespace("m", "hot")
    rng = np.random.default_rng(12)
    with make_cache(url, LatentStore(str(tmp_path / "b")), eviction="ours") as cache:
        embs = [unit(rng) for _ in range(24)]  # several pages of prompts (~1.8 kB each)
        for i, e in enumerate(embs):
            cache.record_virtual(f"j{i}", request(e, ns, seed=i, prompt=f"p{i}"), None, bytes_per_state=10)

        def pages() -> dict[str, int]:
            with psycopg.connect(url) as conn:
                rows = conn.execute(
                    "SELECT 'p' || p.id, (p.ctid::text::point)[0]::int FROM cache_prompts p UNION ALL "
                    "SELECT 's' || s.id, (s.ctid::text::point)[0]::int FROM cache_states s"
                ).fetchall()
            return {str(r[0]): int(r[1]) for r in rows}

        before = pages()
        for i in (0, 11, 23):
            req = request(at_similarity(embs[i], 0.97, rng), ns, seed=100 + i, prompt=f"q{i}")
            hit = cache.lookup(req)
            assert hit.tier == "approximate"
            out = cache.record_virtual(f"h{i}", req, hit, bytes_per_state=10)
            assert out["hit_counted"]
        after = pages()
    moved = [k for k, page in before.items() if after.get(k) != page]
    assert moved == []
