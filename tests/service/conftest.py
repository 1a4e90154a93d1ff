"""The real stack for end-to-end tests: a fresh database on the session's embedded Postgres, an embedded Redis,
a router (with beat) and a render worker as subprocesses serving the tiny random SD pipeline, and uvicorn."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nirvana.embedded.stack import Stack, StackConfig

TEST_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "NIRVANA_MAX_STEPS": "500",
    "NIRVANA_MAX_BATCH_JOBS": "100",
    "NIRVANA_PROGRESS_INTERVAL_S": "0.05",
    "NIRVANA_API_KEY_CACHE_S": "0",
    "NIRVANA_REAPER_STALE_S": "10",
    "NIRVANA_BEAT_REAP_S": "2",
}


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A tiny random-weight SD pipeline (32×32 px) saved once per session."""
    from nirvana.engine.tiny import build_tiny_sd

    root = Path(tempfile.mkdtemp(prefix="nirvana-tiny-"))
    return build_tiny_sd(root / "tiny-sd")


@pytest.fixture(scope="session")
def stack(new_database: Callable[..., str], tiny_model_dir: Path) -> Iterator[Stack]:
    """The whole service (one router with beat, one render worker), on a fresh migrated database."""
    data = Path(tempfile.mkdtemp(prefix="nirvana-stack-"))
    model = os.environ.get("NIRVANA_TEST_MODEL") or str(tiny_model_dir)
    cfg = StackConfig(
        data_dir=data,
        database_url=new_database(),
        model=model,
        render_workers=1,
        env=TEST_ENV,
        ready_timeout_s=600,
    )
    with Stack(cfg) as s:
        yield s
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def make_key(stack: Stack) -> Callable[..., str]:
    """``make_key(tenant, role="user")`` → a fresh API key."""
    from nirvana.service.jobs import make_pool
    from nirvana.service.keys import create_key

    pool = make_pool(stack.database_url, max_size=2, name="test-keys")

    def make(tenant: str, role: str = "user") -> str:
        return create_key(pool, tenant, role=role)

    return make


@pytest.fixture(scope="session")
def client(stack: Stack, make_key: Callable[..., str]) -> Iterator[object]:
    from nirvana.service.client import Client

    with Client(stack.api_url, make_key("alice")) as c:
        yield c
