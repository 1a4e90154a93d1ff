"""One replay of the ordered trace through a fresh cache: the measurement every ``bench trace`` row comes from.

Owns :func:`replay`: each request goes through :class:`nirvana.cache.core.ApproximateCache` exactly as the router
runs it (exact tier, novelty gate in shadow mode, pgvector nearest, similarity → K), is recorded with
:meth:`~nirvana.cache.core.ApproximateCache.record_virtual` (rows with byte sizes, no tensors) and evicted to the
budget on PostgreSQL; the row it returns counts hits, steps and GPU seconds saved, bytes, gate decisions and
timings. Also the K labels of its histogram (:func:`k_order`).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from nirvana.bench.trace.costs import SizeModel
from nirvana.bench.trace.load import TraceRequest
from nirvana.bench.trace.policies import PolicySpec

log = logging.getLogger(__name__)


class _GivenEmbeddings:
    """Embedder stand-in: every request carries its embedding, so ``embed`` is never called."""

    def __init__(self, space: str, dim: int) -> None:
        self.space = space
        self.dim = dim

    def embed(self, texts: list[str]) -> np.ndarray:  # pragma: no cover - a bug if reached
        raise RuntimeError("trace replay requests must carry embeddings")


def _k_ref(policy: Any, k: int, num_steps: int) -> int:
    """The table's K (at its reference N) whose scaled step is ``k`` for a ``num_steps`` run (largest on ties);
    ``k`` itself when no rule scales to it."""
    refs = [r.k for r in policy.rules if policy.scale(r.k, num_steps) == k]
    return max(refs) if refs else k


def k_order(k: str) -> tuple[bool, int]:
    """Sort key of a K histogram's labels: the numeric Ks ascending, then ``exact``."""
    return (k == "exact", int(k) if k != "exact" else 0)


