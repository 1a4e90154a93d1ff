"""CLI commands ``nirvana bench index|codecs|trace|gpu|batching|router`` (mounted by :func:`register`)."""

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


def _csv(text: str | None) -> list[str]:
    return [v.strip() for v in (text or "").split(",") if v.strip()]


def bench_trace_cmd(
    trace: Annotated[
        list[Path] | None, typer.Option("--trace", help="trace file (repeat for several; default: all six channels)")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="requests per trace file (headline run)")] = None,
    budget_prompts: Annotated[int, typer.Option(help="budget: what B prompts' five fp32 512² states take")] = 10000,
    policies: Annotated[str | None, typer.Option(help="comma-separated subset of the policies (default: all)")] = None,
    sweep_budgets: Annotated[
        str, typer.Option(help="budgets in prompts for the sweep, comma-separated ('' = no sweep)")
    ] = "1000,3000,10000,30000,100000",
    sweep_limit: Annotated[int | None, typer.Option(help="requests per trace file for the sweep")] = None,
    sweep_policies: Annotated[str | None, typer.Option(help="policies in the sweep (default: as --policies)")] = None,
    jobs: Annotated[int, typer.Option(help="replays run in parallel (processes, one database each)")] = 1,
    threads: Annotated[
        int, typer.Option(help="torch threads for MiniLM (0 = torch default; 1 on a busy or niced host)")
    ] = 0,
    image_bytes_per_pixel: Annotated[float, typer.Option(help="PNG bytes per pixel of an exact-tier image")] = 1.5,
    image_budget_fraction: Annotated[
        float | None,
        typer.Option(help="share of the budget exact-tier images keep under ours (default: settings, 0.1)"),
    ] = None,
    step_cost_s: Annotated[
        float | None, typer.Option(help="seconds per 512² step (default: measured from the trace)")
    ] = None,
    database_url: Annotated[str | None, typer.Option(help="server for the fresh databases (default: embedded)")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="embedding cache (default <data_dir>/bench/trace-emb)")] = None,
    out: Annotated[Path, typer.Option(help="report directory")] = Path("out/bench"),
    resume: Annotated[
        bool, typer.Option("--resume", help="reuse finished replays of an interrupted run (<out>/trace.partial.jsonl)")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="last line: one JSON object")] = False,
) -> None:
    """Replay the dreambot trace through the real cache path (cost model instead of rendering); compare policies
    at equal byte budgets."""
    import json
    import logging
    import signal

    from nirvana.bench.report import plot_path, write_report
    from nirvana.bench.trace import (
        default_trace_files,
        format_headline,
        progress_plot,
        run_trace_bench,
        trace_markdown,
        trace_plot,
    )
    from nirvana.config import get_settings

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # so SIGTERM, too, stops the embedded server and drops the databases

    signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    settings = get_settings()
    files = list(trace or []) or default_trace_files()
    for f in files:
        if not Path(f).is_file():
            raise typer.BadParameter(f"trace file not found: {f}")
    try:
        budgets = tuple(int(b) for b in _csv(sweep_budgets))
    except ValueError:
        raise typer.BadParameter(f"--sweep-budgets must be comma-separated integers, got {sweep_budgets!r}") from None
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "trace.partial.jsonl"  # one line per finished replay (progress; partial results if interrupted)
    if not resume:
        ckpt.unlink(missing_ok=True)
    try:
        res = run_trace_bench(
            files,
            limit=limit,
            budget_prompts=budget_prompts,
            policies=_csv(policies) or None,
            sweep_budgets=budgets,
            sweep_limit=sweep_limit,
            sweep_policies=_csv(sweep_policies) or None,
            database_url=database_url or settings.database_url or None,
            cache_dir=cache_dir or Path(settings.data_dir) / "bench" / "trace-emb",
            image_bytes_per_pixel=image_bytes_per_pixel,
            image_budget_fraction=(
                image_budget_fraction if image_budget_fraction is not None else settings.cache_image_budget_fraction
            ),
            step_cost_s=step_cost_s,
            jobs=jobs,
            checkpoint=ckpt,
            resume=resume,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    plot = trace_plot(res, plot_path(out, "trace")) if res["sweep"]["rows"] else None
    prog = progress_plot(res, plot_path(out, "trace-progress"))
    paths = write_report(out, "trace", res, trace_markdown(res, plot, prog))
    typer.echo(format_headline(res))
    typer.echo(f"wrote {paths['json']}, {paths['markdown']}" + "".join(f", {p}" for p in (plot, prog) if p))
    if json_out:
        typer.echo(json.dumps(res, separators=(",", ":"), default=str))


def bench_gpu_cmd(
    allow_cpu: Annotated[bool, typer.Option("--allow-cpu", help="allow a CPU run (only with --tiny)")] = False,
    tiny: Annotated[bool, typer.Option("--tiny", help="tiny config of the same structure (smoke test)")] = False,
    repeats: Annotated[int, typer.Option(help="timed repeats per measurement (median)")] = 3,
    batches: Annotated[str, typer.Option(help="batch sizes, comma-separated")] = "1,2,4,8",
    dtype: Annotated[str, typer.Option(help="fp16 | bf16 | fp32 (CPU runs use fp32)")] = "fp16",
    cache_entries: Annotated[int, typer.Option(help="prompts in the database for the overhead measurement")] = 3000,
    cache_queries: Annotated[int, typer.Option(help="lookups timed")] = 200,
    embedder: Annotated[str, typer.Option(help="minilm | none (skip the embedding time)")] = "minilm",
    database_url: Annotated[str | None, typer.Option(help="server for the fresh database (default: embedded)")] = None,
    max_seconds: Annotated[float, typer.Option(help="skip what is left after this many seconds")] = 420.0,
    out: Annotated[Path, typer.Option(help="report directory")] = Path("out/bench"),
    json_out: Annotated[bool, typer.Option("--json", help="last line: one JSON object")] = False,
) -> None:
    """SD 1.5-sized random-weight UNet + VAE on a GPU: step time, resumed vs full runs, batch scaling, and the
    cache's overhead per request. Refuses without CUDA unless --allow-cpu --tiny."""
    import json

    from nirvana.bench.gpu import GpuUnavailable, run_gpu_bench
    from nirvana.bench.gpu_report import write_outputs

    try:
        res = run_gpu_bench(
            allow_cpu=allow_cpu,
            tiny=tiny,
            repeats=repeats,
            batches=_ints(batches, "--batches"),
            dtype=dtype,
            cache_entries=cache_entries,
            cache_queries=cache_queries,
            database_url=database_url,
            embedder=embedder,
            max_seconds=max_seconds,
        )
    except GpuUnavailable as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    write_outputs(res, out)
    if json_out:
        typer.echo(json.dumps(res, separators=(",", ":")))


def bench_batching_cmd(
    model: Annotated[str, typer.Option(help="'bundled' or a local diffusers directory")] = "bundled",
    requests: Annotated[int, typer.Option(help="requests in the workload (misses and hits at the trace's K mix)")] = 48,
    steps: Annotated[int, typer.Option(help="denoising steps N")] = 50,
    batch_sizes: Annotated[str, typer.Option(help="max batch sizes, comma-separated")] = "1,2,4,8,16",
    seed: Annotated[int, typer.Option(help="workload seed")] = 0,
    out: Annotated[Path, typer.Option(help="report directory")] = Path("out/bench"),
    json_out: Annotated[bool, typer.Option("--json", help="last line: one JSON object")] = False,
) -> None:
    """Step-level batching: one mixed workload at each max batch size; images/s, ratio to batch 1, latency per
    tier, and whether batched images equal their batch-1 renders."""
    import json

    from rich.console import Console

    from nirvana.bench.batching import format_table, run_batching_bench

    console = Console(stderr=True)
    try:
        with console.status("bench batching") as status:
            res = run_batching_bench(
                model,
                requests=requests,
                steps=steps,
                batch_sizes=_ints(batch_sizes, "--batch-sizes"),
                seed=seed,
                progress=lambda m: status.update(f"bench batching: {m}"),
            )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "batching.json").write_text(json.dumps(res, indent=2))
    (out / "batching.md").write_text(format_table(res) + "\n")
    typer.echo(format_table(res))
    typer.echo(f"wrote {out / 'batching.json'}, {out / 'batching.md'}")
    if json_out:
        typer.echo(json.dumps(res, separators=(",", ":")))


