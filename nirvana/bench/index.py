"""``nirvana bench index``: the pgvector HNSW index at N prompts — build time, top-1 latency (p50/p99) and
recall@1 of near-duplicate queries at several ``ef_search`` values, without and with a namespace filter.

Vectors are MiniLM embeddings of real prompts (the dreambot traces and the quality prompt sets, read from the
prompts directory, never copied) plus paraphrase-like perturbations of them; queries are fresh perturbations of
indexed prompts. Ground truth is the exact nearest neighbour (brute force), over everything or within the
query's namespace. Namespaces get skewed sizes (50/25/15/9/1 %) so the filter is tested on a small one too.

Per namespace, at the cache's ``ef_search`` (100), fresh near-duplicate queries of that namespace's prompts go
through ``filtered`` (the query the cache ran before session 20: ORDER BY distance under the namespace filter,
the planner choosing the HNSW index with iterative scans or the namespace btree), ``hnsw`` (the same query with
the namespace btrees dropped inside a rolled-back transaction, so it runs through the HNSW index, as the planner
does for larger namespaces or tables) and ``exact``, with the path the cache now takes (exact at
≤ ``exact_scan_max_rows`` prompts). The 1 %-namespace
row (``small_namespace``) does the same with ``queries`` queries in the 1 % namespace: recall@1 and p50/p99.

A fresh database is created for the run (on ``--database-url`` / ``NIRVANA_DATABASE_URL``, or on an embedded
server started in a temporary directory) and dropped afterwards.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
import random
import re
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

NAMESPACE_SHARES = (0.50, 0.25, 0.15, 0.09, 0.01)
MODIFIERS = (
    "highly detailed", "4k", "trending on artstation", "digital art", "octane render", "cinematic lighting",
    "by greg rutkowski", "concept art", "sharp focus", "unreal engine", "oil painting", "hdr", "artstation",
    "intricate", "studio lighting", "8k", "photorealistic", "by alphonse mucha", "matte painting", "vibrant",
)  # fmt: skip


def prompts_dir() -> Path:
    """``NIRVANA_PROMPTS_DIR``, else ``../shared/data/prompts`` from the working directory, else
    ``/work/shared/data/prompts``."""
    env = os.environ.get("NIRVANA_PROMPTS_DIR")
    for c in ([Path(env)] if env else []) + [Path.cwd().parent / "shared/data/prompts",
                                             Path("/work/shared/data/prompts")]:  # fmt: skip
        if c.is_dir():
            return c
    raise FileNotFoundError("prompts directory not found; set NIRVANA_PROMPTS_DIR")


def load_prompts(directory: Path | None = None, limit: int | None = None, seed: int = 0) -> list[str]:
    """Unique non-empty prompts (≤ 500 chars) from the dreambot traces and the prompt sets, shuffled."""
    d = directory or prompts_dir()
    seen: dict[str, None] = {}

    def add(p: str | None) -> None:
        p = (p or "").strip()
        if p and len(p) <= 500:
            seen.setdefault(p, None)

    for f in sorted((d / "sd-discord-dreambot").glob("*.trace.csv.gz")):
        with gzip.open(f, "rt", encoding="utf-8", errors="replace") as fh:
            for row in csv.DictReader(fh):
                add(row.get("prompt"))
    for f, delim, col in (
        (d / "parti-prompts/PartiPrompts.tsv", "\t", "Prompt"),
        (d / "drawbench/drawbench.csv", ",", "Prompt"),
        (d / "krea-open-prompts-1k/1k.csv", ",", "prompt"),
    ):
        if f.exists():
            with f.open(encoding="utf-8", errors="replace") as fh:
                for row in csv.DictReader(fh, delimiter=delim):
                    add(row.get(col))
    out = list(seen)
    random.Random(seed).shuffle(out)
    return out[:limit] if limit is not None else out


def perturb(prompt: str, rng: random.Random) -> str:
    """A paraphrase-like variant: 1-2 of drop a word, swap neighbours, add/remove a style modifier, reorder
    comma-separated parts (the edits users make when refining a prompt)."""
    words = prompt.split()
    for _ in range(rng.choice((1, 1, 2))):
        op = rng.randrange(5)
        if op == 0 and len(words) > 3:
            del words[rng.randrange(len(words))]
        elif op == 1 and len(words) > 2:
            i = rng.randrange(len(words) - 1)
            words[i], words[i + 1] = words[i + 1], words[i]
        elif op == 2:
            words += [",", *rng.choice(MODIFIERS).split()]
        elif op == 3:
            parts = [p.strip() for p in re.split(r",", " ".join(words)) if p.strip()]
            if len(parts) > 1:
                rng.shuffle(parts)
                words = ", ".join(parts).split()
            else:
                words.insert(0, rng.choice(("a", "an image of", "a photo of", "painting of")))
        else:
            words.append(rng.choice(MODIFIERS))
    out = " ".join(words).replace(" ,", ",").strip(" ,")
    return out if out and out != prompt else prompt + ", " + rng.choice(MODIFIERS)


def _text_key(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:20]


def _embed_cached(texts: list[str], cache_dir: Path | None, embedder: Any, chunk: int = 2048) -> np.ndarray:
    """Embeddings of ``texts``, memoised on disk (keyed by a hash of the texts) to make reruns cheap.

    Embedded in chunks with a progress bar, each chunk saved as it finishes: 100k real prompts take about an
    hour on 2 cores, and an interrupted run resumes from the chunks already on disk.
    """
    path = cache_dir / f"emb-{embedder.space}-{_text_key(texts)}.npy" if cache_dir else None
    if path is not None and path.exists():
        return np.load(path)
    from tqdm import tqdm

    parts = []
    for i in tqdm(range(0, len(texts), chunk), desc="embed", unit="chunk", disable=len(texts) <= chunk):
        part = texts[i : i + chunk]
        cpath = cache_dir / "chunks" / f"emb-{embedder.space}-{_text_key(part)}.npy" if cache_dir else None
        if cpath is not None and cpath.exists():
            parts.append(np.load(cpath))
            continue
        parts.append(embedder.embed(part))
        if cpath is not None:
            cpath.parent.mkdir(parents=True, exist_ok=True)
            np.save(cpath, parts[-1])
    x = np.concatenate(parts) if parts else embedder.embed([])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, x)
    return x


@contextmanager
def fresh_database(database_url: str | None) -> Iterator[str]:
    """A new, migrated database on ``database_url``'s server (or an embedded one), dropped on exit."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from nirvana.cache.migrate import migrate

    server = None
    tmp = None
    if not database_url:
        from nirvana.embedded.postgres import EmbeddedPostgres

        tmp = tempfile.mkdtemp(prefix="nirvana-bench-pg-")
        server = EmbeddedPostgres(Path(tmp) / "data", fast=True, delete_on_stop=True)
        database_url = server.start()
    name = f"nirvana_bench_{os.getpid()}_{int(time.time())}"
    params = conninfo_to_dict(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo("", **{**params, "dbname": name})
    try:
        migrate(url)
        yield url
    finally:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if server is not None:
            server.stop()
        if tmp is not None:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run_index_bench(
    n: int,
    ef_values: tuple[int, ...] = (10, 20, 40, 100, 200),
    queries: int = 300,
    database_url: str | None = None,
    perturbed_share: float = 0.2,
    seed: int = 0,
    cache_dir: Path | None = None,
    embedder: Any = None,
    print_table: bool = True,
    exact_scan_max_rows: int | None = None,
    ns_queries: int = 50,
) -> dict[str, Any]:
    """Fill a fresh index with ``n`` embeddings and measure it; returns a JSON-able dict.

    ``exact_scan_max_rows`` (default: the cache's) decides the path the per-namespace rows report as the
    cache's; ``ns_queries`` is the number of queries per namespace in that table.

    Raises:
        ValueError: ``n`` < 100, ``queries`` < 10, or an ``ef_search`` outside 1..1000.
    """
    import psycopg

    from nirvana.cache.embedder import MiniLMEmbedder
    from nirvana.cache.index import DEFAULT_EXACT_SCAN_MAX_ROWS, CacheIndex, Space, configure_connection

    if n < 100:
        raise ValueError(f"n must be >= 100, got {n}")
    if queries < 10:
        raise ValueError(f"queries must be >= 10, got {queries}")
    for ef in ef_values:
        if not 1 <= ef <= 1000:
            raise ValueError(f"ef_search values must be in 1..1000, got {ef}")
    rng = random.Random(seed)
    embedder = embedder or MiniLMEmbedder(batch_size=128)
    n_base = max(1, int(n * (1 - perturbed_share)))
    base = load_prompts(limit=n_base, seed=seed)
    n_base = len(base)
    texts = base + [perturb(base[rng.randrange(n_base)], rng) for _ in range(n - n_base)]
    src_of_query = [rng.randrange(n_base) for _ in range(queries)]
    qtexts = [perturb(base[i], rng) for i in src_of_query]
    t0 = time.perf_counter()
    x = _embed_cached(texts, cache_dir, embedder)
    qx = _embed_cached(qtexts, cache_dir, embedder)
    embed_s = time.perf_counter() - t0
    # Skewed namespace sizes; a query's namespace is that of the prompt it perturbs.
    ns_names = [f"t{i}" for i in range(len(NAMESPACE_SHARES))]
    ns_of = np.asarray(rng.choices(range(len(NAMESPACE_SHARES)), weights=NAMESPACE_SHARES, k=n))
    # Every namespace gets some queries: the tiny one is where filtering breaks first.
    q_ns = ns_of[src_of_query].copy()
    tiny = len(NAMESPACE_SHARES) - 1
    tiny_idx = [i for i in range(n_base) if ns_of[i] == tiny]
    for j in range(0, queries, 10):
        if tiny_idx:
            src_of_query[j] = tiny_idx[j % len(tiny_idx)]
            q_ns[j] = tiny
            qx[j] = embedder.embed([perturb(base[src_of_query[j]], rng)])[0]
    sims = qx @ x.T
    truth_all = sims.argmax(1)
    masked = np.where(ns_of[None, :] == q_ns[:, None], sims, -np.inf)
    truth_ns = masked.argmax(1)
    res: dict[str, Any] = {"n": n, "dim": int(x.shape[1]), "queries": queries, "embed_s": round(embed_s, 2),
                           "namespace_shares": list(NAMESPACE_SHARES), "results": []}  # fmt: skip
    with fresh_database(database_url) as url, psycopg.connect(url, autocommit=True) as conn:
        configure_connection(conn)
        (indexdef,) = conn.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'cache_prompts_hnsw_384'"
        ).fetchone() or ("",)
        conn.execute("DROP INDEX IF EXISTS cache_prompts_hnsw_384")
        t0 = time.perf_counter()
        buf = io.StringIO()
        for i in range(n):
            vec = "[" + ",".join(f"{v:.6g}" for v in x[i]) + "]"
            buf.write(f"bench\t{ns_names[ns_of[i]]}\t{embedder.space}\t{x.shape[1]}\t{vec}\tp{i}\t0\t50\t7\t"
                      f"512\t512\tk{i}\t0\t0\n")  # fmt: skip
            if buf.tell() > 8 << 20 or i == n - 1:
                with conn.cursor().copy(
                    "COPY cache_prompts (model_key, tenant, embed_space, dim, embedding, prompt, seed, steps, "
                    "guidance, width, height, exact_key, created_ts, last_used_ts) FROM STDIN"
                ) as cp:
                    cp.write(buf.getvalue())
                buf = io.StringIO()
        res["insert_s"] = round(time.perf_counter() - t0, 2)
        ids = np.array([r[0] for r in conn.execute("SELECT id FROM cache_prompts ORDER BY id")])
        t0 = time.perf_counter()
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("SET max_parallel_maintenance_workers = 0")
        conn.execute(indexdef)
        res["build_s"] = round(time.perf_counter() - t0, 2)
        conn.execute("ANALYZE cache_prompts")
        dim = int(x.shape[1])
        for filt in (False, True):
            for ef in ef_values:
                lat: list[float] = []
                hits = empty = 0
                tiny_hits = tiny_n = 0
                for j in range(queries):
                    space = Space("bench", ns_names[q_ns[j]], embedder.space, dim) if filt else None
                    t = time.perf_counter()
                    got = CacheIndex.nearest_on(conn, space, dim, qx[j], ef_search=ef, limit=1)
                    lat.append((time.perf_counter() - t) * 1000)
                    want = ids[(truth_ns if filt else truth_all)[j]]
                    ok = bool(got) and got[0][0] == want
                    hits += ok
                    empty += not got
                    if q_ns[j] == tiny:
                        tiny_n += 1
                        tiny_hits += ok
                row: dict[str, Any] = {"ef_search": ef, "filter": filt, "p50_ms": round(statistics.median(lat), 3),
                       "p99_ms": round(_pct(lat, 0.99), 3), "recall_at_1": round(hits / queries, 4),
                       "empty": empty}  # fmt: skip
                if filt:
                    row["recall_at_1_tiny_ns"] = round(tiny_hits / max(tiny_n, 1), 4)
                    # Which plan the filtered search got per namespace (small ones may use an exact scan).
                    row["hnsw_plan"] = {
                        ns_names[t]: bool(
                            CacheIndex.nearest_on(
                                conn, Space("bench", ns_names[t], embedder.space, dim), dim, qx[0],
                                ef_search=ef, limit=1, explain=True,
                            )[0][1]
                        )
                        for t in range(len(NAMESPACE_SHARES))
                    }  # fmt: skip
                res["results"].append(row)
        # Per-namespace rows and the 1 % row: a separate random stream, so the queries above stay as they were.
        rng_ns = random.Random(seed + 1)
        threshold = DEFAULT_EXACT_SCAN_MAX_ROWS if exact_scan_max_rows is None else exact_scan_max_rows
        res["exact_scan_max_rows"] = threshold
        res["namespaces"] = []
        for t, name in enumerate(ns_names):
            sources = [base[i] for i in range(n_base) if ns_of[i] == t]
            if not sources:  # only at toy sizes
                continue
            space = Space("bench", name, embedder.space, dim)
            nq = queries if t == tiny else ns_queries
            row = _namespace_paths(conn, space, x, ids, ns_of == t, sources, nq, rng_ns, embedder, cache_dir, threshold)
            row["share"] = NAMESPACE_SHARES[t]
            res["namespaces"].append(row)
            if t == tiny:
                res["small_namespace"] = row
    if print_table:
        print(format_index_table(res))
    return res


