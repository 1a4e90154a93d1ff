"""CLI commands of the job service: ``up``, ``keys``, ``demo``, ``render`` (mounted by ``nirvana.cli``).

None of these import Celery or FastAPI: ``up`` launches uvicorn and the workers as subprocesses, ``demo`` and
``render`` talk HTTP.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

keys_app = typer.Typer(no_args_is_help=True, help="API keys (stored hashed in Postgres, each bound to a tenant).")


def _err(msg: str) -> NoReturn:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _database_url(data_dir: Path) -> tuple[str, Any]:
    """The configured database, a running ``nirvana up``'s, or the embedded one in ``data_dir`` (started
    here; the returned handle stops it)."""
    from nirvana.cache.migrate import migrate
    from nirvana.config import get_settings
    from nirvana.embedded.postgres import EmbeddedPostgres
    from nirvana.embedded.stack import running_stack

    s = get_settings()
    if s.database_url:
        migrate(s.database_url)
        return s.database_url, None
    info = running_stack(data_dir)
    if info:
        return str(info["database_url"]), None
    pg = EmbeddedPostgres(data_dir.expanduser().absolute() / "postgres")
    pg.start()
    import psycopg

    with psycopg.connect(pg.url(), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'nirvana'").fetchone()
    url = pg.url("nirvana") if exists else pg.create_database("nirvana")
    migrate(url)
    return url, pg


@contextmanager
def _keys_pool(data_dir: Path | None) -> Iterator[Any]:
    """A one-connection pool on the stack's database; a ``FieldError`` inside becomes a clean CLI error.

    Invariant: the pool is closed and an embedded Postgres started here is stopped, whatever happens inside.
    """
    from nirvana.service.errors import FieldError
    from nirvana.service.jobs import make_pool

    url, pg = _database_url(_data_dir(data_dir))
    pool = make_pool(url, max_size=1, name="keys")
    try:
        yield pool
    except FieldError as e:
        _err(str(e))
    finally:
        pool.close()
        if pg is not None:
            pg.stop()


def _data_dir(data_dir: Path | None) -> Path:
    from nirvana.config import get_settings

    return data_dir or get_settings().data_dir


@keys_app.command("create")
def keys_create(
    tenant_arg: Annotated[str | None, typer.Argument(metavar="TENANT", help="tenant the key is bound to")] = None,
    tenant: Annotated[str | None, typer.Option(help="the same, as an option")] = None,
    role: Annotated[str, typer.Option(help="user | admin")] = "user",
    name: Annotated[str, typer.Option(help="a label")] = "",
    data_dir: Annotated[Path | None, typer.Option(help="embedded stack directory")] = None,
) -> None:
    """Create an API key for TENANT (or --tenant) and print it (shown once; only its hash is stored)."""
    from nirvana.service.keys import create_key

    if tenant_arg and tenant and tenant_arg != tenant:
        _err(f"tenant given twice: {tenant_arg!r} and --tenant {tenant!r}")
    tenant = tenant_arg or tenant
    if not tenant:
        _err("tenant: give it as an argument or --tenant")

    with _keys_pool(data_dir) as pool:
        typer.echo(create_key(pool, tenant, name=name, role=role))


@keys_app.command("list")
def keys_list(
    tenant: Annotated[str | None, typer.Option(help="only this tenant")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="embedded stack directory")] = None,
) -> None:
    """List keys (prefix, tenant, role, revoked)."""
    from nirvana.service.keys import list_keys

    with _keys_pool(data_dir) as pool:
        for k in list_keys(pool, tenant):
            typer.echo(json.dumps(k))


@keys_app.command("shared-pool")
def keys_shared_pool(
    tenant: Annotated[str | None, typer.Argument(help="the tenant (omit to list the tenants in the pool)")] = None,
    on: Annotated[bool | None, typer.Option("--on/--off", help="join or leave the shared cache pool")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="embedded stack directory")] = None,
) -> None:
    """Opt a tenant into (--on) or out of (--off) the shared cache pool; without arguments, list its members.

    Tenants are private by default: a tenant's jobs resume only from its own cached states. Jobs of tenants in
    the shared pool resume from each other's states (docs/SECURITY.md: what that exposes)."""
    from nirvana.service.tenants import set_shared_pool, shared_pool_tenants

    if tenant is not None and on is None:
        _err("say --on or --off")
    with _keys_pool(data_dir) as pool:
        if tenant is not None and on is not None:
            set_shared_pool(pool, tenant, on)
            typer.echo(f"{tenant}: {'shared pool' if on else 'private cache'} (jobs created from now on)")
        else:
            for t in shared_pool_tenants(pool):
                typer.echo(t)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="the key or its 10-character prefix")],
    data_dir: Annotated[Path | None, typer.Option(help="embedded stack directory")] = None,
) -> None:
    """Revoke a key (requests with it get 403)."""
    from nirvana.service.keys import revoke_key

    with _keys_pool(data_dir) as pool:
        typer.echo(f"revoked {revoke_key(pool, key)}")


