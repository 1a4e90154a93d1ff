"""Load: thousands of jobs through HTTP (batches of 100 and single jobs), closed-loop with a bounded number
outstanding. 0 lost, 0 duplicated; queue latency percentiles printed.

The engine is replaced by a FAKE ENGINE IN THIS TEST ONLY (``[fake-engine]`` prompts, see
``tests/faults/hooks.py``'s ``FakeEngine``: a seeded noise image, no model call), so the test measures the service —
API, Postgres, Redis, router, render workers, storage — not the model. One job in ten uses the cache (a small set
of repeated prompts: exact-tier hits served by the router, no render).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from tests.faults.helpers import percentile

pytestmark = [pytest.mark.faults, pytest.mark.timeout(3600)]

BATCH = 100
MAX_OUTSTANDING = 500


def _request(i: int) -> dict[str, Any]:
    if i % 10 == 9:  # cached: 20 popular prompts, same seed → exact repeats after their first render
        return {"prompt": f"[fake-engine] popular scene {(i // 10) % 20}", "steps": 10, "seed": 1, "cache": "auto"}
    return {"prompt": f"[fake-engine] load job {i}", "steps": 10, "seed": i, "cache": "off"}


def test_load_jobs_through_http_none_lost_none_duplicated(fault_stack: Any, client_of: Any, scale: Any) -> None:
    fs = fault_stack
    tenant = "load"
    c = client_of(tenant)
    n = scale.load_jobs
    fs.wait_workers(2)
    t0 = time.monotonic()
    accepted: list[str] = []
    i = batches = 0
    while i < n:
        outstanding = fs.sql(
            "SELECT count(*) AS n FROM jobs WHERE tenant = %s AND status NOT IN ('done', 'failed', 'cancelled')",
            (tenant,),
        )[0]["n"]
        if outstanding + BATCH > MAX_OUTSTANDING:
            time.sleep(0.05)
            continue
        batches += 1
        if batches % 10 == 1:  # some single-job requests between the batches
            for _ in range(min(10, n - i)):
                accepted.append(c.submit(**_request(i))["id"])
                i += 1
            continue
        size = min(BATCH, n - i)
        b = c.submit_batch([_request(i + k) for k in range(size)])
        accepted += [r["id"] for r in c.batch(b["id"])["jobs"]]
        i += size
    submitted_s = time.monotonic() - t0

    deadline = time.monotonic() + 1800
    while True:
        left = fs.sql(
            "SELECT count(*) AS n FROM jobs WHERE tenant = %s AND status NOT IN ('done', 'failed', 'cancelled')",
            (tenant,),
        )[0]["n"]
        if left == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    wall_s = time.monotonic() - t0

    rows = fs.sql(
        "SELECT id, status, tier, attempts, extract(epoch FROM created_at) AS created, "
        "extract(epoch FROM routed_at) AS routed, extract(epoch FROM render_started_at) AS rendering, "
        "extract(epoch FROM finished_at) AS finished FROM jobs WHERE tenant = %s",
        (tenant,),
    )
    assert len(accepted) == n and len(set(accepted)) == n
    assert len(rows) == n, f"{len(rows)} job rows for {n} accepted jobs"  # none lost, none created twice
    status = Counter(r["status"] for r in rows)
    assert status == Counter({"done": n}), status
    renders = Counter(job for point, job, _ in fs.ledger_lines() if point == "rendered")
    ids = {r["id"] for r in rows}
    duplicated = {j: k for j, k in renders.items() if j in ids and k > 1}
    rendered = [r for r in rows if r["tier"] != "exact"]
    never = [r["id"] for r in rendered if renders[r["id"]] == 0]
    assert duplicated == {}, f"{len(duplicated)} jobs rendered more than once"
    assert never == []
    assert all(r["attempts"] == 1 for r in rendered)
    exact = [r for r in rows if r["tier"] == "exact"]
    assert exact, "no exact-tier hit: the cached share of the load did not reach the cache"

    queue = [float(r["rendering"]) - float(r["created"]) for r in rendered]
    route = [float(r["routed"]) - float(r["created"]) for r in rows]
    total = [float(r["finished"]) - float(r["created"]) for r in rows]
    print(
        f"\nload: {n} jobs through HTTP ({n // BATCH} batches + singles, ≤{MAX_OUTSTANDING} outstanding) in "
        f"{wall_s:.1f}s ({n / wall_s:.1f} jobs/s; submitted in {submitted_s:.1f}s); lost 0, duplicated 0; "
        f"{len(exact)} exact-tier hits, {len(rendered)} rendered by the fake engine on 2 workers\n"
        f"  queue latency (created → render start): p50 {percentile(queue, 0.5) * 1000:.0f} ms, "
        f"p99 {percentile(queue, 0.99) * 1000:.0f} ms\n"
        f"  created → routed: p50 {percentile(route, 0.5) * 1000:.0f} ms, p99 {percentile(route, 0.99) * 1000:.0f} ms"
        f"; created → done: p50 {percentile(total, 0.5) * 1000:.0f} ms, p99 {percentile(total, 0.99) * 1000:.0f} ms"
    )
