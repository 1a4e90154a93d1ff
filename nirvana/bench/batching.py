"""``nirvana bench batching``: step-level batching of the engine core, measured side by side in one run.

One workload — misses and approximate hits at the K mix the dreambot trace produced under our default cache —
is rendered by a fresh :class:`EngineCore` at each ``max_batch`` (1, 2, 4, 8, 16 by default), all requests
submitted at once (offline rendering: the core admits up to ``max_batch`` rows, the rest join as rows finish).
Reported per batch size: images/s and its ratio to batch 1, p50/p95 of each request's latency inside the core
(admission → decoded image) per tier, mean rows per forward, and whether every image equals the same request's
batch-1 render (``equivalent``; tolerance ``PIXEL_TOLERANCE`` — see tests/engine/test_core.py for why).
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from nirvana.engine.core import EngineCore, RenderRequest, RowResult
from nirvana.engine.loader import ModelComponents, load_model
from nirvana.engine.state import CapturedState

# Hits per K (and misses) of `bench trace` on the whole dreambot trace, policy `ours` at the default budget
# (docs/results/trace-full.jsonl: 223,563 requests; the 852 exact hits need no render and are left out).
TRACE_K_COUNTS: dict[int, int] = {0: 90_387, 5: 19_526, 10: 19_996, 15: 14_119, 20: 19_728, 25: 58_955}
TRACE_REFERENCE_STEPS = 50
PIXEL_TOLERANCE = 1e-3  # max abs image diff batched vs solo (values in [-1, 1]); 1/8 of one 8-bit level


def trace_k_mix(n: int, steps: int, seed: int = 0) -> list[int]:
    """``n`` K values (0 = miss) drawn in the trace's proportions, scaled from 50 steps to ``steps`` (floor)."""
    rng = random.Random(seed)
    ks, weights = zip(*TRACE_K_COUNTS.items(), strict=True)
    return [k * steps // TRACE_REFERENCE_STEPS for k in rng.choices(ks, weights=weights, k=n)]


def workload(c: ModelComponents, n: int, steps: int, seed: int = 0) -> list[RenderRequest]:
    """Requests of the demo's scene prompts; a hit resumes a state of an earlier, similar prompt (rendered here,
    untimed). Same objects for every batch size: each request's render is compared across sizes."""
    from nirvana.service.workload import generate

    prompts = [r.prompt for r in generate(n + 4, seed)]
    ks = trace_k_mix(n, steps, seed)
    caps = tuple(sorted({k for k in ks if k > 0}))
    sources = EngineCore(c, max_batch=4).run(
        [RenderRequest(p, seed=1000 + i, steps=steps, capture=caps) for i, p in enumerate(prompts[n:])]
    )
    reqs = []
    for i, (prompt, k) in enumerate(zip(prompts[:n], ks, strict=True)):
        start: CapturedState | None = None
        if k:
            start = next(s for s in sources[i % len(sources)].states if s.step == k)
        reqs.append(RenderRequest(prompt, seed=i, steps=steps, start=start, tag="approximate" if k else "miss"))
    return reqs


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))], 4)


def _run(c: ModelComponents, reqs: Sequence[RenderRequest], max_batch: int) -> tuple[list[RowResult], float]:
    core = EngineCore(c, max_batch=max_batch)
    t0 = time.perf_counter()
    out = core.run(reqs)
    return out, time.perf_counter() - t0


