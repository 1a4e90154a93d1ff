"""Worker death: render workers killed with SIGKILL mid-job (from outside, or by the test-only hook at a chosen
point); every job still completes exactly once — one result, one set of cache rows, hit counters counted once —
and a job that kills its worker on every attempt ends ``failed`` after ``max_attempts`` (no poison loop)."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.faults.hooks import crash_marker

# Slow (worker restarts: torch import + model load per death): runs under `make test-faults` only.
pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(1800)]

STEPS = 150  # long enough (tiny SD) to catch a render mid-way from outside
BASE = "a large red circle on a blue background"
MODES = ("kill-9", "crash-once@step", "crash-once@image")


def _kill_mid_render(fs: Any, job_id: str, timeout_s: float = 600) -> int:
    """SIGKILL the worker rendering ``job_id`` once it has run at least one step; returns its pid."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = fs.sql("SELECT status, progress_step, worker FROM jobs WHERE id = %s", (job_id,))[0]
        if row["status"] == "rendering" and row["progress_step"] > 0 and row["worker"]:
            pid = int(row["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            return pid
        if row["status"] in ("done", "failed", "cancelled"):
            raise AssertionError(f"job {job_id} finished before it could be killed ({row['status']})")
        time.sleep(0.02)
    raise TimeoutError(f"job {job_id} never rendered")


def test_killed_workers_every_job_completes_exactly_once(fault_stack: Any, client_of: Any, scale: Any) -> None:
    fs = fault_stack
    tenant = "deaths"
    c = client_of(tenant)
    src = c.generate(prompt=BASE, steps=STEPS, seed=1, cache="auto", timeout_s=600)
    assert src["status"] == "done", src
    restarts_before = sum(fs.restarts.values())

    modes = [MODES[i % len(MODES)] for i in range(scale.kill_trials)]
    jobs: dict[str, str] = {}
    # One trial at a time: the render worker batches every job in flight, so a death during another trial's
    # rerun would be that trial's second death too (each job must die exactly once here).
    killed: list[int] = []
    for i, mode in enumerate(modes):
        for earlier in jobs:
            c.wait(earlier, timeout_s=900)
        fs.wait_workers(1)
        if mode == "kill-9":
            j = c.submit(prompt=f"{BASE}, trial {i}", steps=STEPS, seed=100 + i)
            jobs[j["id"]] = mode
            killed.append(_kill_mid_render(fs, j["id"]))
        else:
            point = mode.split("@")[1]
            j = c.submit(prompt=f"{BASE}, trial {i} {crash_marker(point, once=True)}", steps=STEPS, seed=100 + i)
            jobs[j["id"]] = mode

    final = {jid: c.wait(jid, timeout_s=900) for jid in jobs}
    ledger = fs.ledger_lines()
    crashes = Counter(job for point, job, _ in ledger if point == "crash")
    renders = Counter(job for point, job, _ in ledger if point == "rendered")
    for jid, mode in jobs.items():
        j = final[jid]
        assert j["status"] == "done", (mode, j["attempts"], j.get("error"))
        # Exactly one death per trial: by our SIGKILL or by the hook (which logs it just before killing itself).
        assert j["attempts"] == 2, (mode, j["attempts"])
        if mode != "kill-9":
            assert crashes[jid] == 1, (mode, crashes[jid])
        # crash@image rendered twice (the first image was written, then the worker died): one result anyway.
        assert renders[jid] == (2 if mode == "crash-once@image" else 1), (mode, renders[jid])
        png = c.image(jid)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        # One image object per attempt that got that far, each under its attempt's key; the row shows the last.
        images = sorted(Path(fs.stack.storage_url).glob(f"jobs/*/*/{jid}*.png"))
        assert [p.name for p in images][-1] == f"{jid}.a2.png", images
        assert len(images) == (2 if mode == "crash-once@image" else 1), images
        assert images[-1].read_bytes() == png
    assert len(killed) == modes.count("kill-9")
    assert sum(fs.restarts.values()) - restarts_before == len(jobs), fs.restarts

    # One set of cache rows per job: one ledger row, at most one prompt row, states at distinct steps.
    ledger_rows = fs.sql(
        "SELECT job_id, count(*) AS n FROM cache_jobs WHERE job_id = ANY(%s) GROUP BY job_id", (list(jobs),)
    )
    assert {r["job_id"]: r["n"] for r in ledger_rows} == dict.fromkeys(jobs, 1)
    prompts = fs.sql(
        "SELECT job_id, count(*) AS n FROM cache_prompts WHERE job_id = ANY(%s) GROUP BY job_id", (list(jobs),)
    )
    assert all(r["n"] == 1 for r in prompts), prompts
    dup_states = fs.sql(
        "SELECT s.prompt_id, s.k, count(*) AS n FROM cache_states s JOIN cache_prompts p ON p.id = s.prompt_id "
        "WHERE p.tenant = %s GROUP BY s.prompt_id, s.k HAVING count(*) > 1",
        (tenant,),
    )
    assert dup_states == []
    # Hit counters: every state's hits equal the number of recorded jobs that resumed from it (no double count
    # although crash@image trials rendered twice).
    approx = [jid for jid in jobs if final[jid]["cache"]["tier"] == "approximate"]
    assert approx, "no trial resumed from a cached state: the hit counters were not exercised"
    mismatched = fs.sql(
        "SELECT s.id, s.hits, (SELECT count(*) FROM cache_jobs j WHERE j.hit_state_id = s.id) AS recorded "
        "FROM cache_states s JOIN cache_prompts p ON p.id = s.prompt_id WHERE p.tenant = %s "
        "AND s.hits <> (SELECT count(*) FROM cache_jobs j WHERE j.hit_state_id = s.id)",
        (tenant,),
    )
    assert mismatched == []
    hits = fs.sql(
        "SELECT coalesce(sum(s.hits), 0) AS n FROM cache_states s JOIN cache_prompts p ON p.id = s.prompt_id "
        "WHERE p.tenant = %s",
        (tenant,),
    )[0]["n"]
    assert hits == len(approx), (hits, len(approx))
    print(
        f"\nworker death: {len(jobs)} trials ({dict(Counter(modes))}), {len(jobs)} done exactly once, "
        f"{len(approx)} approximate hits counted once each, {sum(fs.restarts.values()) - restarts_before} "
        "worker restarts"
    )


def test_poison_job_fails_after_max_attempts(fault_stack: Any, client_of: Any) -> None:
    fs = fault_stack
    c = client_of("poison")
    fs.wait_workers(1)
    before = sum(fs.restarts.values())
    j = c.submit(prompt=f"a small green triangle {crash_marker('step')}", steps=20, cache="off")
    final = c.wait(j["id"], timeout_s=900)
    assert final["status"] == "failed", final
    assert final["attempts"] == 3  # NIRVANA_MAX_ATTEMPTS
    assert "attempts exhausted" in (final["error"] or "")
    crashes = [a for point, job, a in fs.ledger_lines() if point == "crash" and job == j["id"]]
    assert sorted(crashes) == [1, 2, 3]
    assert sum(fs.restarts.values()) - before >= 3
    # The stack still serves afterwards.
    fs.wait_workers(1)
    ok = c.generate(prompt="[fake-engine] after the poison job", steps=5, cache="off", timeout_s=600)
    assert ok["status"] == "done"
    print(f"\npoison job: failed after {final['attempts']} attempts ({len(crashes)} worker deaths): {final['error']}")