CACHE_EF_SEARCH = 100  # the cache's default ef_search (NIRVANA_CACHE_EF_SEARCH)


@contextmanager
def _hnsw_only(conn: Any) -> Iterator[None]:
    """Inside a transaction that is rolled back: the btree indexes that could serve the namespace filter dropped
    and sequential scans off, so a filtered nearest-neighbour query can only use the HNSW index."""
    with conn.transaction(force_rollback=True):
        conn.execute("DROP INDEX cache_prompts_ns")
        conn.execute("DROP INDEX cache_prompts_exact")
        conn.execute("SET LOCAL enable_seqscan = off")
        yield


def _namespace_paths(
    conn: Any,
    space: Any,
    x: np.ndarray,
    ids: np.ndarray,
    in_ns: np.ndarray,
    sources: list[str],
    n_queries: int,
    rng: random.Random,
    embedder: Any,
    cache_dir: Path | None,
    threshold: int,
) -> dict[str, Any]:
    """Near-duplicate queries of one namespace through both search paths at the cache's ef_search and limit.

    Returns the namespace's rows, the cost of the cache's bounded count, which path the cache takes, the plan of
    the filtered query (``filtered_plan``: ``hnsw`` or ``btree``), and per path (``filtered``, ``hnsw``,
    ``exact``) recall@1 against brute force within the namespace, p50/p99 ms, and queries with no result.
    """
    from contextlib import nullcontext

    from nirvana.cache.index import CacheIndex

    qtexts = [perturb(sources[rng.randrange(len(sources))], rng) for _ in range(n_queries)]
    qx = _embed_cached(qtexts, cache_dir, embedder)
    rows = np.flatnonzero(in_ns)
    truth = ids[rows[(qx @ x[rows].T).argmax(1)]]
    t = time.perf_counter()
    count = CacheIndex.count_rows_on(conn, space, threshold + 1)
    count_ms = (time.perf_counter() - t) * 1000
    plan = CacheIndex.nearest_on(conn, space, space.dim, qx[0], ef_search=CACHE_EF_SEARCH, explain=True)
    out: dict[str, Any] = {
        "namespace": space.tenant,
        "rows": len(rows),
        "queries": n_queries,
        "count_ms": round(count_ms, 3),
        "cache_path": "exact" if count <= threshold else "hnsw",
        "filtered_plan": "hnsw" if plan[0][1] else "btree",
    }
    for path in ("filtered", "hnsw", "exact"):
        lat: list[float] = []
        hits = empty = 0
        with _hnsw_only(conn) if path == "hnsw" else nullcontext():
            if path == "hnsw":
                plan = CacheIndex.nearest_on(conn, space, space.dim, qx[0], ef_search=CACHE_EF_SEARCH, explain=True)
                assert plan[0][1], "the forced path must use the HNSW index"
            for j in range(n_queries):
                t = time.perf_counter()
                got = CacheIndex.nearest_on(conn, space, space.dim, qx[j], ef_search=CACHE_EF_SEARCH, limit=4,
                                            exact=path == "exact")  # fmt: skip
                lat.append((time.perf_counter() - t) * 1000)
                hits += bool(got) and got[0][0] == truth[j]
                empty += not got
        out[path] = {"recall_at_1": round(hits / n_queries, 4), "p50_ms": round(statistics.median(lat), 3),
                     "p99_ms": round(_pct(lat, 0.99), 3), "empty": empty}  # fmt: skip
    return out


