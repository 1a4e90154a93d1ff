"""``nirvana bench router``: routing throughput and latency through the real router path, batch 1 vs batched.

One embedded PostgreSQL (+ pgvector) and Redis; for each router batch size a real ``python -m workers.router``
process (``NIRVANA_ROUTE_MAX_BATCH`` = that size) and the real API (uvicorn) in front. Jobs are submitted through
``POST /v1/batches`` (the API enqueues one route task per job, as for any client); a served model is registered
whose render queue nobody consumes, so what is measured is routing alone: claim, embedding, exact tier, gate,
pgvector lookup, plan, render message. Timestamps come from the jobs table (``created_at`` → ``routed_at``).

Per batch size, two runs on prompts of the dreambot trace (read from the evaluation data, never copied; the demo
world's prompts when it is absent): **throughput** (``--jobs`` submitted at once; prompts/s from the first
``created_at`` to the last ``routed_at``) and **latency at load** (``--jobs`` more, submitted in batches of 10 at
a fixed offered rate, ``--rate`` prompts/s; p50/p99 of routed_at − created_at).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def bench_prompts(n: int, seed: int = 0) -> tuple[list[str], str]:
    """``n`` prompts in trace order (cycled if the trace is shorter) and where they came from."""
    from nirvana.bench.trace import default_trace_files, read_trace

    files = default_trace_files()
    if files:
        reqs, _ = read_trace(files[0], limit=n)
        prompts = [r.prompt for r in reqs]
        return [prompts[i % len(prompts)] for i in range(n)], files[0].name
    from nirvana.service.workload import generate

    return [r.prompt for r in generate(n, seed)], "demo workload (no trace data on this machine)"


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))], 4)


def _wait_routed(pool: Any, batch_ids: list[str], n: int, timeout_s: float) -> list[tuple[float, float]]:
    """(created, routed) epoch seconds of the batches' jobs once all ``n`` left routing."""
    deadline = time.monotonic() + timeout_s
    while True:
        with pool.connection() as c:
            rows = c.execute(
                "SELECT extract(epoch FROM created_at) AS c, extract(epoch FROM routed_at) AS r, status FROM jobs "
                "WHERE batch_id = ANY(%s)",
                (batch_ids,),
            ).fetchall()
        left = [r for r in rows if r["status"] in ("queued", "routing")]
        if len(rows) == n and not left:
            return [(float(r["c"]), float(r["r"])) for r in rows if r["r"] is not None]
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(left)} of {n} jobs still not routed after {timeout_s:.0f} s")
        time.sleep(0.2)


