"""The fault-injection suite (marker ``faults``; docs/RELIABILITY.md).

One real stack for the whole package — its own embedded Postgres and Redis (so the tests can stop and restart
them), a router with beat, two render workers serving the tiny random SD pipeline, and uvicorn — with the
test-only fault hooks of ``tests/faults/hooks.py`` installed (render workers run ``tests.faults.render_worker``).
A supervisor thread restarts render workers that die (as ``nirvana up`` does), counting the restarts.

Two sizes: ``make test`` (plain ``pytest``) runs the tests here at CI size and skips those marked ``slow`` (the
worker-death tests: every death costs a worker restart); ``make test-faults`` (``pytest -m faults``) or
``NIRVANA_FAULTS_FULL=1`` runs all of them at the sizes of issue #7 (20 kill trials, 1,000 storage faults, 5,000
load jobs).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from nirvana.embedded.stack import Managed, Stack, StackConfig

FULL_ENV = "NIRVANA_FAULTS_FULL"
_HERE = Path(__file__).parent


def full_run(config: pytest.Config) -> bool:
    """True under ``pytest -m faults`` (``make test-faults``) or ``NIRVANA_FAULTS_FULL=1``."""
    expr = str(config.getoption("markexpr", "") or "")
    selected = "faults" in expr and "not faults" not in expr
    return os.environ.get(FULL_ENV, "").strip() == "1" or selected


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if full_run(config):
        return
    skip = pytest.mark.skip(
        reason=f"heavy fault test: runs under `make test-faults` (pytest -m faults) or {FULL_ENV}=1"
    )
    for item in items:
        if _HERE in item.path.parents and item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


@dataclass(frozen=True)
class Scale:
    """How big each fault test runs (CI size vs the issue's size)."""

    full: bool
    kill_trials: int
    storage_faults: int
    load_jobs: int


@pytest.fixture(scope="session")
def scale(request: pytest.FixtureRequest) -> Scale:
    if full_run(request.config):
        return Scale(True, kill_trials=20, storage_faults=1000, load_jobs=5000)
    return Scale(False, kill_trials=3, storage_faults=300, load_jobs=300)


FAULT_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "NIRVANA_MAX_STEPS": "500",
    "NIRVANA_MAX_BATCH_JOBS": "1000",
    "NIRVANA_PROGRESS_INTERVAL_S": "0.1",
    "NIRVANA_API_KEY_CACHE_S": "0",
    "NIRVANA_MAX_ATTEMPTS": "3",
    "NIRVANA_REAPER_STALE_S": "5",  # a render without heartbeat for 5 s belongs to a dead worker
    "NIRVANA_REAPER_REQUEUE_S": "15",  # re-send jobs idle this long (a task lost between row and broker)
    "NIRVANA_BEAT_REAP_S": "1",
    "NIRVANA_CACHE_NOVELTY_GATE": "false",  # similar prompts always look up (deterministic approximate hits)
    # Per-key rate limits (docs/SECURITY.md) stay on — their buckets live in Redis, so the broker restart
    # exercises them too — but far above what the load test sends.
    "NIRVANA_RATE_LIMIT_REQUESTS_PER_S": "100000",
    "NIRVANA_RATE_LIMIT_REQUESTS_BURST": "1000000",
    "NIRVANA_RATE_LIMIT_JOBS_PER_S": "100000",
    "NIRVANA_RATE_LIMIT_JOBS_BURST": "1000000",
}


