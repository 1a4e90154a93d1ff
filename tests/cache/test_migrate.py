"""Migration runner: from empty, twice, concurrently, ordering, failure atomicity, file discovery."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest

from nirvana.cache.migrate import applied_versions, discover, migrate, migrations_dir


def test_from_empty_twice(new_database: Callable[..., str]) -> None:
    url = new_database(migrated=False)
    assert applied_versions(url) == []
    first = migrate(url)
    assert first and first[0] == 1
    assert migrate(url) == []
    assert applied_versions(url) == first
    with psycopg.connect(url) as conn:
        ext = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
        assert ext is not None and tuple(int(x) for x in ext[0].split(".")[:2]) >= (0, 8)
        idx = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'cache_prompts_hnsw_384'").fetchone()
        assert idx is not None and "hnsw" in idx[0] and "vector_cosine_ops" in idx[0]
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert {"cache_prompts", "cache_states", "cache_blobs", "cache_jobs", "schema_migrations"} <= tables


def test_concurrent_runners_apply_once(new_database: Callable[..., str]) -> None:
    url = new_database(migrated=False)
    results: list[list[int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        try:
            barrier.wait()
            results.append(migrate(url))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(len(r) > 0 for r in results) == [False, False, False, True]


def _dir_with(tmp_path: Path, files: dict[str, str]) -> Path:
    d = tmp_path / "migrations"
    d.mkdir()
    shutil.copy(migrations_dir() / "0001_cache.sql", d / "0001_cache.sql")
    for name, sql in files.items():
        (d / name).write_text(sql)
    return d


def test_picks_up_every_numbered_file_in_order(new_database: Callable[..., str], tmp_path: Path) -> None:
    d = _dir_with(
        tmp_path,
        {
            "0010_more.sql": "INSERT INTO job_things (n) SELECT n + 1 FROM job_things;",
            "0002_jobs.sql": "CREATE TABLE job_things (n int); INSERT INTO job_things VALUES (1);",
            "README.txt": "ignored",
        },
    )
    assert [m.version for m in discover(d)] == [1, 2, 10]
    url = new_database(migrated=False)
    assert migrate(url, d) == [1, 2, 10]
    assert migrate(url, d) == []
    with psycopg.connect(url) as conn:
        assert sorted(r[0] for r in conn.execute("SELECT n FROM job_things")) == [1, 2]


def test_failed_migration_leaves_no_trace(new_database: Callable[..., str], tmp_path: Path) -> None:
    d = _dir_with(tmp_path, {"0002_bad.sql": "CREATE TABLE half (n int); SELEC broken;"})
    url = new_database(migrated=False)
    with pytest.raises(psycopg.errors.SyntaxError):
        migrate(url, d)
    assert applied_versions(url) == [1]
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regclass('half')").fetchone() == (None,)
    (d / "0002_bad.sql").write_text("CREATE TABLE half (n int);")
    assert migrate(url, d) == [2]


@pytest.mark.parametrize(
    ("names", "match"),
    [(["1_short.sql"], "NNNN_name"), (["0003_a.sql", "0003_b.sql"], "two migrations"), (["0004 x.sql"], "NNNN")],
)
def test_bad_file_names(tmp_path: Path, names: list[str], match: str) -> None:
    for n in names:
        (tmp_path / n).write_text("SELECT 1;")
    with pytest.raises(ValueError, match=match):
        discover(tmp_path)


def test_migrations_dir_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (migrations_dir() / "0001_cache.sql").exists()
    monkeypatch.setenv("NIRVANA_MIGRATIONS_DIR", str(tmp_path))
    assert migrations_dir() == tmp_path