def _pct(xs: Sequence[float], q: float) -> float:
    if not xs:
        return 0.0
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def replay(
    url: str,
    reqs: Sequence[TraceRequest],
    emb: np.ndarray,
    spec: PolicySpec,
    budget_bytes: int,
    sizes: SizeModel,
    *,
    embed_space: str = "minilm-l6-v2",
    step_cost_s: float = 0.1,
    slack: float = 0.02,
    refit_every: int = 500,
    progress: Callable[[int, int], None] | None = None,
    outcomes: list[tuple[str, int]] | None = None,
    snapshot_every: int = 0,
    on_snapshot: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Replay ``reqs`` (in order) through a fresh cache on the migrated, empty database ``url``.

    Per request: ``lookup`` (exact tier → gate in shadow mode → pgvector → K), account the skipped steps,
    ``record_virtual`` (rows with the codec's byte sizes), and — when the stored bytes exceed ``budget_bytes``
    — ``evict_to_budget`` down to ``(1 − slack) × budget_bytes`` with the spec's policy, so every lookup sees
    at most ``budget_bytes`` stored. The gate is refitted every ``refit_every`` requests (the beat's job).

    Returns the policy's row (hit rates by tier, K histogram, steps and GPU seconds saved, bytes, gate counts,
    timings, per-channel steps saved). ``outcomes``, if given, receives ``(tier, k)`` per request.
    ``on_snapshot``, if given, receives the same row for the first ``snapshot_every`` × j requests as the replay
    passes them: a prefix of the ordered trace is itself a valid replay, so a run stopped part-way still leaves
    comparable rows (every policy at the same prefix).

    Raises:
        ValueError: ``emb`` does not have one row per request, or ``budget_bytes`` < 0, or ``slack`` ∉ [0, 0.5].
    """
    from psycopg_pool import ConnectionPool

    from nirvana.cache.core import ApproximateCache, CacheRequest, Namespace
    from nirvana.cache.gate import NoveltyGate
    from nirvana.cache.index import configure_connection
    from nirvana.cache.store import LatentStore

    if len(emb) != len(reqs):
        raise ValueError(f"emb must have one row per request ({len(reqs)}), got {len(emb)}")
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
    if not 0.0 <= slack <= 0.5:
        raise ValueError(f"slack must be in [0, 0.5], got {slack}")
    now = [0.0]
    pool = ConnectionPool(
        url, min_size=1, max_size=2, kwargs={"autocommit": True}, configure=configure_connection, open=True
    )
    cache = ApproximateCache(
        pool,
        LatentStore(f"memory://nirvana-trace-{uuid.uuid4().hex[:8]}"),
        _GivenEmbeddings(embed_space, int(emb.shape[1])),
        spec.k_policy(),
        eviction=spec.eviction_policy(),
        gate=NoveltyGate() if spec.gate else None,
        budget_bytes=budget_bytes,
        codec=spec.codec,
        exact_tier=spec.exact_tier,
        gate_enforce=False,
        clock=lambda: now[0],
    )
    low_water = int(budget_bytes * (1.0 - slack))
    tiers: Counter[str] = Counter()
    k_hist: Counter[str] = Counter()
    by_ch: dict[str, list[float]] = {}  # channel -> [requests, steps requested, steps skipped, hits]
    steps_req = steps_skip = 0
    gpu_req = gpu_skip = 0.0
    gate_decided = gate_novel = hits_lost = steps_lost = 0
    cur = peak = peak_pre = 0
    evictions = 0
    lookup_ms: list[float] = []
    record_ms: list[float] = []
    evict_s = refit_s = 0.0

    def build_row(done: int, stats: dict[str, Any], wall: float, cpu: float) -> dict[str, Any]:
        """The policy's row after the first ``done`` requests (the final row, or a prefix snapshot)."""
        n = max(done, 1)
        hits = tiers["exact"] + tiers["approximate"]
        row: dict[str, Any] = {
            "requests": done,
            "hit_rate": round(hits / n, 4),
            "exact_rate": round(tiers["exact"] / n, 4),
            "approximate_rate": round(tiers["approximate"] / n, 4),
            "steps_requested": steps_req,
            "steps_skipped": steps_skip,
            "steps_saved_fraction": round(steps_skip / max(steps_req, 1), 4),
            "gpu_seconds_requested": round(gpu_req, 1),
            "gpu_seconds_saved_fraction": round(gpu_skip / max(gpu_req, 1e-9), 4),
            "k_hist": dict(sorted(k_hist.items(), key=lambda kv: k_order(kv[0]))),
            "bytes": int(stats["bytes"]),
            "state_bytes": int(stats["state_bytes"]),
            "image_bytes": int(stats["image_bytes"]),
            "peak_bytes": int(peak),
            "peak_bytes_before_eviction": int(peak_pre),
            "budget_bytes": int(budget_bytes) if spec.bounded else None,
            "prompts_stored": int(stats["prompts"]),
            "states_stored": int(stats["states"]),
            "evictions": evictions,
            "gate": None,
            "timing": {
                "wall_s": round(wall, 2),
                "ms_per_request": round(1000 * wall / n, 3),
                "client_cpu_ms_per_request": round(1000 * cpu / n, 3),
                "lookup_ms_p50": round(_pct(lookup_ms, 0.5), 3),
                "lookup_ms_p99": round(_pct(lookup_ms, 0.99), 3),
                "record_ms_p50": round(_pct(record_ms, 0.5), 3),
                "record_ms_p99": round(_pct(record_ms, 0.99), 3),
                "evict_s": round(evict_s, 2),
                "gate_refit_s": round(refit_s, 2),
            },
            "by_channel": {
                c: {
                    "requests": int(v[0]),
                    "hit_rate": round(v[3] / max(v[0], 1), 4),
                    "steps_saved_fraction": round(v[2] / max(v[1], 1), 4),
                }
                for c, v in sorted(by_ch.items())
            },
        }
        if spec.gate:
            row["gate"] = {
                "decisions": gate_decided,
                "novel": gate_novel,
                "lookups_avoided_fraction": round(gate_novel / n, 4),
                "hits_lost": hits_lost,
                "hits_lost_fraction_of_hits": round(hits_lost / max(tiers["approximate"], 1), 4),
                "steps_lost": steps_lost,
                "steps_saved_fraction_if_enforced": round((steps_skip - steps_lost) / max(steps_req, 1), 4),
            }
        return row

    t_start = time.perf_counter()
    cpu_start = time.process_time()
    try:
        for i, r in enumerate(reqs):
            now[0] = r.ts
            seed = r.seed if r.seed is not None else 2**62 + i  # a bot-drawn seed never repeats
            cr = CacheRequest(r.prompt, "", seed, r.steps, r.cfg, r.width, r.height, Namespace(r.model_key, r.channel),
                              embedding=emb[i])  # fmt: skip
            t0 = time.perf_counter()
            res = cache.lookup(cr)
            t1 = time.perf_counter()
            skipped = r.steps if res.tier == "exact" else (res.k if res.tier == "approximate" else 0)
            tiers[res.tier] += 1
            if outcomes is not None:
                outcomes.append((res.tier, res.k))
            if res.tier == "exact":
                k_hist["exact"] += 1
            elif res.tier == "approximate":
                k_hist[str(_k_ref(cache.policy, res.k, r.steps))] += 1
            steps_req += r.steps
            steps_skip += skipped
            cost = step_cost_s * r.pixel_ratio
            gpu_req += r.steps * cost
            gpu_skip += skipped * cost
            ch = by_ch.setdefault(r.channel, [0, 0, 0, 0])
            ch[0] += 1
            ch[1] += r.steps
            ch[2] += skipped
            ch[3] += res.tier != "miss"
            if res.gate_novel is not None:
                gate_decided += 1
                if res.gate_novel:
                    gate_novel += 1
                    if res.tier == "approximate":
                        hits_lost += 1
                        steps_lost += skipped
            bps = sizes.state_bytes(spec.codec, r)
            img = sizes.image_bytes(r) if spec.exact_tier else 0
            out = cache.record_virtual(
                f"r{i}", cr, res, bytes_per_state=bps, steps_k=None if spec.approximate else [], image_bytes=img
            )
            t2 = time.perf_counter()
            lookup_ms.append((t1 - t0) * 1000)
            record_ms.append((t2 - t1) * 1000)
            cur += int(out["states"]) * bps + (img if out["prompt_id"] is not None else 0)
            peak_pre = max(peak_pre, cur)
            if spec.bounded and cur > budget_bytes:
                t3 = time.perf_counter()
                ev = cache.index.evict_to_budget(cache.eviction, low_water, now[0])
                evict_s += time.perf_counter() - t3
                cur -= int(ev["bytes"])
                evictions += 1
            peak = max(peak, cur)
            if spec.gate and refit_every and (i + 1) % refit_every == 0:
                t3 = time.perf_counter()
                cache.refit_gate()
                refit_s += time.perf_counter() - t3
            if progress is not None and ((i + 1) % 1000 == 0 or i + 1 == len(reqs)):
                progress(i + 1, len(reqs))
            if on_snapshot is not None and snapshot_every and (i + 1) % snapshot_every == 0 and i + 1 < len(reqs):
                snap = build_row(i + 1, cache.stats(), time.perf_counter() - t_start, time.process_time() - cpu_start)
                on_snapshot(snap)
        wall = time.perf_counter() - t_start
        cpu = time.process_time() - cpu_start
        stats = cache.stats()
    finally:
        cache.close()
        pool.close()
    if stats["bytes"] != cur:
        log.warning("%s: tracked bytes %d != stored bytes %d", spec.name, cur, stats["bytes"])
    return build_row(len(reqs), stats, wall, cpu)
