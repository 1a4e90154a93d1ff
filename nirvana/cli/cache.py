"""CLI commands of the cache: ``nirvana migrate`` and ``nirvana cache stats|evict|sweep|refit-gate``.

Mounted by ``nirvana.cli`` through :func:`register`. Heavy imports happen inside the commands.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer


@contextmanager
def database_url(url: str | None) -> Iterator[str]:
    """``url``, else ``NIRVANA_DATABASE_URL``, else an embedded server in ``<data_dir>/postgres`` (reused if
    running; stopped on exit if this call started it)."""
    from nirvana.config import get_settings

    url = url or get_settings().database_url
    if url:
        yield url
        return
    from nirvana.embedded.postgres import EmbeddedPostgres

    server = EmbeddedPostgres(Path(get_settings().data_dir) / "postgres")
    try:
        yield server.start()
    finally:
        server.stop()


def migrate_cmd(
    database_url_opt: Annotated[
        str | None, typer.Option("--database-url", help="PostgreSQL URL (default: settings, else embedded)")
    ] = None,
) -> None:
    """Apply pending SQL migrations (idempotent; safe to run from several processes at once)."""
    from nirvana.cache.migrate import applied_versions, migrate, migrations_dir

    with database_url(database_url_opt) as url:
        done = migrate(url)
        typer.echo(
            f"migrations in {migrations_dir()}: applied {done or 'none'}; at version {max(applied_versions(url))}"
        )


def _cache(url: str) -> Any:
    from nirvana.cache.core import ApproximateCache
    from nirvana.config import get_settings

    settings = get_settings().model_copy(update={"database_url": url})
    return ApproximateCache.from_settings(settings)


def stats_cmd(
    tenant: Annotated[str | None, typer.Option(help="only this tenant")] = None,
    database_url_opt: Annotated[str | None, typer.Option("--database-url")] = None,
) -> None:
    """Entries, states and bytes in the cache (one JSON object)."""
    with database_url(database_url_opt) as url, _cache(url) as cache:
        typer.echo(json.dumps(cache.stats(tenant)))


def evict_cmd(database_url_opt: Annotated[str | None, typer.Option("--database-url")] = None) -> None:
    """Evict down to the byte budget with the configured policy."""
    with database_url(database_url_opt) as url, _cache(url) as cache:
        typer.echo(json.dumps(cache.evict_to_budget()))


def sweep_cmd(
    min_age_s: Annotated[float, typer.Option(help="only objects older than this")] = 3600.0,
    database_url_opt: Annotated[str | None, typer.Option("--database-url")] = None,
) -> None:
    """Delete stored objects that no row references, and old job-ledger entries."""
    with database_url(database_url_opt) as url, _cache(url) as cache:
        typer.echo(
            json.dumps({"orphans_deleted": cache.sweep_orphans(min_age_s), "ledger_pruned": cache.prune_ledger()})
        )


def refit_gate_cmd(
    force: Annotated[bool, typer.Option(help="refit every namespace")] = False,
    database_url_opt: Annotated[str | None, typer.Option("--database-url")] = None,
) -> None:
    """Refit the novelty gates of namespaces that changed."""
    with database_url(database_url_opt) as url, _cache(url) as cache:
        typer.echo(json.dumps(cache.refit_gate(force=force)))


def register(app: typer.Typer, bench_app: typer.Typer | None = None) -> None:
    """Mount ``migrate`` on ``app`` and the ``cache`` sub-commands under ``app cache``."""
    app.command("migrate")(migrate_cmd)
    cache_app = typer.Typer(no_args_is_help=True, help="Cache maintenance (what the beat runs).")
    cache_app.command("stats")(stats_cmd)
    cache_app.command("evict")(evict_cmd)
    cache_app.command("sweep")(sweep_cmd)
    cache_app.command("refit-gate")(refit_gate_cmd)
    app.add_typer(cache_app, name="cache")
