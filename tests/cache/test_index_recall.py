"""pgvector HNSW under a namespace filter: recall@1 of near-duplicate queries against brute force, for namespaces
from 75% down to 1% of the rows, with iterative scans (and why they are needed)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import psycopg
import pytest
from psycopg_pool import ConnectionPool

from nirvana.cache.index import DEFAULT_EXACT_SCAN_MAX_ROWS, CacheIndex, Space, configure_connection
from tests.cache.helpers import at_similarity

SIZES = {"big": 3000, "mid": 600, "small": 360, "tiny": 40}
N_QUERIES = 40


@pytest.fixture(scope="module")
def filled(new_database: Callable[..., str]) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    url = new_database()
    rng = np.random.default_rng(3)
    centers = rng.normal(size=(150, 384)).astype(np.float32)
    data: dict[str, np.ndarray] = {}
    with psycopg.connect(url) as conn:
        configure_connection(conn)
        (indexdef,) = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'cache_prompts_hnsw_384'"
        ).fetchone() or ("",)
        conn.execute("DROP INDEX cache_prompts_hnsw_384")  # a bulk build is faster than 4k inserts
        with conn.cursor().copy(
            "COPY cache_prompts (model_key, tenant, embed_space, dim, embedding, prompt, seed, steps, guidance, "
            "width, height, exact_key, created_ts, last_used_ts) FROM STDIN"
        ) as copy:
            for tenant, n in SIZES.items():
                x = centers[rng.integers(0, len(centers), n)] + 0.9 * rng.normal(size=(n, 384)).astype(np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
                data[tenant] = x
                for i, v in enumerate(x):
                    vec = "[" + ",".join(f"{f:.7g}" for f in v) + "]"
                    copy.write_row(("m", tenant, "e", 384, vec, f"p{i}", 0, 50, 7, 32, 32, "x", 0, 0))
        conn.execute(indexdef)
        conn.execute("ANALYZE cache_prompts")
        conn.commit()
    yield url, data


def _queries(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    idx = rng.choice(len(x), N_QUERIES, replace=False)
    q = np.stack([at_similarity(x[i], float(rng.uniform(0.85, 0.97)), rng) for i in idx])
    truth = np.argmax(q @ x.T, axis=1)
    return q, truth


def _ids(conn: psycopg.Connection, tenant: str) -> np.ndarray:  # type: ignore[type-arg]
    return np.array(
        [r[0] for r in conn.execute("SELECT id FROM cache_prompts WHERE tenant = %s ORDER BY id", (tenant,))]
    )


@pytest.mark.parametrize("exact_rows", [0, DEFAULT_EXACT_SCAN_MAX_ROWS])  # HNSW only; small namespaces exact
@pytest.mark.parametrize("ef", [40, 100])
def test_filtered_recall(filled: tuple[str, dict[str, np.ndarray]], ef: int, exact_rows: int) -> None:
    url, data = filled
    rng = np.random.default_rng(ef)
    with ConnectionPool(
        url, min_size=1, max_size=1, kwargs={"autocommit": True}, configure=configure_connection
    ) as pool:
        index = CacheIndex(pool, exact_scan_max_rows=exact_rows)
        with pool.connection() as conn:
            ids = {t: _ids(conn, t) for t in SIZES}
        for tenant, x in data.items():
            q, truth = _queries(x, rng)
            space = Space("m", tenant, "e", 384)
            got = [index.nearest(space, v, ef_search=ef, limit=4) for v in q]
            assert all(g for g in got), f"{tenant}: empty result under the filter"
            recall = np.mean([g[0][0] == ids[tenant][t] for g, t in zip(got, truth, strict=True)])
            # Returned neighbours always belong to the namespace.
            allowed = set(ids[tenant].tolist())
            assert all(pid in allowed for g in got for pid, _ in g)
            assert recall >= (0.9 if ef == 40 else 0.95), f"{tenant} ef={ef}: recall@1 {recall:.2f}"
            if exact_rows >= SIZES[tenant]:  # searched exactly: the brute-force answer
                assert recall == 1.0, f"{tenant}: exact search recall@1 {recall:.2f}"


@pytest.fixture
def hnsw_only(filled: tuple[str, dict[str, np.ndarray]]) -> Iterator[psycopg.Connection]:  # type: ignore[type-arg]
    """A connection inside a transaction where the btree indexes that could serve the namespace filter are
    dropped (rolled back afterwards), so every search goes through the HNSW index."""
    url, _ = filled
    with psycopg.connect(url) as conn:
        configure_connection(conn)
        conn.execute("DROP INDEX cache_prompts_ns")
        conn.execute("DROP INDEX cache_prompts_exact")
        conn.execute("SET LOCAL enable_seqscan = off")
        yield conn
        conn.rollback()


def test_filtered_recall_through_hnsw(
    filled: tuple[str, dict[str, np.ndarray]],
    hnsw_only: psycopg.Connection,  # type: ignore[type-arg]
) -> None:
    """Forced through the HNSW index, iterative scans keep recall for every namespace size; with them off the
    scan yields ef_search rows, the filter then keeps only the ~1% in the tiny namespace, and most queries of
    that namespace get no neighbour at all."""
    _, data = filled
    conn = hnsw_only
    rng = np.random.default_rng(9)
    ids = {t: _ids(conn, t) for t in SIZES}
    probe = (
        "EXPLAIN SELECT id FROM cache_prompts WHERE dim = 384 AND model_key = 'm' AND tenant = 'tiny' "
        "AND embed_space = 'e' ORDER BY embedding::vector(384) <=> %s::vector(384) LIMIT 4"
    )
    plan = "\n".join(r[0] for r in conn.execute(probe, (data["tiny"][0],)))
    assert "cache_prompts_hnsw_384" in plan
    for tenant, x in data.items():
        q, truth = _queries(x, rng)
        got = [CacheIndex.nearest_on(conn, Space("m", tenant, "e", 384), 384, v, ef_search=40) for v in q]
        recall = np.mean([bool(g) and g[0][0] == ids[tenant][t] for g, t in zip(got, truth, strict=True)])
        assert recall >= 0.9, f"{tenant}: recall@1 {recall:.2f} through HNSW"
    # Queries near the big namespace's prompts, filtered to the tiny one: their HNSW neighbourhood holds
    # almost no tiny-namespace rows.
    q, _ = _queries(data["big"], rng)
    truth = np.argmax(q @ data["tiny"].T, axis=1)
    sql = (
        "SELECT id FROM cache_prompts WHERE dim = 384 AND model_key = 'm' AND tenant = 'tiny' AND embed_space = 'e' "
        "ORDER BY embedding::vector(384) <=> %s::vector(384) LIMIT 1"
    )
    tiny = Space("m", "tiny", "e", 384)
    got = [CacheIndex.nearest_on(conn, tiny, 384, v, ef_search=40) for v in q]
    recall = np.mean([bool(g) and g[0][0] == ids["tiny"][t] for g, t in zip(got, truth, strict=True)])
    conn.execute("SET LOCAL hnsw.iterative_scan = off")
    conn.execute("SET LOCAL hnsw.ef_search = 40")
    found = sum(conn.execute(sql, (v,)).fetchone() is not None for v in q)
    print(f"cross-namespace queries: recall@1 {recall:.2f} with iterative scan; {found}/{N_QUERIES} found without")
    assert recall >= 0.8
    assert found < N_QUERIES * 0.5