def _stack_config(
    data_dir: Path,
    model: str | None,
    port: int,
    render_workers: int,
    beat: bool = True,
    ready_timeout_s: float = 600.0,
    render_max_batch: int | None = None,
) -> Any:
    from nirvana.config import get_settings
    from nirvana.embedded.stack import StackConfig

    s = get_settings()
    return StackConfig(
        data_dir=data_dir,
        database_url=s.database_url,
        broker_url=s.broker_url,
        storage_url=s.storage_url,
        model=model,
        api_host=s.api_host,
        api_port=port,
        render_workers=render_workers,
        beat=beat,
        ready_timeout_s=ready_timeout_s,
        env={} if render_max_batch is None else {"NIRVANA_RENDER_MAX_BATCH": str(render_max_batch)},
    )


def up(
    data_dir: Annotated[Path | None, typer.Option(help="where data persists (default NIRVANA_DATA_DIR)")] = None,
    port: Annotated[int | None, typer.Option(help="API port (default NIRVANA_API_PORT)")] = None,
    model: Annotated[str | None, typer.Option(help="model to serve (default NIRVANA_MODEL)")] = None,
    render_workers: Annotated[int, typer.Option(help="render worker processes")] = 1,
    ready_timeout: Annotated[float, typer.Option(help="seconds to wait for the stack to become ready")] = 600.0,
) -> None:
    """Start the whole stack on this machine (no Docker) and keep it running until Ctrl-C.

    Embedded PostgreSQL + pgvector and Redis unless NIRVANA_DATABASE_URL / NIRVANA_BROKER_URL are set; blobs in
    DATA_DIR/blobs unless NIRVANA_STORAGE_URL is set; migrations; the API (uvicorn); one router (with beat);
    render workers.
    """
    from nirvana.config import get_settings
    from nirvana.embedded.stack import Stack

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    s = get_settings()
    port_ = s.api_port if port is None else port
    stack = Stack(_stack_config(_data_dir(data_dir), model, port_, render_workers, ready_timeout_s=ready_timeout))
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # Ctrl-C stops the stack even when started from a non-interactive shell's background job, which leaves
    # SIGINT ignored (and Python then installs no KeyboardInterrupt handler).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stack.start()
        typer.echo(f"nirvana is up: {stack.api_url}  (docs: {stack.api_url}/docs)")
        typer.echo(f"  database {stack.database_url}\n  broker   {stack.broker_url}\n  storage  {stack.storage_url}")
        typer.echo(f"  logs     {stack.data_dir / 'logs'}")
        typer.echo("  create a key:  nirvana keys create --tenant me      Ctrl-C stops everything")
        stack.supervise()
    except KeyboardInterrupt:
        pass
    except RuntimeError as e:
        typer.secho(str(e), fg=typer.colors.RED, err=True)
        stack.stop()
        raise typer.Exit(1) from e
    finally:
        typer.echo("stopping...")
        stack.stop()
        typer.echo("stopped")


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


# Options the demo and bench e2e share (the same workload and render settings).
WorkloadSeed = Annotated[int, typer.Option(help="workload seed")]
Steps = Annotated[int | None, typer.Option(help="denoising steps (default: the server's)")]
RenderMaxBatch = Annotated[
    int | None,
    typer.Option(
        min=1, max=256, help="requests each render worker denoises together (default NIRVANA_RENDER_MAX_BATCH)"
    ),
]


