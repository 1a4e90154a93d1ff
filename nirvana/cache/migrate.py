"""A small ordered-SQL migration runner.

Every ``NNNN_name.sql`` file in the migrations directory is applied once, in numeric order, each in its own
transaction, and recorded in ``schema_migrations``. A session advisory lock serialises concurrent runners
(several processes starting at once), so ``migrate()`` is safe to call at every start and applies nothing the
second time.

Locating the directory (:func:`migrations_dir`): ``NIRVANA_MIGRATIONS_DIR`` if set; else ``migrations/`` at
the root of the source checkout this package was imported from (``<repo>/nirvana/cache/migrate.py`` →
``<repo>/migrations``); else ``<sys.prefix>/share/nirvana/migrations`` (where a packaged install should put
them).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg

log = logging.getLogger(__name__)

_FILE_RE = re.compile(r"^(\d{4})_([A-Za-z0-9_\-]+)\.sql$")
# Arbitrary but fixed: pg_advisory_lock key of the migration runner.
MIGRATION_LOCK_KEY = 0x6E697276  # "nirv"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def migrations_dir() -> Path:
    """The directory holding ``NNNN_*.sql`` files (see module docstring for the search order).

    Raises:
        FileNotFoundError: no candidate directory exists.
    """
    env = os.environ.get("NIRVANA_MIGRATIONS_DIR")
    candidates = [Path(env)] if env else []
    candidates += [
        Path(__file__).resolve().parents[2] / "migrations",
        Path(sys.prefix) / "share" / "nirvana" / "migrations",
    ]
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"no migrations directory; looked in {[str(c) for c in candidates]}")


def discover(directory: Path | None = None) -> list[Migration]:
    """All migrations in ``directory``, ordered by version.

    Raises:
        ValueError: a ``.sql`` file whose name is not ``NNNN_name.sql``, or two files with one version.
    """
    directory = directory or migrations_dir()
    found: dict[int, Migration] = {}
    for p in sorted(directory.iterdir()):
        if p.suffix != ".sql":
            continue
        m = _FILE_RE.match(p.name)
        if not m:
            raise ValueError(f"migration file name must be NNNN_name.sql, got {p.name!r}")
        version = int(m.group(1))
        if version in found:
            raise ValueError(f"two migrations with version {version:04d}: {found[version].path.name}, {p.name}")
        found[version] = Migration(version, m.group(2), p)
    return [found[v] for v in sorted(found)]


def migrate(conninfo: str, directory: Path | None = None) -> list[int]:
    """Apply pending migrations; returns the versions applied by this call (empty when up to date).

    Invariants: each file runs in one transaction together with its ``schema_migrations`` row, so a failed
    file leaves no trace and is retried on the next call. An applied file whose contents changed is reported
    (warning) but not re-run: write a new migration instead.
    """
    migrations = discover(directory)
    applied_now: list[int] = []
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       checksum text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {
                int(r[0]): str(r[1]) for r in conn.execute("SELECT version, checksum FROM schema_migrations").fetchall()
            }
            for mig in migrations:
                if mig.version in done:
                    if done[mig.version] != mig.checksum:
                        log.warning("migration %s changed after it was applied; not re-run", mig.path.name)
                    continue
                log.info("applying migration %s", mig.path.name)
                with conn.transaction():
                    conn.execute(mig.sql.encode())
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                        (mig.version, mig.name, mig.checksum),
                    )
                applied_now.append(mig.version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied_now


def applied_versions(conninfo: str) -> list[int]:
    """Versions recorded in ``schema_migrations`` (empty if the table does not exist)."""
    with psycopg.connect(conninfo) as conn:
        exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return []
        return [int(r[0]) for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
