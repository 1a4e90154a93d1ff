"""Prometheus metrics computed from the jobs table at scrape time.

Postgres holds every job's state, cache outcome and timestamps, so one collector in the API sees what every
router and render process did, with no multi-process metric plumbing. Each scrape runs a few aggregate queries
over ``jobs`` (fine to millions of rows; a larger deployment would prune finished jobs).

Series: ``nirvana_jobs{state}``, ``nirvana_cache_hits_total{tier}``, ``nirvana_cache_k`` (histogram of K over
approximate hits), ``nirvana_steps_total`` / ``nirvana_steps_saved_total``, ``nirvana_stage_seconds{stage}``
(queue, wait_render, render, total, engine), ``nirvana_service_overhead_seconds`` (total − engine), and the
novelty gate's verdicts: ``nirvana_gate_novel_total{tier}`` / ``nirvana_gate_novel_steps_saved_total`` count the
finished jobs it flagged novel and the steps they still saved — in shadow mode (the default) that is what
enforcing the gate would cost (``NIRVANA_CACHE_GATE_ENFORCE``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
K_BUCKETS = (5, 10, 15, 20, 25, 30, 40)
STATES = ("queued", "routing", "routed", "rendering", "done", "failed", "cancelled")

_STAGES = {
    "queue": "extract(epoch FROM routed_at - created_at)",
    "wait_render": "extract(epoch FROM render_started_at - routed_at)",
    "render": "extract(epoch FROM finished_at - render_started_at)",
    "total": "extract(epoch FROM finished_at - created_at)",
    "engine": "engine_s",
    "overhead": "extract(epoch FROM finished_at - created_at) - engine_s",
}


def _hist_sql(expr: str, buckets: tuple[float, ...]) -> str:
    parts = [f"count(*) FILTER (WHERE ({expr}) <= {b}) AS b{i}" for i, b in enumerate(buckets)]
    return (
        f"SELECT {', '.join(parts)}, count({expr}) AS n, coalesce(sum({expr}), 0) AS total FROM jobs "
        "WHERE status = 'done'"
    )


def _buckets(row: Any, buckets: tuple[float, ...]) -> tuple[list[tuple[str, float]], float]:
    vals = list(row.values()) if isinstance(row, dict) else list(row)
    n = len(buckets)
    out = [(str(b), float(vals[i])) for i, b in enumerate(buckets)]
    out.append(("+Inf", float(vals[n])))
    return out, float(vals[n + 1])


class JobsCollector(Collector):
    """Collects from ``pool`` (a psycopg pool) on every scrape."""

    def __init__(self, pool: Any, jobs_per_render_worker: int = 1, live_s: float = 30.0) -> None:
        """``jobs_per_render_worker``: ``NIRVANA_RENDER_MAX_BATCH`` (jobs one render worker renders at once, for
        the backlog estimate); ``live_s``: a worker whose heartbeat is older is not counted."""
        self.pool = pool
        self.jobs_per_render_worker = max(1, jobs_per_render_worker)
        self.live_s = live_s

    def collect(self) -> Iterator[Any]:
        with self.pool.connection() as c:
            states = {
                (r["status"] if isinstance(r, dict) else r[0]): (r["n"] if isinstance(r, dict) else r[1])
                for r in c.execute("SELECT status, count(*) AS n FROM jobs GROUP BY status").fetchall()
            }
            tiers = c.execute(
                # A job without a tier (cache off) is a miss; grouping on the coalesced tier keeps one row per tier.
                "SELECT coalesce(tier, 'miss') AS tier, count(*) AS n, coalesce(sum(steps), 0) AS steps, "
                "coalesce(sum(steps - steps_run), 0) AS saved, count(*) FILTER (WHERE gate_novel) AS novel, "
                "coalesce(sum(steps - steps_run) FILTER (WHERE gate_novel), 0) AS novel_saved "
                "FROM jobs WHERE status = 'done' GROUP BY 1"
            ).fetchall()
            k_row = c.execute(
                _hist_sql("k", tuple(float(b) for b in K_BUCKETS)).replace(
                    "WHERE status = 'done'", "WHERE status = 'done' AND tier = 'approximate'"
                )
            ).fetchone()
            stage_rows = {name: c.execute(_hist_sql(expr, STAGE_BUCKETS)).fetchone() for name, expr in _STAGES.items()}
            faults = c.execute(
                "SELECT count(*) FILTER (WHERE cache_fallback = 'missing') AS missing, "
                "count(*) FILTER (WHERE cache_fallback = 'error') AS error, "
                "count(*) FILTER (WHERE cache_fallback = 'rejected') AS rejected, "
                "count(*) FILTER (WHERE cache_record_error IS NOT NULL) AS record_failed "
                "FROM jobs WHERE cache_fallback IS NOT NULL OR cache_record_error IS NOT NULL"
            ).fetchone()

        g = GaugeMetricFamily("nirvana_jobs", "Jobs by state", labels=["state"])
        for s in STATES:
            g.add_metric([s], float(states.get(s, 0)))
        yield g

        hits = CounterMetricFamily("nirvana_cache_hits", "Finished jobs by cache tier", labels=["tier"])
        steps = CounterMetricFamily("nirvana_steps", "Denoising steps requested by finished jobs")
        saved = CounterMetricFamily("nirvana_steps_saved", "Denoising steps skipped thanks to the cache")
        novel = CounterMetricFamily(
            "nirvana_gate_novel", "Finished jobs the novelty gate flagged novel, by the tier they got", labels=["tier"]
        )
        novel_saved = CounterMetricFamily(
            "nirvana_gate_novel_steps_saved", "Steps still skipped by jobs the gate flagged novel (shadow mode)"
        )
        total_steps = total_saved = total_novel_saved = 0.0
        by_tier = {"exact": (0.0, 0.0), "approximate": (0.0, 0.0), "miss": (0.0, 0.0)}
        for r in tiers:
            d = (
                r
                if isinstance(r, dict)
                else dict(zip(("tier", "n", "steps", "saved", "novel", "novel_saved"), r, strict=True))
            )
            by_tier[d["tier"]] = (float(d["n"]), float(d["novel"]))
            total_steps += float(d["steps"])
            total_saved += float(d["saved"])
            total_novel_saved += float(d["novel_saved"])
        for tier, (n, n_novel) in by_tier.items():
            hits.add_metric([tier], n)
            novel.add_metric([tier], n_novel)
        steps.add_metric([], total_steps)
        saved.add_metric([], total_saved)
        novel_saved.add_metric([], total_novel_saved)
        yield hits
        yield steps
        yield saved
        yield novel
        yield novel_saved

        kb, ksum = _buckets(k_row, tuple(float(b) for b in K_BUCKETS))
        kh = HistogramMetricFamily("nirvana_cache_k", "K (steps skipped) of approximate hits")
        kh.add_metric([], kb, ksum)
        yield kh

        sh = HistogramMetricFamily("nirvana_stage_seconds", "Per-stage latency of finished jobs", labels=["stage"])
        for name, row in stage_rows.items():
            if name == "overhead":
                continue
            b, total = _buckets(row, STAGE_BUCKETS)
            sh.add_metric([name], b, total)
        yield sh
        oh = HistogramMetricFamily(
            "nirvana_service_overhead_seconds", "Job wall time minus engine time (finished jobs)"
        )
        b, total = _buckets(stage_rows["overhead"], STAGE_BUCKETS)
        oh.add_metric([], b, total)
        yield oh

        names = ("missing", "error", "rejected", "record_failed")
        yield from self._queues()
        f = faults if isinstance(faults, dict) else dict(zip(names, faults, strict=True))
        fb = CounterMetricFamily(
            "nirvana_cache_fallbacks",
            "Jobs planned as approximate hits that rendered from noise, by why the state was unusable",
            labels=["reason"],
        )
        for reason in ("missing", "error", "rejected"):
            fb.add_metric([reason], float(f[reason]))
        yield fb
        rf = CounterMetricFamily(
            "nirvana_cache_record_failures", "Finished jobs the cache could not record (the jobs stayed done)"
        )
        rf.add_metric([], float(f["record_failed"]))
        yield rf

    def _queues(self) -> Iterator[Any]:
        """The autoscaling signal per queue, from Postgres (the source of truth), not from Celery's Redis lists,
        which miss the tasks workers have already prefetched:

        * ``nirvana_queue_depth``: jobs waiting for or held by the queue's workers — route: queued + routing;
          render.<key>: routed (in the list or prefetched) + rendering (active);
        * ``nirvana_queue_workers``: workers whose heartbeat is fresh, per queue they consume;
        * ``nirvana_render_backlog_seconds``: the steps those render jobs still have to run × the queue's recent
          seconds per step per job (last 200 finished jobs) ÷ ``jobs_per_render_worker``: seconds one worker
          would need. Scale render workers on this (docs/SERVICE.md, "Scaling out").
        """
        with self.pool.connection() as c:
            depth = c.execute(
                "SELECT CASE WHEN status IN ('queued', 'routing') THEN 'route' ELSE render_queue END AS queue, "
                "count(*) AS n, coalesce(sum(CASE WHEN status IN ('routed', 'rendering') THEN "
                "greatest(steps - greatest(coalesce(progress_step, 0), coalesce(k, 0)), 0) END), 0) AS steps_left "
                "FROM jobs WHERE status IN ('queued', 'routing', 'routed', 'rendering') GROUP BY 1"
            ).fetchall()
            pace = c.execute(
                "SELECT render_queue AS queue, sum(engine_s) / nullif(sum(steps_run), 0) AS s_per_step FROM "
                "(SELECT render_queue, engine_s, steps_run FROM jobs WHERE status = 'done' AND steps_run > 0 "
                "AND engine_s IS NOT NULL ORDER BY finished_at DESC LIMIT 200) recent GROUP BY render_queue"
            ).fetchall()
            workers = c.execute(
                "SELECT queue, count(*) AS n FROM worker_heartbeats "
                "WHERE heartbeat_at > now() - make_interval(secs => %s) GROUP BY queue",
                (self.live_s,),
            ).fetchall()
        rows = {str(_col(r, 0, "queue")): (float(_col(r, 1, "n")), float(_col(r, 2, "steps_left"))) for r in depth}
        s_per_step = {str(_col(r, 0, "queue")): _col(r, 1, "s_per_step") for r in pace}
        live = {str(_col(r, 0, "queue")): float(_col(r, 1, "n")) for r in workers}
        queues = sorted(set(rows) | set(live) | {"route"})
        d = GaugeMetricFamily("nirvana_queue_depth", "Jobs queued, prefetched or running, per queue", labels=["queue"])
        w = GaugeMetricFamily("nirvana_queue_workers", "Live workers consuming each queue", labels=["queue"])
        b = GaugeMetricFamily(
            "nirvana_render_backlog_seconds", "Estimated seconds of render work waiting per queue", labels=["queue"]
        )
        for q in queues:
            n, steps_left = rows.get(q, (0.0, 0.0))
            d.add_metric([q], n)
            w.add_metric([q], live.get(q, 0.0))
            if q.startswith("render."):
                pace_q = s_per_step.get(q)
                est = 0.0 if pace_q is None else steps_left * float(pace_q) / self.jobs_per_render_worker
                b.add_metric([q], est)
        yield d
        yield w
        yield b


def _col(row: Any, i: int, name: str) -> Any:
    return row[name] if isinstance(row, dict) else row[i]