def bench_router_cmd(
    batch_sizes: Annotated[
        str, typer.Option(help="router batch sizes (NIRVANA_ROUTE_MAX_BATCH), comma-separated")
    ] = "1,32",
    jobs: Annotated[int, typer.Option(help="jobs per run (a burst, then the same number at --rate)")] = 400,
    rate: Annotated[float, typer.Option(help="offered prompts/s of the latency run")] = 200.0,
    router_threads: Annotated[int, typer.Option(help="torch threads of the router (0: torch default)")] = 0,
    evict_states: Annotated[
        int, typer.Option(help="also route 200 jobs alone and while a maintenance worker evicts this many states")
    ] = 0,
    evict_rate: Annotated[float, typer.Option(help="offered prompts/s of the eviction comparison")] = 20.0,
    out: Annotated[Path, typer.Option(help="report directory")] = Path("out/bench"),
    json_out: Annotated[bool, typer.Option("--json", help="last line: one JSON object")] = False,
) -> None:
    """Routing through the real path (API, Redis, a router worker process, PostgreSQL + pgvector) at each router
    batch size: prompts/s, and route latency p50/p99 at a fixed offered rate."""
    import json

    from rich.console import Console

    from nirvana.bench.router import format_table, run_router_bench

    console = Console(stderr=True)
    try:
        with console.status("bench router") as status:
            res = run_router_bench(
                _ints(batch_sizes, "--batch-sizes"),
                jobs=jobs,
                rate=rate,
                router_threads=router_threads,
                progress=lambda m: status.update(f"bench router: {m}"),
                evict_states=evict_states,
                evict_rate=evict_rate,
            )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "router.json").write_text(json.dumps(res, indent=2))
    typer.echo(format_table(res))
    if json_out:
        typer.echo(json.dumps(res, separators=(",", ":")))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Mount ``index``, ``codecs``, ``trace``, ``gpu`` and ``batching`` under ``bench_app``."""
    bench_app.command("index")(bench_index_cmd)
    bench_app.command("codecs")(bench_codecs_cmd)
    bench_app.command("trace")(bench_trace_cmd)
    bench_app.command("gpu")(bench_gpu_cmd)
    bench_app.command("batching")(bench_batching_cmd)
    bench_app.command("router")(bench_router_cmd)