@dataclass
class FaultStack:
    """The running stack plus what the tests need around it."""

    stack: Stack
    ledger: Path
    admin_key: str
    restarts: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _keys: dict[str, str] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        return self.stack.api_url

    @property
    def database_url(self) -> str:
        return self.stack.database_url

    def render_workers(self) -> list[Managed]:
        return [p for p in self.stack.procs if p.name.startswith("render")]

    def key(self, tenant: str) -> str:
        """An API key of ``tenant`` (created once)."""
        if tenant not in self._keys:
            from nirvana.service.keys import create_key

            with psycopg.connect(self.database_url, autocommit=True) as conn:
                pool = _OneConnPool(conn)
                self._keys[tenant] = create_key(pool, tenant)
        return self._keys[tenant]

    def sql(self, query: str, args: Any = None) -> list[dict[str, Any]]:
        """Rows of one query on a fresh connection (robust across database restarts)."""
        with psycopg.connect(self.database_url, autocommit=True, row_factory=dict_row) as conn:
            cur = conn.execute(query, args)
            return list(cur.fetchall()) if cur.description else []

    def ledger_lines(self) -> list[tuple[str, str, int]]:
        """(point, job_id, attempt) per line the fault hooks appended (``rendered``, ``crash``)."""
        if not self.ledger.exists():
            return []
        out = []
        for line in self.ledger.read_text().splitlines():
            point, job, attempt, _pid = line.split("\t")
            out.append((point, job, int(attempt) if attempt.isdigit() else -1))
        return out

    def supervise(self) -> None:
        """Restart render workers that died (kill -9 or an injected crash), like ``nirvana up`` does."""
        while not self._stop.wait(0.5):
            for p in self.render_workers():
                if not p.alive and not self._stop.is_set():
                    self.restarts[p.name] = self.restarts.get(p.name, 0) + 1
                    p.start()

    def wait_workers(self, n: int = 2, timeout_s: float = 600) -> None:
        """Until ``n`` render worker processes are alive and consuming (heartbeat younger than 10 s)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = {p.proc.pid for p in self.render_workers() if p.alive and p.proc is not None}
            rows = self.sql(
                "SELECT name FROM worker_heartbeats WHERE role = 'render' "
                "AND heartbeat_at > now() - interval '10 seconds'"
            )
            if len({int(r["name"].rsplit(":", 1)[1]) for r in rows} & pids) >= n:
                return
            time.sleep(0.5)
        raise TimeoutError(f"{n} render workers not live after {timeout_s:.0f}s")


class _OneConnPool:
    """The ``pool.connection()`` interface over one open connection (for ``create_key``)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn

    def connection(self) -> Any:
        from contextlib import nullcontext

        return nullcontext(self.conn)


@pytest.fixture(scope="session")
def fault_model_dir() -> Iterator[Path]:
    """A tiny random-weight SD pipeline (32×32 px) saved once per session (removed at the end)."""
    from nirvana.engine.tiny import build_tiny_sd

    root = Path(tempfile.mkdtemp(prefix="nirvana-faults-tiny-"))
    yield build_tiny_sd(root / "tiny-sd")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="package")
def fault_stack(fault_model_dir: Path) -> Iterator[FaultStack]:
    """The real stack with fault hooks on, its own Postgres and Redis, two render workers, supervised."""
    data = Path(tempfile.mkdtemp(prefix="nirvana-faults-"))
    ledger = data / "fault-ledger.tsv"
    env = dict(FAULT_ENV)
    env.update(NIRVANA_FAULT_LEDGER=str(ledger), NIRVANA_FAULT_STATE_DIR=str(data / "fault-state"))
    cfg = StackConfig(
        data_dir=data,
        model=os.environ.get("NIRVANA_TEST_MODEL") or str(fault_model_dir),
        render_workers=2,
        fast_postgres=True,
        env=env,
        # TEST-ONLY fault hooks (tests/faults/hooks.py): prompt markers crash workers or select the fake engine.
        render_module="tests.faults.render_worker",
        ready_timeout_s=600,
    )
    with Stack(cfg) as s:
        from nirvana.service.keys import create_key

        with psycopg.connect(s.database_url, autocommit=True) as conn:
            admin = create_key(_OneConnPool(conn), "faults-admin", role="admin")
        fs = FaultStack(s, ledger, admin)
        sup = threading.Thread(target=fs.supervise, name="fault-supervisor", daemon=True)
        sup.start()
        try:
            fs.wait_workers(2)
            yield fs
        finally:
            fs._stop.set()
            sup.join(5)
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture
def client_of(fault_stack: FaultStack) -> Iterator[Callable[[str], Any]]:
    """``client_of(tenant)`` → a ``nirvana.service.client.Client`` with that tenant's key (closed after)."""
    from nirvana.service.client import Client

    made: list[Client] = []

    def make(tenant: str) -> Client:
        c = Client(fault_stack.api_url, fault_stack.key(tenant), timeout_s=60)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()
