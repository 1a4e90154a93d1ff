"""The PostgreSQL server a benchmark's replays run on, one fresh migrated database per replay.

Owns :class:`PostgresServer`: ``database_url``'s server, or an embedded one started in a temporary directory and
removed with it. ``bench trace`` replays on it, ``bench gpu`` measures the cache's overhead on it.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any


class PostgresServer:
    """A PostgreSQL server for the run: ``database_url``'s, or an embedded one started in a temporary dir."""

    def __init__(self, database_url: str | None) -> None:
        self._embedded: Any = None
        self._tmp: str | None = None
        if database_url:
            self.url = database_url
        else:
            import tempfile

            from nirvana.embedded.postgres import EmbeddedPostgres

            self._tmp = tempfile.mkdtemp(prefix="nirvana-trace-pg-")
            self._embedded = EmbeddedPostgres(Path(self._tmp) / "data", fast=True, delete_on_stop=True)
            self.url = self._embedded.start()

    def fresh(self) -> str:
        """A new migrated database's URL (drop it with :meth:`drop`)."""
        import psycopg
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        from nirvana.cache.migrate import migrate

        name = f"nirvana_trace_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        url = make_conninfo("", **{**conninfo_to_dict(self.url), "dbname": name})
        migrate(url)
        return url

    def drop(self, url: str) -> None:
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        name = conninfo_to_dict(url)["dbname"]
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        if self._embedded is not None:
            self._embedded.stop()
        if self._tmp is not None:
            import shutil

            shutil.rmtree(self._tmp, ignore_errors=True)
