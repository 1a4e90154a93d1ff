"""CLI commands ``nirvana bench index`` and ``nirvana bench codecs`` (mounted by :func:`register`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise typer.BadParameter(f"{name} must list at least one integer")
    return vals


def bench_index_cmd(
    n: Annotated[int, typer.Option("--n", help="embeddings in the index")] = 10000,
    ef: Annotated[str, typer.Option(help="ef_search values, comma-separated")] = "10,20,40,100,200",
    queries: Annotated[int, typer.Option(help="near-duplicate queries")] = 300,
    database_url: Annotated[str | None, typer.Option(help="server for the fresh database (default: embedded)")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="embedding cache (default <data_dir>/bench)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="last line: one JSON object")] = False,
) -> None:
    """HNSW index at N prompts: build time, top-1 latency p50/p99, recall@1 with and without a namespace filter."""
    from nirvana.bench.index import main_json, run_index_bench
    from nirvana.config import get_settings

    settings = get_settings()
    try:
        res = run_index_bench(
            n,
            ef_values=_ints(ef, "--ef"),
            queries=queries,
            database_url=database_url or settings.database_url or None,
            cache_dir=cache_dir or Path(settings.data_dir) / "bench",
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if json_out:
        typer.echo(main_json(res))


def bench_codecs_cmd(
    model: Annotated[str, typer.Option(help="'bundled', 'tiny', or a local diffusers directory")] = "bundled",
    prompts: Annotated[int, typer.Option(help="prompts per run")] = 16,
    steps: Annotated[int, typer.Option(help="denoising steps N")] = 50,
    ks: Annotated[str, typer.Option(help="resume steps K, comma-separated")] = "10,25",
    json_out: Annotated[bool, typer.Option("--json", help="last line: one JSON object")] = False,
) -> None:
    """Bytes per state of each latent codec and the quality of runs resumed from decoded states."""
    from nirvana.bench.codecs import run_codecs_bench, to_json

    try:
        res = run_codecs_bench(model, n_prompts=prompts, steps=steps, ks=_ints(ks, "--ks"))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    if json_out:
        typer.echo(to_json(res))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Mount ``index`` and ``codecs`` under ``bench_app`` (``nirvana bench ...``)."""
    bench_app.command("index")(bench_index_cmd)
    bench_app.command("codecs")(bench_codecs_cmd)
