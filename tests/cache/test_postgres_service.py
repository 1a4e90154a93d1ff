"""Embedded PostgreSQL service: start on a free port (as root: via its own system user), reuse, stop, clean up."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from nirvana.embedded.postgres import EmbeddedPostgres


def test_start_reuse_stop(tmp_path: Path) -> None:
    data = tmp_path / "pg"
    server = EmbeddedPostgres(data, fast=True, delete_on_stop=True)
    url = server.start()
    assert url.startswith("postgresql://postgres@127.0.0.1:")
    with psycopg.connect(url) as conn:
        conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        assert conn.execute("SELECT '[1,2]'::vector <=> '[2,4]'::vector").fetchone() == (0.0,)
    # A second handle on the same directory reuses the running server and does not stop it.
    other = EmbeddedPostgres(data)
    assert other.start() == url
    other.stop()
    assert server.running
    db_url = server.create_database("extra_db")
    with psycopg.connect(db_url) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("extra_db",)
    server.drop_database("extra_db")
    server.stop()
    assert not data.exists()
    server.stop()  # idempotent


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="port"):
        EmbeddedPostgres(tmp_path, port=70000)
    server = EmbeddedPostgres(tmp_path, stop_at_exit=False)
    with pytest.raises(ValueError, match="database name"):
        server.create_database("bad; DROP")
    with pytest.raises(RuntimeError, match="not started"):
        server.url()