def batch_sweep(
    c: ModelComponents,
    reqs: Sequence[RenderRequest],
    batch_sizes: Sequence[int],
    tolerance: float = PIXEL_TOLERANCE,
    say: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Render ``reqs`` at each max batch size (batch 1 always, first: the solo reference); rows + summary."""
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be integers >= 1, got {list(batch_sizes)}")
    _run(c, reqs[:2], 2)  # warm-up: first forwards allocate
    rows: list[dict[str, Any]] = []
    solo: list[RowResult] = []
    for b in sorted(set(batch_sizes) | {1}):
        say(f"max batch {b} ...")
        out, wall = _run(c, reqs, b)
        failed = [r for r in out if r.error is not None]
        if failed:
            raise RuntimeError(f"max batch {b}: {len(failed)} rows failed, first: {failed[0].error!r}")
        solo = solo or out
        diff = max((r.image - s.image).abs().max().item() for r, s in zip(out, solo, strict=True))  # type: ignore[operator]
        lat = {t: [r.seconds for r in out if r.request.tag == t] for t in ("miss", "approximate")}
        rows.append(
            {
                "max_batch": b,
                "images_per_s": round(len(out) / wall, 3),
                "wall_s": round(wall, 2),
                "mean_rows_per_forward": round(statistics.fmean(r.batch_rows for r in out), 2),
                "latency_by_tier": {
                    t: {"jobs": len(xs), "p50_s": _pct(xs, 50), "p95_s": _pct(xs, 95)} for t, xs in lat.items()
                },
                "max_abs_diff_vs_batch1": diff,
            }
        )
        say(f"max batch {b}: {rows[-1]['images_per_s']} images/s")
    base = rows[0]["images_per_s"]
    for r in rows:
        r["ratio_vs_batch1"] = round(r["images_per_s"] / base, 3)
    best = max(rows, key=lambda r: r["images_per_s"])
    steps_run = sum(r.steps - (r.start.step if r.start else 0) for r in reqs)
    return {
        "requests": len(reqs),
        "tiers": {"miss": sum(r.start is None for r in reqs), "approximate": sum(r.start is not None for r in reqs)},
        "steps_saved_fraction": round(1 - steps_run / sum(r.steps for r in reqs), 4),
        "rows": rows,
        "best_max_batch": best["max_batch"],
        "best_ratio_vs_batch1": best["ratio_vs_batch1"],
        "tolerance": tolerance,
        "equivalent": all(r["max_abs_diff_vs_batch1"] <= tolerance for r in rows),
    }


def run_batching_bench(
    model: str = "bundled",
    requests: int = 48,
    steps: int = 50,
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16),
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Render one mixed workload at each max batch size; see the module docstring for what is reported.

    Raises:
        ValueError: bad sizes or counts, naming the option.
    """
    if requests < 1:
        raise ValueError(f"--requests must be >= 1, got {requests}")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"--batch-sizes must be integers >= 1, got {list(batch_sizes)}")
    c = load_model(model, device="auto")
    say = progress or (lambda _m: None)
    say(f"workload: {requests} requests at {steps} steps (sources rendered untimed)")
    reqs = workload(c, requests, steps, seed)
    sweep = batch_sweep(c, reqs, batch_sizes, PIXEL_TOLERANCE, say)
    return {"model": model, "model_key": c.model_key(), "device": str(c.device), "steps": steps, **sweep}


def format_table(res: dict[str, Any]) -> str:
    """The rows as a Markdown table (what the CLI prints)."""
    lines = [
        f"model {res.get('model', '')} on {res.get('device', '')}: {res['requests']} requests × "
        f"{res.get('steps', '')} steps "
        f"({res['tiers']['approximate']} hits, {res['steps_saved_fraction']:.1%} of steps saved)",
        "",
        "| max batch | images/s | × batch 1 | rows/forward | miss p50 / p95 s | hit p50 / p95 s | max diff vs 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        m, a = r["latency_by_tier"]["miss"], r["latency_by_tier"]["approximate"]
        lines.append(
            f"| {r['max_batch']} | {r['images_per_s']} | {r['ratio_vs_batch1']} | {r['mean_rows_per_forward']} | "
            f"{m['p50_s']} / {m['p95_s']} | {a['p50_s']} / {a['p95_s']} | {r['max_abs_diff_vs_batch1']:.2e} |"
        )
    lines.append(f"\nbest: max batch {res['best_max_batch']} ({res['best_ratio_vs_batch1']}× batch 1); "
                 f"equivalent: {str(res['equivalent']).lower()}")  # fmt: skip
    return "\n".join(lines)
