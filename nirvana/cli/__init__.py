"""The ``nirvana`` command line (Typer). Heavy imports happen inside commands, never at import time.

This module holds ``app``, ``main`` and the model commands (``generate``, ``train-model``, ``train-probe``,
``eval-model``, ``gallery``, ``calibrate``, ``bench engine|quality``); the other commands live beside it and are
mounted by :func:`_mount_subcommands`: ``cache`` (``migrate``, ``cache …``), ``bench`` (``bench index|codecs|trace|
gpu|batching|router``) and ``service`` (``up``, ``demo``, ``render``, ``keys …``, ``bench e2e``). ``demo`` holds
the demo's workload driver (HTTP client side, gallery, in-process replay), used by ``demo`` and ``bench e2e``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    no_args_is_help=True, add_completion=False, help="nirvana: diffusion serving with approximate caching"
)
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (each prints ratios measured side by side in one run).")
app.add_typer(bench_app, name="bench")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size is None:
        return None, None
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        _fail(f"--size must look like WIDTHxHEIGHT (e.g. 32x32), got {size!r}")
        raise
    return h, w


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="text prompt")],
    steps: Annotated[int, typer.Option(help="denoising steps N")] = 50,
    guidance: Annotated[float | None, typer.Option(help="classifier-free guidance scale (model default)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the initial noise")] = 0,
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT (model default)")] = None,
    model: Annotated[str, typer.Option(help="'bundled', a local diffusers dir, or a hub id")] = "bundled",
    scheduler: Annotated[str, typer.Option(help="default | ddim | euler | dpmsolver++ | flowmatch-euler")] = "default",
    negative_prompt: Annotated[str, typer.Option(help="negative prompt")] = "",
    out: Annotated[Path, typer.Option(help="output PNG")] = Path("out.png"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
) -> None:
    """Generate one image with the engine (no cache)."""
    from nirvana.engine.engine import DiffusionEngine
    from nirvana.engine.loader import load_model

    height, width = _parse_size(size)
    try:
        engine = DiffusionEngine(load_model(model, device=device, scheduler=scheduler))
        res = engine.generate(
            [prompt],
            seeds=[seed],
            negative_prompts=[negative_prompt],
            steps=steps,
            guidance=guidance,
            height=height,
            width=width,
            capture=[],
        )
    except ValueError as e:
        _fail(str(e))
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    res.pil_images()[0].save(out)
    typer.echo(f"wrote {out} ({res.seconds:.2f}s, {res.steps_run} steps, model_key={res.model_key})")


@app.command("train-model")
def train_model_cmd(
    out: Annotated[Path, typer.Option(help="output pipeline directory")] = Path("nirvana/models/scenes-32"),
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 2300,
    batch_size: Annotated[int, typer.Option(help="batch size")] = 64,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    threads: Annotated[int, typer.Option(help="torch CPU threads (0 = torch default)")] = 0,
    lr: Annotated[float, typer.Option(help="peak learning rate")] = 5e-4,
    init_from: Annotated[Path | None, typer.Option(help="fine-tune the UNet of this pipeline directory")] = None,
    high_t_fraction: Annotated[float, typer.Option(help="share of timesteps drawn from [high-t-min, 1000)")] = 0.0,
    high_t_min: Annotated[int, typer.Option(help="lower end of the high-noise timestep range")] = 400,
    renders_per_scene: Annotated[int, typer.Option(help="renders per training scene")] = 16,
    prompts_per_scene: Annotated[int, typer.Option(help="paraphrases per training scene")] = 8,
    ema_decay: Annotated[float, typer.Option(help="EMA decay")] = 0.999,
    prediction_type: Annotated[
        str, typer.Option(help="training target: epsilon (default, the committed model) or v_prediction")
    ] = "epsilon",
    arch: Annotated[
        str, typer.Option(help="UNet shape for a fresh model: v1, v3 (global text path), v4 (v3 + coordinates)")
    ] = "v4",
    pyramid_discount: Annotated[
        float, typer.Option(help="multi-resolution training noise, weight discount**i per coarser level (0 = off)")
    ] = 0.8,
) -> None:
    """Train the bundled scene model (≈77 min on 2 cores, alone; the defaults reproduce the committed v4).
    Retrain rarely: weights live in git."""
    from nirvana.scene.train import train_model

    summary = train_model(
        out,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        threads=threads or None,
        lr=lr,
        init_from=init_from,
        high_t_fraction=high_t_fraction,
        high_t_min=high_t_min,
        renders_per_scene=renders_per_scene,
        prompts_per_scene=prompts_per_scene,
        ema_decay=ema_decay,
        prediction_type=prediction_type,
        arch=arch,
        pyramid_discount=pyramid_discount,
    )
    typer.echo(json.dumps(summary))


@app.command("train-probe")
def train_probe_cmd(
    out: Annotated[Path, typer.Option(help="output directory")] = Path("nirvana/models/probe-32"),
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 800,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
) -> None:
    """Train the attribute probe used by adherence and probe-FID (a few minutes)."""
    from nirvana.scene.probe import train_probe

    typer.echo(json.dumps(train_probe(out, steps=steps, seed=seed)))


@app.command("eval-model")
def eval_model_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="last line: one JSON object")] = False,
    model: Annotated[str, typer.Option(help="model reference")] = "bundled",
    steps: Annotated[int, typer.Option(help="denoising steps N")] = 50,
    guidance: Annotated[float | None, typer.Option(help="guidance (model default)")] = None,
    pairs: Annotated[int, typer.Option(help="prompt pairs for the K × similarity table (0 = skip)")] = 240,
    out: Annotated[Path | None, typer.Option(help="also write the JSON here")] = None,
) -> None:
    """Adherence, probe accuracy and probe-FID on held-out combinations, and the K × similarity table."""
    from nirvana.scene.evaluate import evaluate_model, format_table

    engine, metrics = _bundled_engine_and_probe(model)
    res = evaluate_model(engine, metrics, steps=steps, guidance=guidance, pairs=pairs)
    typer.echo(f"model_key            {res['model_key']}")
    typer.echo(f"adherence            {res['adherence']:.3f}  (held-out combinations: {res['held_out_scenes']})")
    for a, v in res["per_attribute"].items():
        typer.echo(f"  {a:<18} {v:.3f}")
    typer.echo(f"probe_accuracy       {res['probe_accuracy']:.3f}  (probe on real renders)")
    typer.echo(f"probe_fid            {res['probe_fid']:.3f}")
    typer.echo(
        f"s/image single       {res['seconds_per_image_single']:.2f}  batched {res['seconds_per_image_batched']:.3f}"
    )
    if res["table"]:
        typer.echo("\nadherence resuming from a different prompt's state (count), by MiniLM similarity:")
        typer.echo(format_table(res["table"]))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
    if as_json:
        typer.echo(json.dumps(res))


@app.command()
def gallery(
    out: Annotated[Path, typer.Option(help="output directory")] = Path("out/gallery"),
    n: Annotated[int, typer.Option(help="number of images")] = 24,
    steps: Annotated[int, typer.Option(help="denoising steps")] = 50,
) -> None:
    """Render a gallery of the bundled model (PNG grid + HTML with prompts) and print adherence."""
    from nirvana.scene.gallery import render_gallery

    res = render_gallery(out, n=n, steps=steps)
    typer.echo(f"wrote {res['html']} and {res['grid']}")
    typer.echo(f"adherence {res['adherence']:.3f} over {n} held-out prompts ({res['seconds']:.1f}s)")


def _bundled_engine_and_probe(model: str = "bundled"):  # type: ignore[no-untyped-def]
    from nirvana.config import bundled_probe_dir
    from nirvana.engine.engine import DiffusionEngine
    from nirvana.engine.loader import load_model
    from nirvana.scene.metrics import ProbeMetrics

    try:
        return DiffusionEngine(load_model(model, device="auto")), ProbeMetrics(bundled_probe_dir())
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
        raise


@app.command()
def calibrate(
    target: Annotated[float, typer.Option(help="hits keep >= target x full-generation adherence")] = 0.97,
    out: Annotated[
        Path | None, typer.Option(help="policy file to write (default: the packaged calibrated table)")
    ] = None,
    pairs: Annotated[int, typer.Option(help="prompt pairs measured")] = 600,
    min_count: Annotated[int, typer.Option(help="buckets with fewer pairs get no K")] = 10,
    report: Annotated[Path, typer.Option(help="report directory")] = Path("out/bench"),
    as_json: Annotated[bool, typer.Option("--json", help="last line: one JSON object")] = False,
    table_file: Annotated[
        Path | None,
        typer.Option("--table", help="fit on the K x similarity table of `eval-model --out FILE` instead of measuring"),
    ] = None,
) -> None:
    """Fit the similarity → K table of the bundled model to a quality target; write it as a policy file.

    Measuring the table costs ~6 s per pair on 2 cores; ``--table`` reuses one ``eval-model`` already measured
    (it must be of the bundled model as loaded now: its ``model_key`` is checked).
    """
    from nirvana.bench.calibrate import fit_policy
    from nirvana.bench.report import md_table, write_report
    from nirvana.cache.policy import KPolicy, policies_dir
    from nirvana.scene.evaluate import format_table, k_similarity_table, make_pairs

    engine, metrics = _bundled_engine_and_probe()
    if table_file is not None:
        try:
            saved = json.loads(table_file.read_text())
        except (OSError, ValueError) as e:
            _fail(f"--table: cannot read {table_file}: {e}")
            return
        if not isinstance(saved, dict) or not isinstance(saved.get("table"), dict):
            _fail(f"--table: {table_file} has no 'table' (write it with `nirvana eval-model --pairs N --out FILE`)")
            return
        if saved.get("model_key") != engine.model_key():
            _fail(f"--table: measured on {saved.get('model_key')!r}, the bundled model is {engine.model_key()!r}")
            return
        table = saved["table"]
    else:
        table = k_similarity_table(engine, metrics, make_pairs(pairs, seed=100))
    try:
        policy, decisions = fit_policy(table, target, min_count=min_count)
    except ValueError as e:
        _fail(str(e))
        return
    KPolicy.from_dict(policy)  # validate before writing
    dest = out or policies_dir() / "calibrated-scenes-32.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps({**policy, "model_key": engine.model_key()}, indent=2) + "\n")
    typer.echo(format_table(table))
    rows = [
        [f"{d['bucket'][0]:.2f}-{d['bucket'][1]:.2f}", d["count"], d["full"], d["k_raw"], d["k"]] for d in decisions
    ]
    md = "\n".join(
        [
            f"# calibrate (target {target})",
            "",
            "K x similarity table:",
            "",
            "```",
            format_table(table),
            "```",
            "",
            md_table(["bucket", "pairs", "full adherence", "K (bucket)", "K (monotone)"], rows),
            "",
            "```json",
            json.dumps(policy, indent=2),
            "```",
        ]
    )
    write_report(report, "calibrate", {"table": table, "decisions": decisions, "policy": policy}, md)
    typer.echo(f"wrote {dest}: " + ", ".join(f"s>{r['min_similarity']:.2f}→{r['k']}" for r in policy["rules"]))
    if as_json:
        typer.echo(json.dumps({"policy": policy, "path": str(dest)}))


@bench_app.command("engine")
def bench_engine_cmd(
    model: Annotated[
        str, typer.Option(help="'tiny' (random SD-shaped, built here), 'bundled', or a model ref")
    ] = "tiny",
    steps: Annotated[int, typer.Option(help="N")] = 50,
    repeats: Annotated[int, typer.Option(help="runs per measurement (median)")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="last line: one JSON object")] = False,
) -> None:
    """Wall time of a full run and of runs resumed at K = 10 and 25, as ratios (same process)."""
    from nirvana.bench.engine import bench_engine

    res = bench_engine(model, steps=steps, repeats=repeats)
    typer.echo(f"full N={steps}: {res['full_s']:.3f}s")
    for k in (10, 25):
        ratio, ideal = res[f"k{k}_ratio"], res[f"k{k}_ideal_ratio"]
        typer.echo(f"resume K={k}: {res[f'k{k}_s']:.3f}s  ratio {ratio:.3f}  (ideal {ideal:.2f})")
    if as_json:
        typer.echo(json.dumps(res))


@bench_app.command("quality")
def bench_quality(
    as_json: Annotated[bool, typer.Option("--json", help="last line: one JSON object")] = False,
    pairs: Annotated[int, typer.Option(help="prompt pairs")] = 300,
    out: Annotated[Path, typer.Option(help="report directory")] = Path("out/bench"),
    policy: Annotated[Path | None, typer.Option(help="calibrated policy file (default: packaged)")] = None,
) -> None:
    """Quality vs compute: full, paper K, calibrated K, fewer steps, retrieval-only, each latent codec."""
    from nirvana.bench.quality import quality_markdown, quality_plot, run_quality
    from nirvana.bench.report import plot_path, write_report
    from nirvana.cache.policy import KPolicy, policies_dir

    engine, metrics = _bundled_engine_and_probe()
    cal_path = policy or policies_dir() / "calibrated-scenes-32.json"
    calibrated = KPolicy.from_file(cal_path) if cal_path.exists() else None
    if calibrated is None:
        typer.echo(f"note: no calibrated table at {cal_path}; run `nirvana calibrate` (row 'calibrated' skipped)")
    res = run_quality(engine, metrics, calibrated, n_pairs=pairs)
    plot = plot_path(out, "quality")
    quality_plot(res, plot)
    md = quality_markdown(res, plot)
    write_report(out, "quality", res, md)
    typer.echo(md)
    if as_json:
        typer.echo(json.dumps(res))


def _mount_subcommands() -> None:
    """Mount the cache, bench and service sub-commands (their modules import heavy packages lazily).

    Idempotent: tests that drive ``app`` in-process call it too.
    """
    if any(c.name == "trace" for c in bench_app.registered_commands):
        return
    from nirvana.cli.bench import register as register_bench
    from nirvana.cli.cache import register as register_cache
    from nirvana.cli.service import register as register_service

    for register in (register_cache, register_bench, register_service):
        register(app, bench_app)


def main() -> None:
    _mount_subcommands()
    app()
