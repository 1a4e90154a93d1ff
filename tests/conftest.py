"""Shared fixtures: a real embedded PostgreSQL (+ pgvector) per test session, a fresh migrated database per test
module, and a real S3 endpoint (moto's server) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nirvana.embedded.postgres import EmbeddedPostgres, free_port


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedPostgres]:
    """One embedded PostgreSQL 18 + pgvector server for the whole session (fsync off), removed at the end."""
    root = Path(tempfile.mkdtemp(prefix="nirvana-test-pg-"))
    server = EmbeddedPostgres(root / "data", fast=True, delete_on_stop=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def new_database(pg_server: EmbeddedPostgres) -> Iterator[Callable[..., str]]:
    """Factory: ``new_database(migrated=True)`` → URL of a fresh database (dropped at session end)."""
    from nirvana.cache.migrate import migrate

    created: list[str] = []

    def make(migrated: bool = True) -> str:
        name = f"t_{uuid.uuid4().hex[:12]}"
        url = pg_server.create_database(name)
        created.append(name)
        if migrated:
            migrate(url)
        return url

    yield make
    for name in created:
        pg_server.drop_database(name)


@pytest.fixture(scope="module")
def pg_url(new_database: Callable[..., str]) -> str:
    """A fresh, migrated database for one test module."""
    return new_database()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server (a real HTTP endpoint) on 127.0.0.1:<free port>; sets dummy AWS credentials."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
