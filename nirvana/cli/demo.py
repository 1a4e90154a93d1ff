"""The main job: drive a realistic workload through the HTTP API and report what the cache bought.

The client side of ``nirvana demo`` and ``nirvana bench e2e``; it lives beside those commands (the service never
imports it). ``run_workload`` submits a ``workload.generate`` stream with closed-loop users (a user sends the next
request only after the previous one finished — that is how people iterate on prompts), reports each finished job
to a callback (the commands' live progress), and summarises hit rate, steps saved, latency p50/p95/p99 (overall
and per tier), throughput and service overhead (job wall time minus engine time). The gallery puts each
approximate hit beside its source and a full generation of the same prompt and seed. ``direct_engine_replay``
(``nirvana bench e2e``) runs the same jobs through the engine in-process right after, so service latency and bare
engine time are compared side by side in one run.
"""

from __future__ import annotations

import html
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nirvana.service.client import ApiError, Client
from nirvana.service.workload import Request, generate, reuse_stats

if TYPE_CHECKING:
    from nirvana.engine.engine import DiffusionEngine

TIERS: tuple[str, ...] = ("miss", "approximate", "exact")


@dataclass
class Outcome:
    request: Request
    job: dict[str, Any] | None
    latency_s: float
    error: str | None = None


@dataclass
class DemoResult:
    outcomes: list[Outcome]
    wall_s: float
    summary: dict[str, Any] = field(default_factory=dict)


