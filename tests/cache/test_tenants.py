"""Per-tenant byte budgets (``tenant_budget_bytes``): a tenant over its budget is evicted back under it using only
its own entries, before the global budget; another tenant's entries and hits are untouched; the global ceiling
still holds; the SQL stage and the in-memory ``evict_tenants`` agree; the setting is wired from Settings."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import pytest

from nirvana.cache.core import ApproximateCache, Namespace
from nirvana.cache.eviction import ImageMeta, StateMeta, make_policy, tenant_overflows
from nirvana.cache.index import CacheIndex
from nirvana.cache.store import LatentStore
from tests.cache.helpers import at_similarity, make_cache, request, states, unit

KS = [5, 10, 15, 20, 25]
MODEL = "model-a-32x32-ddim"


# ---------------------------------------------------------------------- pure
def test_tenant_overflows() -> None:
    stored = {"a": 500, "b": 100, "c": 300, "d": 300}
    assert tenant_overflows(stored, 0) == {}  # no per-tenant budget
    assert tenant_overflows(stored, 300) == {"a": 200}  # at exactly the budget is not over
    assert list(tenant_overflows(stored, 200).items()) == [("a", 300), ("c", 100), ("d", 100)]  # largest first
    assert tenant_overflows({}, 1) == {}
    with pytest.raises(ValueError, match="tenant_budget_bytes"):
        tenant_overflows(stored, -1)


def test_evict_tenants_touches_only_tenants_over_budget() -> None:
    pol = make_policy("ours", half_life_s=100.0, image_budget_fraction=0.25)
    metas = []
    for i in range(10):  # tenant a: 10 states of 100 B, oldest first; tenant b: 3 states
        m = StateMeta(id=i + 1, prompt_id=i + 1, k=10, bytes=100, tenant="a")
        pol.on_put(m, float(i))
        metas.append(m)
    for i in range(3):
        m = StateMeta(id=100 + i, prompt_id=100 + i, k=10, bytes=100, tenant="b")
        pol.on_put(m, 0.0)
        metas.append(m)
    images = [ImageMeta(1, 200, 0.0, "a"), ImageMeta(2, 200, 5.0, "a"), ImageMeta(100, 200, 0.0, "b")]
    # a: 1,400 B over a 600 B budget (cap 150 B: both its images go, freeing 400 B), then its 4 oldest states.
    imgs, gone = pol.evict_tenants(metas, images, 600, 10.0)
    assert imgs == [1, 2] and gone == [1, 2, 3, 4]
    # b (500 B) is under 600 B: nothing of it goes, though it is older than everything of a.
    assert pol.evict_tenants(metas, images, 0, 10.0) == ([], [])
    # At 400 B b is over too (500 B): its image alone (200 B, beyond its 100 B cap) brings it back; a loses 6 states.
    assert pol.evict_tenants(metas, images, 400, 10.0) == ([1, 2, 100], [1, 2, 3, 4, 5, 6])


# ---------------------------------------------------------------------- SQL agreement
def _load(conn: psycopg.Connection, metas: list[StateMeta]) -> dict[int, int]:  # type: ignore[type-arg]
    """Prompts/blobs/states mirroring ``metas`` (each prompt in its states' tenant); meta id → row id."""
    from pgvector.psycopg import register_vector

    register_vector(conn)
    conn.execute("TRUNCATE cache_states, cache_prompts, cache_blobs, cache_jobs")
    pids: dict[int, int] = {}
    ids: dict[int, int] = {}
    emb = np.ones(384, dtype=np.float32) / np.sqrt(384)
    for m in metas:
        if m.prompt_id not in pids:
            r = conn.execute(
                "INSERT INTO cache_prompts (model_key, tenant, embed_space, dim, embedding, prompt, seed, steps, "
                "guidance, width, height, exact_key, created_ts, last_used_ts) VALUES "
                "('m', %s, 'e', 384, %s, 'p', 0, 50, 7, 32, 32, %s, 0, 0) RETURNING id",
                (m.tenant, emb, uuid.uuid4().hex),
            ).fetchone()
            assert r is not None
            pids[m.prompt_id] = r[0]
        b = conn.execute(
            "INSERT INTO cache_blobs (kind, uri, codec, bytes, model_key, tenant) "
            "VALUES ('state', NULL, 'virtual', %s, 'm', %s) RETURNING id",
            (m.bytes, m.tenant),
        ).fetchone()
        assert b is not None
        r = conn.execute(
            "INSERT INTO cache_states (prompt_id, blob_id, k, num_steps, timestep, scheduler_family, shape, hits, "
            "dhits, dhits_ts, created_ts, last_used_ts) VALUES (%s, %s, %s, 50, 0, 'ddim', '{}', %s, %s, %s, %s, %s) "
            "RETURNING id",
            (pids[m.prompt_id], b[0], m.k, m.hits, m.dhits, m.dhits_ts, m.created_ts, m.last_used_ts),
        ).fetchone()
        assert r is not None
        ids[m.id] = r[0]
    conn.commit()
    return ids


def _random_metas(rng: np.random.Generator, tenants: dict[str, int]) -> list[StateMeta]:
    out: list[StateMeta] = []
    pid = 0
    for tenant, n_prompts in tenants.items():
        for _ in range(n_prompts):
            pid += 1
            for k in sorted(rng.choice([5, 10, 15, 20, 25], size=int(rng.integers(1, 6)), replace=False)):
                created = float(rng.uniform(0, 1000))
                out.append(
                    StateMeta(
                        id=len(out) + 1,
                        prompt_id=pid,
                        k=int(k),
                        bytes=int(rng.integers(50, 150)),
                        hits=int(rng.integers(0, 4)),
                        dhits=float(rng.uniform(0.01, 5)),
                        dhits_ts=float(created + rng.uniform(0, 500)),
                        created_ts=created,
                        last_used_ts=float(created + rng.uniform(0, 800)),
                        tenant=tenant,
                    )
                )
    return out


@pytest.mark.parametrize("name", ["ours", "paper", "lru", "ours_floor"])
def test_sql_tenant_stage_matches_python(pg_url: str, name: str) -> None:
    from psycopg_pool import ConnectionPool

    rng = np.random.default_rng(5)
    metas = _random_metas(rng, {"big": 40, "mid": 15, "small": 4})
    if name == "ours_floor":
        pol = make_policy("ours", half_life_s=300.0, min_states_per_prompt=2)
    else:
        pol = make_policy(name, half_life_s=300.0)
    now = 1500.0
    stored = {t: sum(m.bytes for m in metas if m.tenant == t) for t in ("big", "mid", "small")}
    tenant_budget = stored["mid"] - 200  # big and mid are over, small is not
    assert stored["small"] < tenant_budget < stored["big"]
    _, expected = pol.evict_tenants(metas, [], tenant_budget, now)
    with psycopg.connect(pg_url) as conn:
        ids = _load(conn, metas)
    with ConnectionPool(pg_url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        index = CacheIndex(pool)
        assert index.tenant_bytes() == stored
        # A global budget far above the total: only the per-tenant stage runs. Small batches: many transactions.
        res = index.evict_to_budget(pol, 10**12, now, batch=7, tenant_budget_bytes=tenant_budget)
        with pool.connection() as conn:
            left = {r[0] for r in conn.execute("SELECT id FROM cache_states")}
        after = index.tenant_bytes()
    evicted = {m for m, rid in ids.items() if rid not in left}
    assert evicted == set(expected)
    assert {m.tenant for m in metas if m.id in evicted} == {"big", "mid"}
    assert after["small"] == stored["small"] and after["big"] <= tenant_budget and after["mid"] <= tenant_budget
    assert set(res["tenants"]) == {"big", "mid"} and res["tenants"]["big"] == stored["big"] - after["big"]


# ---------------------------------------------------------------------- the cache, end to end
def _record(cache: ApproximateCache, ns: Namespace, emb: np.ndarray, i: int, png: bytes | None = None) -> None:
    req = request(emb, ns, prompt=f"{ns.tenant}-{i}", seed=i)
    out = cache.record(f"job-{ns.tenant}-{i}", req, states(ns.model_key, KS, seed=i), png, cache.lookup(req))
    assert out["recorded"] and out["states"] == 5


def _rows(url: str, tenant: str) -> list[tuple[object, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT s.id, s.k, s.hits, s.blob_id, b.bytes, p.id, p.image_blob_id FROM cache_states s "
            "JOIN cache_prompts p ON p.id = s.prompt_id JOIN cache_blobs b ON b.id = s.blob_id "
            "WHERE p.tenant = %s ORDER BY s.id",
            (tenant,),
        ).fetchall()


@dataclass
class Snapshot:
    rows: list[tuple[object, ...]]  # B's state rows: ids, counters, blobs, images
    hits: list[tuple[str, int, int | None]]  # B's repeated lookups: tier, k, source prompt
    bytes: int


@dataclass
class Burst:
    before: Snapshot
    after: Snapshot
    a_peak: int  # A's stored bytes right after an eviction, at most
    a_written: int
    tenant_budget: int


def _burst(url: str, tmp_path: Path, tenant_budgets: bool) -> Burst:
    """Tenant B stores 4 prompts and serves near-duplicates from them; ten hours later tenant A writes ~10× its
    budget, evicting every 5 records. Returns B's rows, lookups and bytes before and after, and A's peak."""
    now = [0.0]
    a, b = Namespace(MODEL, "tenant-a"), Namespace(MODEL, "tenant-b")
    rng = np.random.default_rng(17)
    with make_cache(url, LatentStore(str(tmp_path / "blobs")), eviction="ours", clock=lambda: now[0]) as cache:
        b_embs = unit(rng, 4)
        for i, e in enumerate(b_embs):
            _record(cache, b, e, i, png=b"\x89PNG-b" + bytes([i]) * 300)
        per_prompt = cache.stats("tenant-b")["bytes"] // 4
        # Budgets: B (4 prompts) fits its tenant budget; the global budget holds A's budget plus B's.
        tenant_budget = int(per_prompt * 6)
        cache.tenant_budget_bytes = tenant_budget if tenant_budgets else 0
        cache.budget_bytes = tenant_budget + 5 * per_prompt
        queries = [at_similarity(e, 0.96, rng) for e in b_embs]  # paper table: s > 0.95 → K = 25

        def b_lookups() -> list[tuple[str, int, int | None]]:
            out: list[tuple[str, int, int | None]] = []
            for j, q in enumerate(queries):
                hit = cache.lookup(request(q, b, prompt=f"b-query-{j}", seed=100 + j))
                out.append((hit.tier, hit.k, hit.source_prompt_id))
            return out

        before = Snapshot(_rows(url, "tenant-b"), b_lookups(), cache.stats("tenant-b")["bytes"])
        a_peak_after_evict = 0
        for i in range(60):  # ~10× A's budget of 6 prompts
            now[0] = 36000.0 + i  # ten half-lives after B's puts: in one global order all of B's go first
            _record(cache, a, unit(rng), i, png=b"\x89PNG-a" + bytes([i]) * 300)
            if i % 5 == 4:
                cache.evict_to_budget()
                a_peak_after_evict = max(a_peak_after_evict, cache.stats("tenant-a")["bytes"])
                assert cache.stats()["bytes"] <= cache.budget_bytes  # the global ceiling holds throughout
        after = Snapshot(_rows(url, "tenant-b"), b_lookups(), cache.stats("tenant-b")["bytes"])
        return Burst(before, after, a_peak_after_evict, 60 * per_prompt, tenant_budget)


def test_a_burst_leaves_b_untouched(new_database: Callable[..., str], tmp_path: Path) -> None:
    run = _burst(new_database(), tmp_path / "tenants", tenant_budgets=True)
    assert [t for t, _, _ in run.before.hits] == ["approximate"] * 4 and all(k == 25 for _, k, _ in run.before.hits)
    assert len(run.before.rows) == 20 and run.before.bytes > 0
    # B: the same rows (ids, counters, blobs, images), the same bytes, the same hits on its repeated lookups.
    assert run.after == run.before
    # A wrote ~10× its budget and was back within it after every eviction.
    assert run.a_written >= 9 * run.tenant_budget
    assert 0 < run.a_peak <= run.tenant_budget


def test_without_tenant_budgets_a_burst_evicts_b(new_database: Callable[..., str], tmp_path: Path) -> None:
    """The same burst under the global budget alone (the old behaviour): B's entries, older and less used, go."""
    run = _burst(new_database(), tmp_path / "global", tenant_budgets=False)
    assert run.after.bytes == 0 < run.before.bytes and run.after.rows == []
    assert [t for t, _, _ in run.before.hits] == ["approximate"] * 4
    assert [t for t, _, _ in run.after.hits] == ["miss"] * 4


def test_global_ceiling_still_enforced(new_database: Callable[..., str], tmp_path: Path) -> None:
    url = new_database()
    rng = np.random.default_rng(23)
    now = [0.0]
    with make_cache(url, LatentStore(str(tmp_path / "blobs")), eviction="lru", clock=lambda: now[0]) as cache:
        tenants = [Namespace(MODEL, f"t{j}") for j in range(3)]
        for i in range(4):
            for ns in tenants:
                now[0] += 1
                _record(cache, ns, unit(rng), i)
        stored = cache.index.tenant_bytes()
        total = sum(stored.values())
        # Every tenant under its budget, their sum over the global one: the global stage evicts across tenants.
        cache.tenant_budget_bytes = max(stored.values()) + 1
        cache.budget_bytes = total // 2
        res = cache.evict_to_budget()
        after = cache.index.tenant_bytes()
        assert res["tenants"] == {} and res["bytes"] > 0
        assert sum(after.values()) <= cache.budget_bytes
        assert {t for t, v in after.items() if v < stored[t]} == {"t0", "t1", "t2"}  # LRU: everyone's oldest
        # Both at once: the tenant stage brings t0 under a tight budget, the global stage the rest.
        now[0] += 1
        for i in range(4, 10):
            _record(cache, tenants[0], unit(rng), i)
        cache.tenant_budget_bytes = max(after["t1"], after["t2"]) + 1
        cache.budget_bytes = sum(after.values())
        res = cache.evict_to_budget()
        final = cache.index.tenant_bytes()
        assert list(res["tenants"]) == ["t0"] and final["t0"] <= cache.tenant_budget_bytes
        assert sum(final.values()) <= cache.budget_bytes
        assert cache.stats()["tenant_budget_bytes"] == cache.tenant_budget_bytes
        with pytest.raises(ValueError, match="tenant_budget_bytes"):
            cache.index.evict_to_budget(cache.eviction, 0, 0.0, tenant_budget_bytes=-1)


def test_settings_are_wired(monkeypatch: pytest.MonkeyPatch, pg_url: str, tmp_path: Path) -> None:
    from pydantic import ValidationError

    from nirvana.cache.embedder import MiniLMEmbedder
    from nirvana.cache.index import DEFAULT_EXACT_SCAN_MAX_ROWS
    from nirvana.config import Settings

    s = Settings()
    assert s.cache_tenant_budget_bytes == 0 and s.cache_exact_scan_max_rows == DEFAULT_EXACT_SCAN_MAX_ROWS
    monkeypatch.setenv("NIRVANA_CACHE_TENANT_BUDGET_BYTES", "12345")
    monkeypatch.setenv("NIRVANA_CACHE_EXACT_SCAN_MAX_ROWS", "77")
    s = Settings(database_url=pg_url, storage_url=str(tmp_path / "blobs"))
    with ApproximateCache.from_settings(s, embedder=MiniLMEmbedder()) as cache:
        assert cache.tenant_budget_bytes == 12345 and cache.index.exact_scan_max_rows == 77
    for var in ("NIRVANA_CACHE_TENANT_BUDGET_BYTES", "NIRVANA_CACHE_EXACT_SCAN_MAX_ROWS"):
        monkeypatch.setenv(var, "-1")
        with pytest.raises(ValidationError, match=var.removeprefix("NIRVANA_").lower()):
            Settings()
        monkeypatch.setenv(var, "0")
