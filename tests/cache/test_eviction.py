"""Eviction policies: pure bookkeeping semantics, and agreement of the SQL orders with the Python ones."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest

from nirvana.cache.eviction import (
    DEFAULT_HALF_LIFE_S,
    EvictionPolicy,
    OursPolicy,
    PaperLCBFU,
    StateMeta,
    make_policy,
)
from nirvana.cache.index import CacheIndex


def meta(i: int, pid: int, k: int, **kw: float) -> StateMeta:
    return StateMeta(id=i, prompt_id=pid, k=k, bytes=int(kw.pop("bytes", 100)), **kw)  # type: ignore[arg-type]


def test_paper_lcbfu_scores_and_tie_break() -> None:
    p = PaperLCBFU()
    a, b, c = meta(1, 1, 25), meta(2, 2, 5), meta(3, 3, 10)
    for m, t in ((a, 0.0), (b, 1.0), (c, 2.0)):
        p.on_put(m, t)
    assert (a.hits, a.created_ts) == (0, 0.0)
    # New states enter at 0: ties broken oldest first.
    assert p.evict_candidates([a, b, c], 100, 10.0) == [1]
    p.on_hit(b, 3.0)
    p.on_hit(b, 4.0)  # b: 5 x 2 = 10
    p.on_hit(a, 5.0)  # a: 25 x 1 = 25
    assert p.evict_candidates([a, b, c], 300, 10.0) == [3, 2, 1]
    # It never ages: a hit long ago still beats a fresh state.
    fresh = meta(4, 4, 25)
    p.on_put(fresh, 1e9)
    assert p.evict_candidates([a, fresh], 100, 1e9)[0] == 4


def test_ours_ages_and_credits_puts() -> None:
    p = OursPolicy(half_life_s=100.0, min_states_per_prompt=0)
    old, new = meta(1, 1, 10), meta(2, 2, 10)
    p.on_put(old, 0.0)
    for t in range(5):
        p.on_hit(old, float(t))
    p.on_put(new, 2000.0)  # 20 half-lives later
    assert p.decayed(old, 2000.0) < 1e-4 < p.decayed(new, 2000.0) == 1.0
    assert p.evict_candidates([old, new], 100, 2000.0) == [1]
    # At equal recency the k weighting decides: the small-k state goes first.
    a, b = meta(3, 3, 5), meta(4, 4, 25)
    p.on_put(a, 0.0)
    p.on_put(b, 0.0)
    assert p.evict_candidates([a, b], 1, 0.0) == [3]
    # The hit update matches the closed form.
    m = meta(5, 5, 10)
    p.on_put(m, 0.0)
    p.on_hit(m, 100.0)
    assert math.isclose(m.dhits, 1.5) and m.hits == 1 and m.last_used_ts == 100.0


def test_ours_min_states_floor_and_whole_prompt_phase() -> None:
    p = OursPolicy(half_life_s=1e6, min_states_per_prompt=2)
    ms = []
    for pid in (1, 2):
        for j, k in enumerate((5, 10, 15, 20, 25)):
            m = meta(pid * 10 + j, pid, k)
            p.on_put(m, float(pid))
            ms.append(m)
    # Prompt 2's k=20 state has been used: it is protected instead of k=10.
    p.on_hit(ms[5 + 3], 3.0)
    out = p.evict_candidates(ms, 600, 3.0)
    assert len(out) == 6
    kept = {m.id for m in ms} - set(out)
    assert kept == {10, 11, 20, 23}  # floor: prompt 1 keeps k=5,10; prompt 2 keeps its used k=20 and k=5
    # Beyond the unprotected states whole prompts go: prompt 1 (lower best key) entirely, before prompt 2.
    out = p.evict_candidates(ms, 700, 3.0)
    assert set(out[6:]) == {10, 11}


def test_floor_keeps_high_k_on_ties() -> None:
    low, high = (OursPolicy(half_life_s=1e6, min_states_per_prompt=2, floor_keeps=f) for f in ("low_k", "high_k"))
    ms = [meta(j, 1, k) for j, k in enumerate((5, 10, 15, 20, 25))]
    for m in ms:
        low.on_put(m, 0.0)
    # Phase 1 evicts the unprotected states, so what is left is what each floor keeps.
    assert {m.k for m in ms if m.id not in low.evict_candidates(ms, 300, 1.0)} == {5, 10}
    assert {m.k for m in ms if m.id not in high.evict_candidates(ms, 300, 1.0)} == {20, 25}
    # A use still outranks k: the hit k=10 state is kept by the high-k floor, with k=25.
    high.on_hit(ms[1], 1.0)
    assert {m.k for m in ms if m.id not in high.evict_candidates(ms, 300, 1.0)} == {10, 25}


def test_lru_lfu_fifo() -> None:
    ms = [meta(1, 1, 5), meta(2, 2, 5), meta(3, 3, 5)]
    pols = {n: make_policy(n) for n in ("lru", "lfu", "fifo")}
    for pol in pols.values():
        for t, m in enumerate(ms):
            pol.on_put(m, float(t))
    # All three use the same counters; hit the oldest twice at t=10, the middle once at t=11.
    p = pols["lru"]
    p.on_hit(ms[0], 10.0)
    p.on_hit(ms[0], 10.0)
    p.on_hit(ms[1], 11.0)
    assert pols["lru"].evict_candidates(ms, 1, 12.0) == [3]
    assert pols["lfu"].evict_candidates(ms, 200, 12.0) == [3, 2]
    assert pols["fifo"].evict_candidates(ms, 1, 12.0) == [1]


def test_admission() -> None:
    ours, paper, paper_miss = make_policy("ours"), make_policy("paper"), PaperLCBFU(admit_hits=False)
    assert ours.admit(None, "miss") and ours.admit(0.9, "approximate")
    assert not ours.admit(0.995, "approximate") and not ours.admit(1.0, "exact")
    assert paper.admit(0.999, "approximate") and not paper.admit(1.0, "exact")
    assert paper_miss.admit(None, "miss") and not paper_miss.admit(0.7, "approximate")


def test_half_life_setting_reaches_the_policy(monkeypatch: pytest.MonkeyPatch, pg_url: str, tmp_path: Path) -> None:
    from pydantic import ValidationError

    from nirvana.bench.trace import default_specs
    from nirvana.cache.core import ApproximateCache
    from nirvana.cache.embedder import MiniLMEmbedder
    from nirvana.config import Settings

    assert Settings().cache_half_life_s == DEFAULT_HALF_LIFE_S == OursPolicy().half_life_s
    monkeypatch.setenv("NIRVANA_CACHE_HALF_LIFE_S", "600")
    s = Settings(database_url=pg_url, storage_url=str(tmp_path / "blobs"))
    with ApproximateCache.from_settings(s, embedder=MiniLMEmbedder()) as cache:
        assert cache.eviction.name == "ours" and cache.eviction.half_life_s == 600.0
    monkeypatch.setenv("NIRVANA_CACHE_HALF_LIFE_S", "0")
    with pytest.raises(ValidationError, match="cache_half_life_s"):
        Settings()
    # The trace bench's ours is the service's default.
    ours = next(sp for sp in default_specs(Path("/nonexistent.json")) if sp.name == "ours")
    assert ours.eviction_policy().half_life_s == DEFAULT_HALF_LIFE_S


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="eviction policy must be one of"):
        make_policy("arc")
    with pytest.raises(ValueError, match="half_life_s"):
        make_policy("ours", half_life_s=0)
    with pytest.raises(ValueError, match="min_states_per_prompt"):
        make_policy("ours", min_states_per_prompt=-1)
    assert make_policy("lru", min_states_per_prompt=3).min_states_per_prompt == 0
    with pytest.raises(ValueError, match="floor_keeps"):
        make_policy("ours", floor_keeps="middle")


# ---------------------------------------------------------------------- SQL agreement
def _load(conn: psycopg.Connection, metas: list[StateMeta]) -> dict[int, int]:  # type: ignore[type-arg]
    """Insert prompts/blobs/states mirroring ``metas``; returns meta id → row id."""
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
                "('m', 't', 'e', 384, %s, 'p', 0, 50, 7, 32, 32, %s, 0, 0) RETURNING id",
                (emb, uuid.uuid4().hex),
            ).fetchone()
            assert r is not None
            pids[m.prompt_id] = r[0]
        b = conn.execute(
            "INSERT INTO cache_blobs (kind, uri, codec, bytes, model_key, tenant) "
            "VALUES ('state', NULL, 'virtual', %s, 'm', 't') RETURNING id",
            (m.bytes,),
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


def _random_metas(rng: np.random.Generator, n: int, prompts: int) -> list[StateMeta]:
    out = []
    for i in range(n):
        created = float(rng.uniform(0, 1000))
        out.append(
            StateMeta(
                id=i + 1,
                prompt_id=int(rng.integers(1, prompts + 1)),
                k=int(rng.choice([5, 10, 15, 20, 25])),
                bytes=int(rng.integers(50, 150)),
                hits=int(rng.integers(0, 4)),
                dhits=float(rng.uniform(0.01, 5)),
                dhits_ts=float(created + rng.uniform(0, 500)),
                created_ts=created,
                last_used_ts=float(created + rng.uniform(0, 800)),
            )
        )
    # (prompt, k) must be unique
    seen: set[tuple[int, int]] = set()
    return [m for m in out if (m.prompt_id, m.k) not in seen and not seen.add((m.prompt_id, m.k))]  # type: ignore[func-returns-value]


@pytest.mark.parametrize("name", ["paper", "ours", "lru", "lfu", "fifo"])
def test_sql_order_matches_python(pg_url: str, name: str) -> None:
    rng = np.random.default_rng(7)
    metas = _random_metas(rng, 120, 30)
    pol: EvictionPolicy = make_policy(name, half_life_s=300.0, min_states_per_prompt=2)
    now = 1500.0
    with psycopg.connect(pg_url) as conn:
        ids = _load(conn, metas)
        back = {v: k for k, v in ids.items()}
        order = ", ".join(f"{t} ASC" for t in pol.sql_key_terms())
        rows = conn.execute(
            f"SELECT s.id FROM cache_states s ORDER BY {order}", {"now": now, "half_life": pol.half_life_s}
        ).fetchall()
    sql_order = [back[r[0]] for r in rows]
    # Ids are inserted in meta order, so the final id tie-break agrees too.
    py_order = [m.id for m in sorted(metas, key=lambda m: pol.key(m, now))]
    assert sql_order == py_order


@pytest.mark.parametrize("name", ["paper", "ours", "lru", "ours_high_k", "ours_no_floor"])
@pytest.mark.parametrize("keep_fraction", [0.6, 0.2, 0.0])
def test_sql_eviction_matches_python(pg_url: str, name: str, keep_fraction: float) -> None:
    from psycopg_pool import ConnectionPool

    rng = np.random.default_rng(11)
    metas = _random_metas(rng, 150, 40)
    if name == "ours_high_k":
        pol = make_policy("ours", half_life_s=300.0, min_states_per_prompt=2, floor_keeps="high_k")
    elif name == "ours_no_floor":  # the default: no per-prompt ranking, the bounded top-N alone
        pol = make_policy("ours", half_life_s=300.0, min_states_per_prompt=0)
    else:
        pol = make_policy(name, half_life_s=300.0, min_states_per_prompt=2)
    now = 1500.0
    total = sum(m.bytes for m in metas)
    budget = int(total * keep_fraction)
    expected = set(pol.evict_candidates(metas, total - budget, now))
    with psycopg.connect(pg_url) as conn:
        ids = _load(conn, metas)
    with ConnectionPool(pg_url, min_size=1, max_size=1, kwargs={"autocommit": True}) as pool:
        res = CacheIndex(pool).evict_to_budget(pol, budget, now, batch=7)  # small batches: many transactions
        with pool.connection() as conn:
            left = {r[0] for r in conn.execute("SELECT id FROM cache_states")}
            remaining = conn.execute("SELECT coalesce(sum(bytes), 0) FROM cache_blobs").fetchone()
            empty_prompts = conn.execute(
                "SELECT count(*) FROM cache_prompts p WHERE NOT EXISTS "
                "(SELECT 1 FROM cache_states s WHERE s.prompt_id = p.id)"
            ).fetchone()
    evicted = {m for m, rid in ids.items() if rid not in left}
    assert evicted == expected
    assert remaining is not None and remaining[0] <= budget
    assert res["states"] == len(expected) and res["bytes"] == total - remaining[0]
    assert empty_prompts == (0,)  # a prompt goes with its last state