def demo(
    requests: Annotated[int, typer.Option(help="requests in the workload")] = 200,
    concurrency: Annotated[int, typer.Option(help="users submitting at once (closed loop)")] = 4,
    seed: WorkloadSeed = 0,
    steps: Steps = None,
    model: Annotated[str | None, typer.Option(help="model to serve (default NIRVANA_MODEL: bundled)")] = None,
    out: Annotated[Path, typer.Option(help="gallery and results directory")] = Path("out/demo"),
    gallery_items: Annotated[int, typer.Option("--gallery", help="approximate hits in the gallery")] = 12,
    url: Annotated[str | None, typer.Option(help="use a running service instead of starting one")] = None,
    api_key: Annotated[str | None, typer.Option(help="key for --url (every tenant then shares it)")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="embedded stack directory")] = None,
    render_workers: Annotated[int, typer.Option(help="render workers to start")] = 1,
    render_max_batch: RenderMaxBatch = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object last")] = False,
    direct_engine: Annotated[
        bool,
        typer.Option(
            "--direct-engine/--no-direct-engine",
            help="replay the same jobs through the engine in-process afterwards (service vs bare engine); "
            "with --url, pass the served model as --model",
        ),
    ] = False,
) -> None:
    """The main job: start the stack, run a realistic workload through the HTTP API, report and write a gallery.

    Prints hit rate, steps saved, latency p50/p95, throughput and service overhead; writes OUT/index.html
    (approximate hits beside their source and a full generation of the same prompt and seed) and
    OUT/results.json.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from nirvana.cli.demo import demo_requests, run_workload, write_gallery
    from nirvana.embedded.stack import Stack
    from nirvana.service.client import Client

    console = _stderr_console()
    stack = None
    clients: dict[str, Client] = {}
    run_tag = secrets.token_hex(3)
    reqs = demo_requests(requests, seed, run_tag, steps)
    tenants = sorted({r.tenant for r in reqs})
    try:
        if url:
            if not api_key:
                _err("--url needs --api-key")
            clients = {t: Client(url, api_key) for t in tenants}
        else:
            dd = _data_dir(data_dir) / "demo"
            console.print(f"starting the stack in {dd} (first start: ~30 s) ...")
            stack = Stack(_stack_config(dd, model, 0, render_workers, beat=True, render_max_batch=render_max_batch))
            stack.start()
            console.print(f"stack up at {stack.api_url}")
            from nirvana.service.jobs import make_pool
            from nirvana.service.keys import create_key

            pool = make_pool(stack.database_url, max_size=1, name="demo-keys")
            try:
                clients = {t: Client(stack.api_url, create_key(pool, t, name="demo")) for t in tenants}
            finally:
                pool.close()
        with Progress(
            TextColumn("[bold]requests"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("hits {task.fields[hits]} · failed {task.fields[failed]}"),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("run", total=len(reqs), hits=0, failed=0)
            counts = {"hits": 0, "failed": 0}

            def on_done(o: Any) -> None:
                if o.job is None or o.job["status"] != "done":
                    counts["failed"] += 1
                elif o.job["cache"]["tier"] != "miss":
                    counts["hits"] += 1
                bar.update(task, advance=1, hits=counts["hits"], failed=counts["failed"])

            res = run_workload(clients, reqs, concurrency=concurrency, on_done=on_done)
        s = res.summary
        if url is None:
            from nirvana.config import get_settings

            s["render_max_batch"] = render_max_batch or get_settings().render_max_batch
        out.mkdir(parents=True, exist_ok=True)
        html_path = None
        if gallery_items > 0:
            console.print("writing the gallery (full-generation references run with cache=off) ...")
            html_path = write_gallery(out, res, clients, gallery_items)
        s["gallery"] = str(html_path) if html_path else None
        if direct_engine:
            s["direct"] = _direct_replay(res, clients, model, console)
        results = [
            {"request": o.request.__dict__, "job": o.job, "latency_s": o.latency_s, "error": o.error}
            for o in res.outcomes
        ]
        (out / "results.json").write_text(json.dumps({"summary": s, "results": results}, indent=1))
        lines = [
            f"jobs {s['jobs']}  completed {s['completed']}  failed {s['failed']}",
            f"hit rate {s['hit_rate']:.1%}  (exact {s['exact_rate']:.1%}, approximate {s['approximate_rate']:.1%}, "
            f"mean K {s['mean_k']})",
            f"steps saved {s['steps_saved_fraction']:.1%}",
            f"latency p50 {s['p50_s']}s  p95 {s['p95_s']}s  p99 {s['p99_s']}s   "
            f"throughput {s['throughput_jobs_per_s']} jobs/s",
            *(
                f"  {t:<12} {v['jobs']:>4} jobs  p50 {v['p50_s']}s  p95 {v['p95_s']}s  p99 {v['p99_s']}s"
                for t, v in s["latency_by_tier"].items()
            ),
            f"service overhead (job wall − engine) p50 {s['overhead_p50_s']}s  p99 {s['overhead_p99_s']}s; "
            f"without waiting for a busy render worker p50 {s['overhead_excl_render_wait_p50_s']}s  "
            f"p99 {s['overhead_excl_render_wait_p99_s']}s",
            f"workload: near-duplicates {s['workload_near_duplicate']:.1%}, exact repeats "
            f"{s['workload_exact_repeat']:.1%}",
        ]
        if "direct" in s:
            d = s["direct"]
            lines.append(f"same jobs through the engine directly (service / direct: {d['service_over_direct']}x)")
            lines.extend(
                f"  {t:<12} {v['jobs']:>4} jobs  p50 {v['p50_s']}s  p95 {v['p95_s']}s  p99 {v['p99_s']}s  "
                f"service/direct p50 {d['overhead_ratio'][t]}"
                for t, v in d["direct_by_tier"].items()
            )
        if html_path:
            lines.append(f"gallery {html_path}")
        for line in lines:
            (console.print if as_json else typer.echo)(line)
        if as_json:
            typer.echo(json.dumps(s))
    finally:
        for c in clients.values():
            c.close()
        if stack is not None:
            stack.stop()


def _direct_replay(res: Any, clients: dict[str, Any], model: str | None, console: Any) -> dict[str, Any]:
    """``direct_engine_replay`` on the served model loaded in this process, with a progress bar."""
    from rich.progress import Progress

    from nirvana.cli.demo import direct_engine_replay
    from nirvana.config import get_settings
    from nirvana.engine.engine import DiffusionEngine
    from nirvana.engine.loader import load_model

    engine = DiffusionEngine(load_model(model or get_settings().model, device="auto"))
    with Progress(console=console) as bar:
        task = bar.add_task("direct engine replay", total=None)
        return direct_engine_replay(engine, res, clients, lambda i, n: bar.update(task, completed=i, total=n))


def render(
    file: Annotated[Path, typer.Argument(help="prompts: text lines or JSONL (JobRequest objects)")],
    out: Annotated[Path, typer.Option(help="output directory (PNGs + manifest.jsonl)")],
    steps: Annotated[int | None, typer.Option(help="default steps")] = None,
    model: Annotated[str | None, typer.Option(help="model to serve (embedded stack) / request")] = None,
    url: Annotated[str | None, typer.Option(help="a running service (default: start one)")] = None,
    api_key: Annotated[str | None, typer.Option(help="key for --url")] = None,
    tenant: Annotated[str, typer.Option(help="tenant for the embedded stack's key")] = "offline",
    data_dir: Annotated[Path | None, typer.Option(help="embedded stack directory")] = None,
) -> None:
    """Offline batch rendering through the service, with a progress bar; rerunning skips finished prompts."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from nirvana.embedded.stack import Stack, running_stack
    from nirvana.service.client import Client
    from nirvana.service.offline import render_file

    if not file.is_file():
        _err(f"{file} does not exist")
    console = _stderr_console()
    stack = None
    try:
        if url is None:
            dd = _data_dir(data_dir)
            info = running_stack(dd)
            if info is None:
                console.print(f"starting the stack in {dd} ...")
                stack = Stack(_stack_config(dd, model, 0, 1))
                stack.start()
                url, db = stack.api_url, stack.database_url
            else:
                url, db = str(info["api_url"]), str(info["database_url"])
            if api_key is None:
                from nirvana.service.jobs import make_pool
                from nirvana.service.keys import create_key

                pool = make_pool(db, max_size=1, name="render-key")
                try:
                    api_key = create_key(pool, tenant, name="nirvana render")
                finally:
                    pool.close()
        defaults: dict[str, Any] = {}
        if steps is not None:
            defaults["steps"] = steps
        if model is not None and stack is None:
            defaults["model"] = model
        with (
            Client(url, api_key) as client,
            Progress(
                TextColumn("[bold]render"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
            ) as bar,
        ):
            task = bar.add_task("render", total=None)
            stats = render_file(
                client, file, out, defaults, progress=lambda d, t: bar.update(task, completed=d, total=t)
            )
        typer.echo(json.dumps(stats))
    except ValueError as e:
        _err(str(e))
    finally:
        if stack is not None:
            stack.stop()


def bench_e2e(
    requests: Annotated[int, typer.Option(help="requests")] = 100,
    concurrency: Annotated[int, typer.Option(help="closed-loop users at once (1: pure service overhead)")] = 1,
    seed: WorkloadSeed = 0,
    steps: Steps = None,
    model: Annotated[str | None, typer.Option(help="model to serve")] = None,
    url: Annotated[str | None, typer.Option(help="use a running service")] = None,
    api_key: Annotated[str | None, typer.Option(help="key for --url")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="embedded stack directory")] = None,
    render_workers: Annotated[
        str, typer.Option(help="render worker processes; a comma list (e.g. 1,2) runs each side by side")
    ] = "1",
    render_max_batch: RenderMaxBatch = None,
    render_threads: Annotated[
        int | None, typer.Option(min=0, help="torch threads per render worker (default NIRVANA_RENDER_THREADS)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object last")] = False,
    direct_engine: Annotated[
        bool,
        typer.Option(
            "--direct-engine/--no-direct-engine",
            help="replay the same jobs through the engine in-process (service vs bare engine, same run)",
        ),
    ] = True,
) -> None:
    """End-to-end service benchmark: the demo workload without the gallery; latency p50/p95/p99 overall and for
    misses, approximate and exact hits, throughput, job wall time minus engine time, and (default) the same jobs
    through the engine directly in the same run: service / direct = the service's overhead. With several
    ``--render-workers`` counts, each runs on a fresh stack one after the other and jobs/s are compared."""
    counts = [int(v) for v in render_workers.split(",") if v.strip()] if render_workers.strip() else []
    if not counts or min(counts) < 1:
        raise typer.BadParameter(f"--render-workers must list integers >= 1, got {render_workers!r}")
    if len(counts) > 1:
        _bench_e2e_workers(counts, requests, concurrency, seed, steps, model, render_max_batch, render_threads, as_json)
        return
    if render_threads is not None:
        os.environ["NIRVANA_RENDER_THREADS"] = str(render_threads)
    demo(
        requests=requests,
        concurrency=concurrency,
        seed=seed,
        steps=steps,
        model=model,
        out=Path("out/bench-e2e"),
        gallery_items=0,
        url=url,
        api_key=api_key,
        data_dir=data_dir,
        render_workers=counts[0],
        render_max_batch=render_max_batch,
        as_json=as_json,
        direct_engine=direct_engine,
    )