def format_index_table(res: dict[str, Any]) -> str:
    lines = [
        f"HNSW index: n={res['n']} dim={res['dim']} queries={res['queries']} "
        f"(embed {res['embed_s']}s, insert {res['insert_s']}s, build {res['build_s']}s)",
        f"{'filter':>8} {'ef_search':>9} {'p50 ms':>8} {'p99 ms':>8} {'recall@1':>9} {'tiny ns':>8} {'empty':>6}",
    ]
    plans = ""
    for r in res["results"]:
        if "hnsw_plan" in r:
            plans = ", ".join(f"{k}={'hnsw' if v else 'exact'}" for k, v in r["hnsw_plan"].items())
        tiny = f"{r['recall_at_1_tiny_ns']:.3f}" if "recall_at_1_tiny_ns" in r else "-"
        lines.append(
            f"{'ns' if r['filter'] else 'none':>8} {r['ef_search']:>9} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['recall_at_1']:>9.3f} {tiny:>8} {r['empty']:>6}"
        )
    if plans:
        lines.append(f"filtered plans (namespace shares {res['namespace_shares']}): {plans}")
    if res.get("namespaces"):
        lines.append(
            f"per namespace, ef_search {CACHE_EF_SEARCH}, limit 4 (cache: exact at <= {res['exact_scan_max_rows']} "
            "rows); recall@1 and p50 / p99 ms per path:"
        )
        lines.append(f"{'ns':>4} {'share':>6} {'rows':>8} {'count ms':>9} {'cache':>6} {'filtered (plan)':>16} "
                     f"{'p50 / p99':>15} {'hnsw':>6} {'p50 / p99':>15} {'exact':>6} {'p50 / p99':>15} "
                     f"{'queries':>8}")  # fmt: skip
        for r in res["namespaces"]:
            f, h, e = r["filtered"], r["hnsw"], r["exact"]
            lines.append(
                f"{r['namespace']:>4} {r['share']:>6.2f} {r['rows']:>8} {r['count_ms']:>9.2f} {r['cache_path']:>6} "
                f"{f['recall_at_1']:>8.3f} ({r['filtered_plan']:>5}) {f['p50_ms']:>7.2f} / {f['p99_ms']:<6.2f}"
                f"{h['recall_at_1']:>6.3f} {h['p50_ms']:>7.2f} / {h['p99_ms']:<6.2f}"
                f"{e['recall_at_1']:>6.3f} {e['p50_ms']:>7.2f} / {e['p99_ms']:<6.2f} {r['queries']:>8}"
            )
    if res.get("small_namespace"):
        sn = res["small_namespace"]
        used = sn[sn["cache_path"]]
        lines.append(
            f"1 % namespace ({sn['rows']} rows, {sn['queries']} queries): cache ({sn['cache_path']}) recall@1 "
            f"{used['recall_at_1']:.3f}, p50 {used['p50_ms']:.2f} ms, p99 {used['p99_ms']:.2f} ms; filtered "
            f"({sn['filtered_plan']}) {sn['filtered']['recall_at_1']:.3f} ({sn['filtered']['p50_ms']:.2f} / "
            f"{sn['filtered']['p99_ms']:.2f} ms); through HNSW {sn['hnsw']['recall_at_1']:.3f} "
            f"({sn['hnsw']['p50_ms']:.2f} / {sn['hnsw']['p99_ms']:.2f} ms)"
        )
    return "\n".join(lines)


def main_json(res: dict[str, Any]) -> str:
    return json.dumps(res, separators=(",", ":"))
