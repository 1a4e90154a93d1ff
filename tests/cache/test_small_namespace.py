"""Small namespaces at scale: a namespace under ``exact_scan_max_rows`` is searched exactly, so its near-duplicates
are found even where the filtered HNSW scan spends its budget on another namespace's rows and misses them.

The table is dominated by one namespace, and every query of the small namespace has a crowd of the big
namespace's prompts closer to it than its own near-duplicate (another tenant's variations of a popular prompt,
cached after the small tenant's). A low ``max_scan_tuples`` and ``ef_search`` make the filtered HNSW scan (the
old path, which the planner picks for this table) give up inside the crowd: 9 of 10 queries get no row at all.
The exact path ignores both settings and finds every near-duplicate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg_pool import ConnectionPool

from nirvana.cache.core import Namespace
from nirvana.cache.index import DEFAULT_EXACT_SCAN_MAX_ROWS, CacheIndex, Space, configure_connection
from nirvana.cache.store import LatentStore
from tests.cache.helpers import at_similarity, make_cache, request, unit

MODEL = "m"
SPACE = "minilm-l6-v2"  # the MiniLMEmbedder's space, so ApproximateCache lookups search the same rows
BIG, SMALL = 2000, 1000
TARGETS = 10
CROWD = 200  # big-namespace prompts around each query, closer to it than the target
LOW = {"ef_search": 10, "max_scan_tuples": 20}


@dataclass
class Table:
    url: str
    queries: np.ndarray
    target_ids: list[int]


def _copy(conn: psycopg.Connection, tenant: str, x: np.ndarray) -> None:  # type: ignore[type-arg]
    with conn.cursor().copy(
        "COPY cache_prompts (model_key, tenant, embed_space, dim, embedding, prompt, seed, steps, guidance, width, "
        "height, exact_key, created_ts, last_used_ts) FROM STDIN"
    ) as copy:
        for i, v in enumerate(x):
            vec = "[" + ",".join(f"{f:.7g}" for f in v) + "]"
            copy.write_row((MODEL, tenant, SPACE, 384, vec, f"{tenant}-{i}", 0, 50, 7, 32, 32, "x", 0, 0))


@pytest.fixture(scope="module")
def table(new_database: Callable[..., str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Table]:
    from nirvana.cache.embedder import MiniLMEmbedder

    assert MiniLMEmbedder().space == SPACE
    url = new_database()
    rng = np.random.default_rng(11)
    targets = unit(rng, TARGETS)
    queries = np.stack([at_similarity(v, 0.96, rng) for v in targets])
    with psycopg.connect(url) as conn:
        configure_connection(conn)
        (indexdef,) = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'cache_prompts_hnsw_384'"
        ).fetchone() or ("",)
        conn.execute("DROP INDEX cache_prompts_hnsw_384")  # a bulk build is faster than 4k inserts
        conn.commit()
    # The targets go through the cache (rows with states, so a lookup can hit them); the rest is bulk.
    store = LatentStore(str(tmp_path_factory.mktemp("blobs")))
    ns = Namespace(MODEL, "small")
    target_ids = []
    with make_cache(url, store) as cache:
        for j, v in enumerate(targets):
            out = cache.record_virtual(f"target-{j}", request(v, ns, prompt=f"target-{j}"), None, 1000)
            target_ids.append(int(out["prompt_id"]))
    with psycopg.connect(url) as conn:
        configure_connection(conn)
        _copy(conn, "small", unit(rng, SMALL - TARGETS))
        crowd = [at_similarity(q, float(rng.uniform(0.985, 0.995)), rng) for q in queries for _ in range(CROWD)]
        _copy(conn, "big", np.concatenate([unit(rng, BIG), np.stack(crowd)]))
        conn.execute(indexdef)
        conn.execute("ANALYZE cache_prompts")
        conn.commit()
    yield Table(url, queries, target_ids)


def _pool(url: str) -> ConnectionPool:
    return ConnectionPool(url, min_size=1, max_size=2, kwargs={"autocommit": True}, configure=configure_connection)


def _recall(index: CacheIndex, t: Table, **kw: int) -> float:
    space = Space(MODEL, "small", SPACE, 384)
    got = [index.nearest(space, q, limit=4, **kw) for q in t.queries]
    return float(np.mean([bool(g) and g[0][0] == tid for g, tid in zip(got, t.target_ids, strict=True)]))


def test_old_filtered_hnsw_path_misses(table: Table) -> None:
    with _pool(table.url) as pool, pool.connection() as conn:
        space = Space(MODEL, "small", SPACE, 384)
        # The planner picks the HNSW index for this namespace (1,000 of 5,000 rows) when left to itself.
        plan = CacheIndex.nearest_on(conn, space, 384, table.queries[0], explain=True, ef_search=10, max_scan_tuples=20)
        assert plan == [(0, 1.0)]
        recall = _recall(CacheIndex(pool, exact_scan_max_rows=0), table, **LOW)
    print(f"filtered HNSW (ef 10, max_scan_tuples 20): recall@1 {recall:.2f}")
    assert recall <= 0.3


def test_small_namespace_is_searched_exactly(table: Table) -> None:
    with _pool(table.url) as pool, pool.connection() as conn:
        index = CacheIndex(pool)
        assert index.exact_scan_max_rows == DEFAULT_EXACT_SCAN_MAX_ROWS >= SMALL
        assert _recall(index, table, **LOW) == 1.0
        space = Space(MODEL, "small", SPACE, 384)
        assert index.namespace_rows(space) == SMALL
        assert CacheIndex.nearest_on(conn, space, 384, table.queries[0], explain=True, exact=True) == [(0, 0.0)]
        # Exactly the brute-force top 4, with the namespace's size.
        rows, n = CacheIndex.exact_nearest_on(conn, space, 384, table.queries[3], limit=4)
        x = conn.execute("SELECT id, embedding FROM cache_prompts WHERE tenant = 'small' ORDER BY id").fetchall()
        ids = np.array([r[0] for r in x])
        sims = np.stack([np.asarray(r[1].to_numpy(), np.float32) for r in x]) @ table.queries[3]
        assert n == SMALL and [r[0] for r in rows] == ids[np.argsort(-sims)[:4]].tolist()
        np.testing.assert_allclose([r[1] for r in rows], np.sort(sims)[::-1][:4], atol=1e-5)
        with pytest.raises(ValueError, match="needs a namespace"):
            CacheIndex.nearest_on(conn, None, 384, table.queries[0], exact=True)


def test_cache_lookup_hits_in_small_namespace(table: Table, tmp_path: Path) -> None:
    store = LatentStore(str(tmp_path / "blobs"))
    ns = Namespace(MODEL, "small")
    found = {}
    for rows in (0, DEFAULT_EXACT_SCAN_MAX_ROWS):
        with make_cache(table.url, store, exact_scan_max_rows=rows, **LOW) as cache:
            hits = [cache.lookup(request(q, ns, prompt=f"query-{j}", seed=99)) for j, q in enumerate(table.queries)]
        pairs = zip(hits, table.target_ids, strict=True)
        found[rows] = sum(h.tier == "approximate" and h.source_prompt_id == t for h, t in pairs)
    print(f"near-duplicate hits: {found}")
    assert found[DEFAULT_EXACT_SCAN_MAX_ROWS] == TARGETS and found[0] <= 3


def test_namespace_size_decides_and_follows_changes(table: Table, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = CacheIndex.exact_nearest_on

    def spy(*args: object, **kw: object) -> object:
        calls.append("exact")
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(CacheIndex, "exact_nearest_on", staticmethod(spy))
    rng = np.random.default_rng(5)
    space = Space(MODEL, "grow", SPACE, 384)
    with _pool(table.url) as pool, pool.connection() as conn:
        _copy(conn, "grow", unit(rng, 10))
        conn.commit()
        index = CacheIndex(pool, exact_scan_max_rows=15, size_ttl_s=3600)
        assert index.nearest(space, unit(rng)) and calls == ["exact"] and index.namespace_rows(space) == 10
        _copy(conn, "grow", unit(rng, 10))  # 20 rows now: the next exact search sees it and caches the count
        conn.commit()
        index.nearest(space, unit(rng))
        assert calls == ["exact"] * 2 and index.namespace_rows(space) == 16  # counted up to the threshold + 1
        index.nearest(space, unit(rng))
        assert calls == ["exact"] * 2  # HNSW now
        conn.execute(  # 8 rows left
            "DELETE FROM cache_prompts WHERE id IN (SELECT id FROM cache_prompts WHERE tenant = 'grow' ORDER BY id "
            "LIMIT 12)"
        )
        conn.commit()
        index.nearest(space, unit(rng))
        assert calls == ["exact"] * 2  # a count on the HNSW path is trusted for size_ttl_s
        index.size_ttl_s = 0.0
        index.nearest(space, unit(rng))
        assert calls == ["exact"] * 3 and index.namespace_rows(space) <= 15
        assert CacheIndex(pool, exact_scan_max_rows=0).nearest(space, unit(rng)) and len(calls) == 3  # 0: never
    with pytest.raises(ValueError, match="exact_scan_max_rows"):
        CacheIndex(None, exact_scan_max_rows=-1)