def run_router_bench(
    batch_sizes: Sequence[int] = (1, 32),
    jobs: int = 400,
    rate: float = 200.0,
    router_threads: int = 0,
    progress: Callable[[str], None] | None = None,
    evict_states: int = 0,
    evict_rate: float = 20.0,
) -> dict[str, Any]:
    """Measure each router batch size (see the module docstring). With ``evict_states``, also route 200 jobs at
    ``evict_rate`` with the last batch size twice — alone, and while a maintenance worker evicts that many
    cached states — and compare route latency side by side. Raises ``ValueError`` for bad options."""
    if jobs < 10:
        raise ValueError(f"--jobs must be >= 10, got {jobs}")
    if rate <= 0:
        raise ValueError(f"--rate must be > 0, got {rate}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be integers >= 1, got {list(batch_sizes)}")
    from nirvana.embedded.postgres import free_port
    from nirvana.embedded.stack import Stack, StackConfig
    from nirvana.service.client import Client
    from nirvana.service.jobs import make_pool
    from nirvana.service.keys import create_key
    from nirvana.service.models import ServedModel, register

    say = progress or (lambda _m: None)
    prompts, source = bench_prompts(2 * jobs * len(batch_sizes) + (400 if evict_states else 0))
    say("embedding alone (the ceiling of a router that did nothing else)")
    ceilings = embedding_ceilings(prompts[:jobs], batch_sizes, router_threads)
    evict: dict[str, Any] | None = None
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nirvana-bench-router-") as tmp:
        env = {
            "NIRVANA_CACHE_NOVELTY_GATE": "false",
            "NIRVANA_ROUTER_THREADS": str(router_threads),
            "NIRVANA_RATE_LIMIT_JOBS_PER_S": "0",
            "NIRVANA_RATE_LIMIT_REQUESTS_PER_S": "0",
            "NIRVANA_REAPER_REQUEUE_S": "3600",
        }
        stack = Stack(StackConfig(data_dir=Path(tmp), fast_postgres=True, env=env, beat=False))
        stack.start_services()
        pool = make_pool(stack.database_url, max_size=2, name="bench-router")
        try:
            model = ServedModel("bench", "bench", "bench@router", "ddim", 32, 32, 8, 1.0, "render.bench-router")
            register(pool, model)
            key = create_key(pool, "bench-router", name="bench router")
            port = free_port()
            api = stack.spawn("api", [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory",
                                      "--host", "127.0.0.1", "--port", str(port), "--no-access-log"])  # fmt: skip
            client = Client(f"http://127.0.0.1:{port}", key, timeout_s=120)
            _wait_http(f"http://127.0.0.1:{port}", api)
            used = 0
            for b in batch_sizes:
                say(f"router batch {b}: starting the worker")
                router = stack.spawn(f"router-b{b}", [sys.executable, "-m", "workers.router"],
                                     {"NIRVANA_ROUTE_MAX_BATCH": str(b)})  # fmt: skip
                _wait_router(pool, router)
                # Throughput: everything at once.
                chunk = prompts[used : used + jobs]
                used += jobs
                t0 = time.time()
                ids = [client.submit_batch([{"prompt": p, "steps": 50, "seed": i} for i, p in enumerate(chunk)])["id"]]
                post_s = time.time() - t0  # the API's insert + one route message per job, overlapping routing
                times = _wait_routed(pool, ids, jobs, 900)
                wall = max(r for _, r in times) - min(c for c, _ in times)
                thr = jobs / wall
                say(f"router batch {b}: {thr:.1f} prompts/s")
                # Latency at a fixed offered rate, 10 jobs per request.
                chunk = prompts[used : used + jobs]
                used += jobs
                offered, lat = _latency_run(client, pool, chunk, rate)
                rows.append(
                    {
                        "route_max_batch": b,
                        "prompts_per_s": round(thr, 1),
                        "burst_wall_s": round(wall, 2),
                        "burst_post_s": round(post_s, 2),
                        "offered_rate_per_s": round(offered, 1),
                        "latency_p50_s": _pct(lat, 50),
                        "latency_p99_s": _pct(lat, 99),
                        "latency_mean_s": round(statistics.fmean(lat), 4),
                        "submit_s": round(time.time() - t0, 1),
                        "embed_only_prompts_per_s": ceilings[b],
                        "of_embed_only": round(thr / ceilings[b], 2),
                    }
                )
                say(f"router batch {b}: p50 {rows[-1]['latency_p50_s']} s, p99 {rows[-1]['latency_p99_s']} s")
                if evict_states and b == batch_sizes[-1]:
                    evict = _eviction_side_by_side(stack, pool, client, prompts[used:], evict_states, evict_rate, say)
                router.stop()
            client.close()
        finally:
            pool.close()
            stack.stop()
    base = rows[0]["prompts_per_s"]
    for r in rows:
        r["ratio_vs_first"] = round(r["prompts_per_s"] / base, 2) if base else None
    return {"bench": "router", "prompts": source, "jobs_per_run": jobs, "rate": rate, "rows": rows, "eviction": evict}


def embedding_ceilings(prompts: list[str], batch_sizes: Sequence[int], threads: int) -> dict[int, float]:
    """Prompts/s of the router's embedder alone (``MiniLMEmbedder``, ``threads`` torch threads as the router
    sets them, 0: torch's default) on ``prompts`` in calls of each batch size, in this process before any
    service runs: what a router could reach if claiming, lookup, plan and messages cost nothing."""
    import torch

    from nirvana.cache.embedder import MiniLMEmbedder

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        emb = MiniLMEmbedder()  # loaded once, for every batch size
        out: dict[int, float] = {}
        for batch in batch_sizes:
            emb.embed(prompts[:batch])  # warm up at this size
            t0 = time.perf_counter()
            for i in range(0, len(prompts), batch):
                emb.embed(prompts[i : i + batch])
            out[batch] = round(len(prompts) / (time.perf_counter() - t0), 1)
        return out
    finally:
        torch.set_num_threads(before)


def _latency_run(client: Any, pool: Any, prompts: list[str], rate: float) -> tuple[float, list[float]]:
    """Submit ``prompts`` 10 per request at ``rate`` per second; (offered rate, route latencies)."""
    ids = []
    t_start = time.monotonic()
    for i in range(0, len(prompts), 10):
        time.sleep(max(0.0, t_start + i / rate - time.monotonic()))
        body = [{"prompt": p, "steps": 50, "seed": i + j} for j, p in enumerate(prompts[i : i + 10])]
        ids.append(client.submit_batch(body)["id"])
    offered = len(prompts) / max(time.monotonic() - t_start, 1e-9)
    return offered, [r - c for c, r in _wait_routed(pool, ids, len(prompts), 900)]


def _states(pool: Any) -> int:
    with pool.connection() as c:
        return int(c.execute("SELECT count(*) AS n FROM cache_states").fetchone()["n"])


