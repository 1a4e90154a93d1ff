"""Broker and database restarts under steady load: no accepted job is lost; while Redis or Postgres is down the
API answers 503 with the reason (never 500) and recovers by itself; workers resume consuming after Redis returns.
No process is restarted by the test: the API, router and render workers reconnect on their own."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest

pytestmark = [pytest.mark.faults, pytest.mark.timeout(1200)]


class SteadyLoad:
    """A thread POSTing one fake-engine job every ``interval_s`` and recording every answer."""

    def __init__(self, api_url: str, key: str, interval_s: float = 0.25) -> None:
        self.http = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        self.interval_s = interval_s
        self.accepted: list[str] = []
        self.answers: list[tuple[float, int, str]] = []  # (time, status, error message)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.wait(self.interval_s):
            i += 1
            body = {"prompt": f"[fake-engine] steady load {i}", "steps": 5, "cache": "off", "seed": i}
            try:
                r = self.http.post("/v1/jobs", json=body)
            except httpx.HTTPError as e:  # the API process itself never goes down here: record it as a failure
                self.answers.append((time.monotonic(), -1, f"{type(e).__name__}: {e}"))
                continue
            msg = ""
            if r.status_code == 202:
                self.accepted.append(r.json()["id"])
            else:
                try:
                    msg = str(r.json()["error"]["message"])
                except (ValueError, KeyError, TypeError):
                    msg = r.text[:200]
            self.answers.append((time.monotonic(), r.status_code, msg))

    def start(self) -> SteadyLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)
        self.http.close()

    def wait_accepted(self, n: int, timeout_s: float = 300) -> None:
        """Until ``n`` more jobs than now were accepted (202)."""
        target = len(self.accepted) + n
        deadline = time.monotonic() + timeout_s
        while len(self.accepted) < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API did not recover: {Counter(s for _, s, _ in self.answers[-20:])}")
            time.sleep(0.1)


def _probe(http: httpx.Client, method: str, path: str, **kw: Any) -> tuple[int, str, str | None]:
    r = http.request(method, path, **kw)
    try:
        msg = str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        msg = r.text[:200]
    return r.status_code, msg, r.headers.get("Retry-After")


def test_broker_and_database_restarts_under_steady_load(fault_stack: Any) -> None:
    fs = fault_stack
    key = fs.key("restarts")
    fs.wait_workers(2)
    procs_before = {p.name: p.proc.pid for p in fs.stack.procs if p.proc is not None}
    load = SteadyLoad(fs.api_url, key).start()
    http = httpx.Client(base_url=fs.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    try:
        load.wait_accepted(10)

        # --- Redis down: job creation answers 503 naming the broker; reads keep working (Postgres is up).
        fs.stack.stop_redis()
        t_redis = time.monotonic()
        status, msg, retry = _probe(http, "POST", "/v1/jobs", json={"prompt": "[fake-engine] during redis", "steps": 5})
        assert status == 503 and "broker" in msg and retry is not None, (status, msg)
        status, _, _ = _probe(http, "GET", f"/v1/jobs/{load.accepted[0]}")
        assert status == 200
        time.sleep(3)
        fs.stack.start_redis()
        t_redis_back = time.monotonic()
        load.wait_accepted(10)
        # Workers consume again: a job submitted now finishes (checked below with all the others).

        # --- Postgres down: every endpoint that needs it answers 503 naming the database.
        fs.stack.stop_postgres()
        t_pg = time.monotonic()
        for method, path, kw in (
            ("GET", f"/v1/jobs/{load.accepted[0]}", {}),
            ("POST", "/v1/jobs", {"json": {"prompt": "[fake-engine] during postgres", "steps": 5}}),
            ("GET", "/v1/cache/stats", {}),
        ):
            status, msg, retry = _probe(http, method, path, **kw)
            assert status == 503 and "database" in msg and retry is not None, (method, path, status, msg)
        ready = http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "not_ready"  # details need an admin key
        time.sleep(3)
        fs.stack.start_postgres()
        t_pg_back = time.monotonic()
        load.wait_accepted(10)
        assert http.get("/readyz").status_code == 200
    finally:
        load.stop()
        http.close()

    # No accepted job is lost: all of them finish (the reaper re-sends what an outage interrupted).
    deadline = time.monotonic() + 600
    while True:
        rows = fs.sql("SELECT id, status, attempts FROM jobs WHERE id = ANY(%s)", (load.accepted,))
        states = Counter(r["status"] for r in rows)
        if states.get("done", 0) == len(load.accepted) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert len(rows) == len(load.accepted)
    assert states == Counter({"done": len(load.accepted)}), states

    by_status = Counter(s for _, s, _ in load.answers)
    assert set(by_status) <= {202, 503}, by_status  # never a 500 nor a dropped connection
    during_redis = [m for t, s, m in load.answers if s == 503 and t_redis <= t < t_redis_back + 5]
    during_pg = [m for t, s, m in load.answers if s == 503 and t_pg <= t < t_pg_back + 10]
    assert all("broker" in m or "database" in m for _, s, m in load.answers if s == 503)
    # A 503 only while something was down, naming what was down (the load's requests may also have waited the
    # outage out and been accepted: the probes above check the answer given during it).
    assert len(during_redis) + len(during_pg) == by_status[503], (during_redis, during_pg, by_status)
    assert all("broker" in m for m in during_redis) and all("database" in m for m in during_pg)
    # The API, router and render workers were never restarted: they recovered by themselves.
    assert {p.name: p.proc.pid for p in fs.stack.procs if p.proc is not None} == procs_before
    print(
        f"\nrestarts under load: {len(load.answers)} requests, {by_status[202]} accepted, {by_status[503]} answered "
        f"503 ({len(during_redis)} while Redis was down, {len(during_pg)} while Postgres was down), 0 errors; "
        f"{len(load.accepted)}/{len(load.accepted)} accepted jobs done; max attempts "
        f"{max(r['attempts'] for r in rows)}"
    )