def percentile(xs: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of ``xs``; None if empty."""
    if not xs:
        return None
    s = sorted(xs)
    idx = min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))
    return s[idx]


def run_workload(
    clients: dict[str, Client],
    requests: list[Request],
    concurrency: int = 4,
    on_done: Callable[[Outcome], None] | None = None,
    timeout_s: float = 600.0,
) -> DemoResult:
    """Run ``requests`` with ``concurrency`` closed-loop user slots; ``clients`` maps tenant → client.

    Invariant: requests of one user run one at a time, in stream order; otherwise the stream order is kept as
    far as free slots allow.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    lock = threading.Lock()
    pending = list(requests)
    busy: set[str] = set()
    outcomes: list[Outcome] = []
    cv = threading.Condition(lock)

    def next_request() -> Request | None:
        with cv:
            while True:
                if not pending:
                    return None
                for i, r in enumerate(pending):
                    if r.user not in busy:
                        busy.add(r.user)
                        return pending.pop(i)
                cv.wait(0.5)

    def worker() -> None:
        while (r := next_request()) is not None:
            c = clients[r.tenant]
            t0 = time.perf_counter()
            try:
                job = c.generate(timeout_s=timeout_s, **r.body())
                out = Outcome(r, job, time.perf_counter() - t0, None if job["status"] == "done" else job["error"])
            except (ApiError, TimeoutError, OSError) as e:
                out = Outcome(r, None, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
            with cv:
                outcomes.append(out)
                busy.discard(r.user)
                cv.notify_all()
            if on_done is not None:
                on_done(out)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res = DemoResult(sorted(outcomes, key=lambda o: o.request.index), time.perf_counter() - t0)
    res.summary = summarize(res)
    return res


def latency_stats(xs: list[float]) -> dict[str, Any]:
    """``jobs`` and p50/p95/p99 seconds (None when empty), rounded to 0.1 ms."""
    out: dict[str, Any] = {"jobs": len(xs)}
    for q in (50, 95, 99):
        v = percentile(xs, q)
        out[f"p{q}_s"] = None if v is None else round(v, 4)
    return out


def _replay(engine: DiffusionEngine, job: dict[str, Any], start: Any = None, capture: list[int] | None = None) -> Any:
    """One job's generation through ``engine`` (its prompt, negative prompt, seed, steps, guidance and size)."""
    return engine.generate(
        [job["prompt"]],
        seeds=[job["seed"]],
        negative_prompts=[job["negative_prompt"]],
        steps=job["steps"],
        guidance=job["guidance"],
        height=job["height"],
        width=job["width"],
        start=start,
        capture=capture or [],
    )


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def direct_engine_replay(
    engine: DiffusionEngine,
    res: DemoResult,
    clients: dict[str, Client],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run the finished jobs again through ``engine`` in this process and compare with their service latency.

    A miss replays as a full generation; an approximate hit at K as a resume from the state its source job's
    prompt reaches after K steps (captured here, untimed): the same work the render worker did, without queues,
    HTTP, the database or storage. Exact hits need no engine work and are not replayed. One untimed warm-up run
    first. ``overhead_ratio`` per tier = service p50 / direct p50; ``service_over_direct`` = Σ service latency /
    Σ direct time over the replayed jobs (1.0 = no overhead; concurrency 1 makes it pure overhead).
    """
    done = [o for o in res.outcomes if o.job and o.job["status"] == "done" and o.job["cache"]["tier"] != "exact"]
    direct: dict[str, list[float]] = {t: [] for t in TIERS[:2]}
    service: dict[str, list[float]] = {t: [] for t in TIERS[:2]}
    if done:
        assert done[0].job is not None
        _replay(engine, done[0].job)
    for i, o in enumerate(done):
        job = o.job
        assert job is not None
        tier = job["cache"]["tier"]
        start = None
        if tier == "approximate":
            if not job["cache"].get("source_job_id"):
                continue  # source not visible to this key (a shared pool): nothing to replay from
            src = clients[o.request.tenant].job(job["cache"]["source_job_id"])
            cap = _replay(engine, src, capture=[int(job["cache"]["k"])])
            start = cap.states[0][0]
        t0 = time.perf_counter()
        _replay(engine, job, start=start)
        direct[tier].append(time.perf_counter() - t0)
        service[tier].append(o.latency_s)
        if progress is not None:
            progress(i + 1, len(done))
    p50 = {t: percentile(direct[t], 50) for t in direct}
    s50 = {t: percentile(service[t], 50) for t in service}
    total_direct = sum(sum(v) for v in direct.values())
    total_service = sum(sum(v) for v in service.values())
    return {
        "direct_by_tier": {t: latency_stats(xs) for t, xs in direct.items()},
        "overhead_ratio": {t: _ratio(s50[t], p50[t]) for t in direct},
        "service_over_direct": _ratio(total_service, total_direct),
    }


def summarize(res: DemoResult) -> dict[str, Any]:
    """Hit rate, steps saved, latency and overhead of a finished run (only completed jobs count)."""
    done = [o for o in res.outcomes if o.job is not None and o.job["status"] == "done"]
    tiers = [o.job["cache"]["tier"] for o in done if o.job]
    steps = sum(o.job["steps"] for o in done if o.job)
    saved = sum(o.job["steps"] - (o.job["steps_run"] or 0) for o in done if o.job)
    lat = [o.latency_s for o in done]
    overhead = [
        o.job["timings"]["total_s"] - (o.job["timings"]["engine_s"] or 0.0)
        for o in done
        if o.job and o.job["timings"]["total_s"] is not None
    ]
    # The same, minus the time a routed job waited for a free render worker (a capacity effect, not overhead).
    overhead_nq = [
        o.job["timings"]["total_s"] - (o.job["timings"]["engine_s"] or 0.0) - (o.job["timings"]["wait_render_s"] or 0.0)
        for o in done
        if o.job and o.job["timings"]["total_s"] is not None
    ]
    engine = [o.job["timings"]["engine_s"] or 0.0 for o in done if o.job]
    ks = [o.job["cache"]["k"] for o in done if o.job and o.job["cache"]["tier"] == "approximate"]
    n_done = max(len(done), 1)
    by_tier = {t: [o.latency_s for o in done if o.job and o.job["cache"]["tier"] == t] for t in TIERS}
    stream = reuse_stats([(o.request.prompt, o.request.seed) for o in res.outcomes])

    def r(x: float | None, nd: int = 4) -> float | None:
        return None if x is None else round(x, nd)

    return {
        "jobs": len(res.outcomes),
        "completed": len(done),
        "failed": sum(1 for o in res.outcomes if o.job is None or o.job["status"] != "done"),
        "hit_rate": r((tiers.count("exact") + tiers.count("approximate")) / n_done),
        "exact_rate": r(tiers.count("exact") / n_done),
        "approximate_rate": r(tiers.count("approximate") / n_done),
        "mean_k": r(statistics.fmean(ks), 2) if ks else None,
        "steps_saved_fraction": r(saved / max(steps, 1)),
        "p50_s": r(percentile(lat, 50)),
        "p95_s": r(percentile(lat, 95)),
        "p99_s": r(percentile(lat, 99)),
        "latency_by_tier": {t: latency_stats(xs) for t, xs in by_tier.items()},
        "throughput_jobs_per_s": r(len(done) / max(res.wall_s, 1e-9), 3),
        "wall_s": r(res.wall_s, 2),
        "engine_p50_s": r(percentile(engine, 50)),
        "overhead_p50_s": r(percentile(overhead, 50)),
        "overhead_p99_s": r(percentile(overhead, 99)),
        "overhead_excl_render_wait_p50_s": r(percentile(overhead_nq, 50)),
        "overhead_excl_render_wait_p99_s": r(percentile(overhead_nq, 99)),
        "workload_near_duplicate": r(stream["near_duplicate"], 3),
        "workload_exact_repeat": r(stream["exact_repeat"], 3),
    }


def write_gallery(
    out: Path,
    res: DemoResult,
    clients: dict[str, Client],
    max_items: int = 12,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """``out/index.html``: approximate hits (spread over K) beside their source and a full generation of the
    same prompt and seed (``cache=off``), plus a few exact hits. Returns the HTML path."""
    img_dir = out / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    hits = [o for o in res.outcomes if o.job and o.job["status"] == "done" and o.job["cache"]["tier"] == "approximate"]
    hits = [o for o in hits if o.job and o.job["cache"]["source_job_id"]]
    by_k: dict[int, list[Outcome]] = {}
    for o in hits:
        assert o.job is not None
        by_k.setdefault(int(o.job["cache"]["k"]), []).append(o)
    chosen: list[Outcome] = []
    while len(chosen) < max_items and any(by_k.values()):
        for k in sorted(by_k, reverse=True):
            if by_k[k] and len(chosen) < max_items:
                chosen.append(by_k[k].pop(0))
    rows = []
    for i, o in enumerate(chosen):
        assert o.job is not None
        c = clients[o.request.tenant]
        job = o.job
        src = c.job(job["cache"]["source_job_id"])
        ref = c.generate(
            prompt=job["prompt"], seed=job["seed"], steps=job["steps"], guidance=job["guidance"], cache="off"
        )
        names = {}
        for tag, jid in (("hit", job["id"]), ("source", src["id"]), ("full", ref["id"])):
            p = img_dir / f"{i:03d}-{tag}.png"
            p.write_bytes(c.image(jid))
            names[tag] = p.name
        if progress:
            progress(f"gallery {i + 1}/{len(chosen)}")
        rows.append(
            "<tr>"
            f"<td><img src='img/{names['source']}'><div class='p'>{html.escape(src['prompt'])}</div></td>"
            f"<td><img src='img/{names['hit']}'><div class='p'>{html.escape(job['prompt'])}</div>"
            f"<div class='m'>K={job['cache']['k']} of {job['steps']} · sim {job['cache']['similarity']:.3f} · "
            f"seed {job['seed']}</div></td>"
            f"<td><img src='img/{names['full']}'><div class='m'>full {job['steps']} steps, same seed</div></td>"
            "</tr>"
        )
    s = res.summary
    stats = " · ".join(
        f"{k} {v}"
        for k, v in s.items()
        if k in ("jobs", "completed", "hit_rate", "steps_saved_fraction", "p50_s", "p95_s", "throughput_jobs_per_s")
    )
    page = f"""<!doctype html><meta charset="utf-8"><title>nirvana demo</title>
<style>body{{font-family:sans-serif;margin:2em}} img{{width:128px;height:128px;image-rendering:pixelated}}
td{{vertical-align:top;padding:6px;width:220px}} .p{{font-size:12px}} .m{{font-size:11px;color:#555}}</style>
<h1>nirvana demo</h1><p>{html.escape(stats)}</p>
<p>Each row: the cached source prompt, the new prompt served by resuming the source's state after K steps
(approximate hit), and a full generation of the new prompt with the same seed (no cache).</p>
<table><tr><th>source (cached)</th><th>approximate hit</th><th>full generation</th></tr>{"".join(rows)}</table>
"""
    path = out / "index.html"
    path.write_text(page)
    return path


def demo_requests(n: int, seed: int, run_tag: str, steps: int | None = None) -> list[Request]:
    """The demo's stream: tenants suffixed with ``run_tag`` so each run starts from a cold cache."""
    from nirvana.service.workload import WorkloadConfig

    cfg = WorkloadConfig(tenants=(f"studio-a-{run_tag}", f"studio-b-{run_tag}"), steps=steps)
    return generate(n, seed, cfg)