def _eviction_side_by_side(
    stack: Any, pool: Any, client: Any, prompts: list[str], n_states: int, rate: float, say: Callable[[str], None]
) -> dict[str, Any]:
    """Route 200 jobs alone, then 200 more while the maintenance worker evicts ``n_states`` cached states."""
    import numpy as np

    from nirvana.cache.core import ApproximateCache, CacheRequest, Namespace
    from nirvana.cache.embedder import MiniLMEmbedder
    from nirvana.cache.policy import KPolicy
    from nirvana.cache.store import LatentStore

    say(f"eviction: caching {n_states} states (5 per prompt, no objects)")
    rng = np.random.default_rng(0)
    cache = ApproximateCache(
        stack.database_url, LatentStore(str(stack.data_dir / "blobs")), MiniLMEmbedder(), KPolicy.paper(),
        budget_bytes=10**15, pool_size=2,
    )  # fmt: skip
    ns = Namespace("bench-evict-32x32-ddim", "filler")
    try:
        for i in range(n_states // 5):
            emb = rng.normal(size=384).astype(np.float32)
            req = CacheRequest(f"filler {i}", "", i, 50, 7.0, 32, 32, ns, embedding=emb / np.linalg.norm(emb))
            cache.record_virtual(f"fill-{i}", req, None, bytes_per_state=4096, steps_k=[5, 10, 15, 20, 25])
    finally:
        cache.close()
    cached = _states(pool)
    say("eviction: routing alone")
    _, quiet = _latency_run(client, pool, prompts[:200], rate)
    maint = stack.spawn("maintenance", [sys.executable, "-m", "workers.maintenance", "--beat"],
                        {"NIRVANA_CACHE_BUDGET_BYTES": "1", "NIRVANA_BEAT_EVICT_S": "1"})  # fmt: skip
    deadline = time.monotonic() + 300
    while _states(pool) >= cached and time.monotonic() < deadline:  # until eviction is under way
        if not maint.alive:
            raise RuntimeError(f"the maintenance worker exited:\n{maint.tail()}")
        time.sleep(0.2)
    started = time.monotonic()
    before = _states(pool)
    say("eviction: routing while the maintenance worker evicts")
    _, busy = _latency_run(client, pool, prompts[200:400], rate)
    during = before - _states(pool)
    say("eviction: waiting for it to finish")
    while _states(pool) > 0 and time.monotonic() < started + 1800 and maint.alive:
        time.sleep(0.5)
    evict_s = time.monotonic() - started if _states(pool) == 0 else None
    maint.stop()
    p99 = (_pct(quiet, 99), _pct(busy, 99))
    return {
        "states_cached": cached,
        "states_evicted_during_run": during,
        "evict_all_s": None if evict_s is None else round(evict_s, 1),
        "rate": rate,
        "alone_p50_s": _pct(quiet, 50),
        "alone_p99_s": p99[0],
        "evicting_p50_s": _pct(busy, 50),
        "evicting_p99_s": p99[1],
        "p99_ratio": round(p99[1] / p99[0], 3) if p99[0] and p99[1] is not None else None,
    }


def _wait_http(url: str, proc: Any, timeout_s: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive:
            raise RuntimeError(f"the API exited:\n{proc.tail()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the API did not answer /healthz")


def _wait_router(pool: Any, proc: Any, timeout_s: float = 300) -> None:
    """Until this process's heartbeat exists (it starts on Celery's worker_ready: the consumer is up)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive:
            raise RuntimeError(f"the router exited:\n{proc.tail()}")
        with pool.connection() as c:
            row = c.execute(
                "SELECT 1 FROM worker_heartbeats WHERE role = 'router' AND name LIKE %s", (f"%:{proc.proc.pid}",)
            ).fetchone()
        if row is not None:
            return
        time.sleep(0.5)
    raise TimeoutError("the router did not start")


def format_table(res: dict[str, Any]) -> str:
    lines = [
        f"router through the real path ({res['prompts']}; {res['jobs_per_run']} jobs per run)",
        "",
        "| route max batch | prompts/s (burst) | × first | embedding alone (prompts/s) | of it | offered rate "
        "| latency p50 / p99 (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['route_max_batch']} | {r['prompts_per_s']} | {r['ratio_vs_first']} | "
            f"{r['embed_only_prompts_per_s']} | {r['of_embed_only']} | {r['offered_rate_per_s']}/s | "
            f"{r['latency_p50_s']} / {r['latency_p99_s']} |"
        )
    e = res.get("eviction")
    if e:
        lines.append(
            f"\nwhile evicting ({e['states_evicted_during_run']} of {e['states_cached']} states evicted during the "
            f"run, {e['rate']}/s offered): p50 {e['alone_p50_s']} -> {e['evicting_p50_s']} s, "
            f"p99 {e['alone_p99_s']} -> {e['evicting_p99_s']} s (x{e['p99_ratio']}); evicting all took "
            f"{e['evict_all_s']} s"
        )
    return "\n".join(lines)