def _bench_e2e_workers(
    counts: list[int],
    requests: int,
    concurrency: int,
    seed: int,
    steps: int | None,
    model: str | None,
    render_max_batch: int | None,
    render_threads: int | None,
    as_json: bool,
) -> None:
    """One ``nirvana demo --json`` per render-worker count (each its own fresh stack, same workload and seed), then
    jobs/s side by side."""
    import subprocess
    import sys

    rows = []
    for n in counts:
        argv = [sys.executable, "-m", "nirvana.cli", "demo", "--json", "--gallery", "0", "--requests", str(requests),
                "--concurrency", str(concurrency), "--seed", str(seed), "--render-workers", str(n),
                "--out", f"out/bench-e2e/workers-{n}"]  # fmt: skip
        argv += [] if steps is None else ["--steps", str(steps)]
        argv += [] if model is None else ["--model", model]
        argv += [] if render_max_batch is None else ["--render-max-batch", str(render_max_batch)]
        env = dict(os.environ)
        if render_threads is not None:
            env["NIRVANA_RENDER_THREADS"] = str(render_threads)
        typer.echo(f"render workers {n}: running the demo workload ...", err=True)
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            _err(f"demo with {n} render workers failed:\n{out.stderr[-2000:]}")
        s = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"render_workers": n, **{k: s[k] for k in ("throughput_jobs_per_s", "p50_s", "p95_s", "hit_rate",
                                                                 "completed", "failed")}})  # fmt: skip
    base = rows[0]["throughput_jobs_per_s"]
    for r in rows:
        r["ratio_vs_first"] = round(r["throughput_jobs_per_s"] / base, 3) if base else None
    typer.echo("| render workers | jobs/s | × first | p50 / p95 (s) | hit rate | completed / failed |")
    typer.echo("|---|---|---|---|---|---|")
    for r in rows:
        typer.echo(f"| {r['render_workers']} | {r['throughput_jobs_per_s']} | {r['ratio_vs_first']} | "
                   f"{r['p50_s']} / {r['p95_s']} | {r['hit_rate']} | {r['completed']} / {r['failed']} |")  # fmt: skip
    if as_json:
        typer.echo(json.dumps({"bench": "e2e-render-workers", "rows": rows}))


def register(app: typer.Typer, bench_app: typer.Typer) -> None:
    """Mount ``up``, ``keys``, ``demo``, ``render`` on the main CLI and ``e2e`` under ``bench``."""
    app.command("up")(up)
    app.command("demo")(demo)
    app.command("render")(render)
    app.add_typer(keys_app, name="keys")
    bench_app.command("e2e")(bench_e2e)


__all__ = ["register"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(os.EX_USAGE)
