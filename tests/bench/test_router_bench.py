"""``bench router`` end to end on a small run: real API, Redis, router worker processes and PostgreSQL; every job
is routed at each batch size and the report has its numbers (their values are not asserted)."""

from __future__ import annotations

import pytest

from nirvana.bench.router import format_table, run_router_bench

pytestmark = pytest.mark.timeout(900)


def test_router_bench_small_run() -> None:
    res = run_router_bench((1, 4), jobs=10, rate=20.0, evict_states=50, evict_rate=100.0)
    assert [r["route_max_batch"] for r in res["rows"]] == [1, 4]
    for r in res["rows"]:
        assert r["prompts_per_s"] > 0 and r["latency_p50_s"] is not None and r["latency_p99_s"] >= r["latency_p50_s"]
        assert r["embed_only_prompts_per_s"] > 0 and r["of_embed_only"] > 0
    e = res["eviction"]  # the same 200 jobs' worth alone and while the maintenance worker evicts
    assert e["states_cached"] >= 50 and e["alone_p99_s"] is not None and e["evicting_p99_s"] is not None
    assert e["evict_all_s"] is not None  # the worker evicted every state (budget 1 byte)
    assert "route max batch" in format_table(res) and "while evicting" in format_table(res)
    with pytest.raises(ValueError, match="--jobs"):
        run_router_bench((1,), jobs=1)
