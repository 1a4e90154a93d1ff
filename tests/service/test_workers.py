"""Two render workers on one queue: every job is rendered exactly once; a worker killed mid-render has its job
re-enqueued by the reaper and finished by the other (attempts = 2)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from nirvana.service.client import Client
from nirvana.service.jobs import JobStore

pytestmark = pytest.mark.timeout(900)


def _wait_log(path: Any, needle: str, timeout_s: float = 500) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and needle in path.read_text(errors="replace"):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{needle!r} not in {path}")


@pytest.fixture(scope="module")
def second_worker(stack: Any) -> Any:
    m = stack.add_render_worker()
    _wait_log(m.log_file, " ready.")
    return m


def test_two_workers_share_one_queue_each_job_rendered_once(stack: Any, second_worker: Any, client: Client) -> None:
    jobs = [
        client.submit(prompt=f"a large yellow diamond on a gray background, variant {i}", steps=40, cache="off", seed=i)
        for i in range(12)
    ]
    done = [client.wait(j["id"], timeout_s=300) for j in jobs]
    assert all(d["status"] == "done" and d["attempts"] == 1 for d in done), [d["status"] for d in done]
    store = JobStore.connect(stack.database_url, max_size=1)
    try:
        workers = {store.get(j["id"])["worker"] for j in jobs}
    finally:
        store.close()
    assert len(workers) == 2, workers
    logs = "".join(p.log_file.read_text(errors="replace") for p in stack.procs if p.name.startswith("render"))
    for j in jobs:
        assert logs.count(f"nirvana.render[{j['id']}] succeeded") == 1, j["id"]


def test_killed_worker_job_is_reaped_and_finished_elsewhere(stack: Any, second_worker: Any, client: Client) -> None:
    # Long enough to be caught mid-render (progress is polled every 50 ms), short enough to re-render on a slow CPU.
    j = client.submit(prompt="a small green triangle on a black background, center", steps=150, cache="off")
    store = JobStore.connect(stack.database_url, max_size=1)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            row = store.get(j["id"])
            if row["status"] == "rendering" and row["progress_step"] > 0:
                break
            time.sleep(0.05)
        assert row["status"] == "rendering"
        pid = int(row["worker"].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)  # the worker dies mid-render: no ack, no heartbeat
        final = client.wait(j["id"], timeout_s=600)
        assert final["status"] == "done", final
        assert final["attempts"] == 2
        assert store.get(j["id"])["worker"] != row["worker"]
    finally:
        store.close()
