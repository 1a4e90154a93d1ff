"""The ``bench trace`` run: every policy at the headline budget and the budget sweep, in one process or several.

Owns :func:`run_trace_bench` (load the trace, embed, build the size and cost models, decide which replays are
needed and which a checkpoint already holds, run them, assemble the result dict the report reads) and
:class:`ReplayTasks`, the explicit context every replay task reads: built once per run before any worker forks,
handed to the workers by fork (:func:`~nirvana.bench.trace.forked.forked_map`) and never changed afterwards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nirvana.bench.trace.checkpoints import (
    append_checkpoint,
    load_checkpoint,
    progress_points,
    replay_fingerprint,
    requests_digest,
)
from nirvana.bench.trace.costs import (
    DEFAULT_IMAGE_BYTES_PER_PIXEL,
    FP32_BYTES_PER_LATENT_PIXEL,
    SizeModel,
    measure_state_bytes,
    step_cost_512,
)
from nirvana.bench.trace.embeddings import embed_with_cache
from nirvana.bench.trace.forked import forked_map
from nirvana.bench.trace.load import TraceRequest, load_replay
from nirvana.bench.trace.policies import PolicySpec, ablation_specs, calibrated_table_path, default_specs
from nirvana.bench.trace.replayer import replay
from nirvana.bench.trace.server import PostgresServer
from nirvana.cache.eviction import DEFAULT_IMAGE_BUDGET_FRACTION

log = logging.getLogger(__name__)

DEFAULT_SWEEP_BUDGETS = (1000, 3000, 10000, 30000, 100000)

Task = tuple[str, str, tuple[int, ...]]  # (dataset, spec name, budgets)
TaskRow = tuple[str, str, int, dict[str, Any]]  # (dataset, spec name, budget bytes, replay row)


@dataclass(frozen=True)
class ReplayTasks:
    """What the replay tasks of one run share, and the task itself (:meth:`run`).

    Built once in the parent before any worker forks; a forked worker gets it with the fork (never pickled), so the
    requests and their embeddings are not copied per task. Read-only afterwards.

    Attributes:
        data: dataset name (``head``, ``sweep``) → its requests in order and their embeddings (a row each).
        specs: policy name → its configuration.
        server: where each replay gets its fresh database.
        sizes: the size model every replay accounts bytes with.
        space: the embedding space's name.
        step_cost: seconds per 512² step of the cost model.
        verbose: log progress.
        checkpoint: the checkpoint file (None: no checkpoint).
        fps: (dataset, policy) → the replay fingerprint its checkpoint rows carry.
        snapshot_every: a prefix row every this many requests (0: none).
    """

    data: Mapping[str, tuple[Sequence[TraceRequest], np.ndarray]]
    specs: Mapping[str, PolicySpec]
    server: PostgresServer
    sizes: SizeModel
    space: str
    step_cost: float
    verbose: bool
    checkpoint: Path | None
    fps: Mapping[tuple[str, str], str]
    snapshot_every: int

    def run(self, task: Task) -> list[TaskRow]:
        """One task: (dataset, spec name, budgets) → a replay row per budget, each on a fresh database.

        Budgets run in ascending order; once a replay evicted nothing, every larger budget would replay the same
        way (the budget only matters through eviction; see :func:`replay_fingerprint` on determinism), so those rows
        are copies of it marked ``same_as_budget_bytes`` instead of being run again. Each row goes to the checkpoint
        as soon as it exists, so a task stopped part-way keeps the budgets it finished.
        """
        dataset, name, budgets = task
        reqs, emb = self.data[dataset]
        spec = self.specs[name]
        fp = self.fps[(dataset, name)]
        ckpt = self.checkpoint
        out: list[TaskRow] = []
        done: dict[str, Any] | None = None

        def finished(budget: int, row: dict[str, Any]) -> None:
            if ckpt is not None:
                append_checkpoint(ckpt, dataset, name, budget, fp, row)
            out.append((dataset, name, budget, row))

        for budget in sorted(budgets):
            if done is not None:
                finished(budget, {**done, "same_as_budget_bytes": done["budget_bytes"]})
                continue
            label = f"{name}@{budget // max(self.sizes.prompt_bytes_fp32_512(), 1)}p/{dataset}"

            def prog(i: int, n: int, label: str = label) -> None:
                if self.verbose:
                    log.info("%s: %d/%d", label, i, n)

            def snap(row: dict[str, Any], budget: int = budget) -> None:
                if ckpt is not None:
                    append_checkpoint(ckpt, dataset, name, budget, fp, row, partial=True)

            url = self.server.fresh()
            try:
                row = replay(url, reqs, emb, spec, budget, self.sizes, embed_space=self.space,
                             step_cost_s=self.step_cost, progress=prog, snapshot_every=self.snapshot_every,
                             on_snapshot=snap if ckpt is not None else None)  # fmt: skip
            finally:
                self.server.drop(url)
            if self.verbose:
                log.info(
                    "done %s: steps saved %.4f in %.0f s", label, row["steps_saved_fraction"], row["timing"]["wall_s"]
                )
            finished(budget, row)
            if row["evictions"] == 0 or not spec.bounded:
                done = row
        return out


def run_trace_bench(
    files: Sequence[Path | str],
    *,
    limit: int | None = None,
    budget_prompts: int = 10000,
    policies: Sequence[str] | None = None,
    sweep_budgets: Sequence[int] = DEFAULT_SWEEP_BUDGETS,
    sweep_limit: int | None = None,
    sweep_policies: Sequence[str] | None = None,
    database_url: str | None = None,
    cache_dir: Path | str | None = None,
    embedder: Any = None,
    image_bytes_per_pixel: float = DEFAULT_IMAGE_BYTES_PER_PIXEL,
    step_cost_s: float | None = None,
    calibrated: Path | None = None,
    image_budget_fraction: float | None = DEFAULT_IMAGE_BUDGET_FRACTION,
    jobs: int = 1,
    verbose: bool = True,
    checkpoint: Path | None = None,
    resume: bool = False,
    snapshot_every: int = 20000,
) -> dict[str, Any]:
    """Replay the trace for every policy at ``budget_prompts`` and sweep the budgets; returns a JSON-able dict.

    ``limit`` caps requests per trace file for the headline run, ``sweep_limit`` (default: ``limit``) for the
    sweep; an empty ``sweep_budgets`` skips the sweep. ``jobs`` > 1 replays policies in parallel (forked
    processes, one database each, same server). ``checkpoint``, if given, gets one JSON line per finished replay,
    stamped with a fingerprint of everything the replay's result depends on (:func:`replay_fingerprint`);
    ``resume`` takes the rows of ``checkpoint`` whose fingerprint matches instead of replaying them again (a
    full-trace run takes hours: an interrupted one continues where it stopped). Replays also write a prefix row
    (``"partial": true``) every ``snapshot_every`` requests; those are never resumed from, only read.

    Raises:
        ValueError: bad sizes, budgets or policy names.
    """
    if budget_prompts < 1:
        raise ValueError(f"budget_prompts must be >= 1, got {budget_prompts}")
    if any(b < 1 for b in sweep_budgets):
        raise ValueError("sweep budgets must be >= 1 prompt")
    if image_bytes_per_pixel < 0:
        raise ValueError("image_bytes_per_pixel must be >= 0")
    if image_budget_fraction is not None and not 0.0 <= image_budget_fraction <= 1.0:
        raise ValueError(f"image_budget_fraction must be in [0, 1], got {image_budget_fraction}")
    if not 1 <= jobs <= 16:
        raise ValueError(f"jobs must be in 1..16, got {jobs}")
    if snapshot_every < 0:
        raise ValueError(f"snapshot_every must be >= 0, got {snapshot_every}")
    defaults = default_specs(calibrated, image_budget_fraction)
    all_specs = {s.name: s for s in [*defaults, *ablation_specs(image_budget_fraction)]}
    notes: list[str] = []
    wanted = list(policies) if policies else [s.name for s in defaults]
    if "ours_calibrated" in wanted and "ours_calibrated" not in all_specs:
        notes.append(f"ours_calibrated skipped: no calibrated table at {calibrated or calibrated_table_path()}")
        wanted.remove("ours_calibrated")
    elif not policies and "ours_calibrated" not in all_specs:
        notes.append(f"ours_calibrated skipped: no calibrated table at {calibrated or calibrated_table_path()}")
    unknown = [p for p in wanted if p not in all_specs]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {sorted(all_specs)}")
    sweep_wanted = [p for p in (sweep_policies or wanted) if p in all_specs]
    t_all = time.perf_counter()

    # Trace, clock, embeddings.
    reqs, chan_info = load_replay(files, limit)
    sweep_lim = sweep_limit if sweep_limit is not None else limit
    do_sweep = bool(sweep_budgets) and bool(sweep_wanted)
    sweep_reqs = reqs
    if do_sweep and sweep_lim != limit:
        sweep_reqs, _ = load_replay(files, sweep_lim)
    if not reqs:
        raise ValueError("the trace files hold no usable requests")
    if embedder is None:
        from nirvana.cache.embedder import MiniLMEmbedder

        embedder = MiniLMEmbedder(batch_size=128)
    texts = [r.prompt for r in reqs] + ([r.prompt for r in sweep_reqs] if sweep_reqs is not reqs else [])

    def eprog(i: int, n: int) -> None:
        if verbose:
            log.info("embedded %d/%d distinct prompts", i, n)

    emb_all, emb_info = embed_with_cache(texts, embedder, cache_dir, progress=eprog)
    emb = emb_all[: len(reqs)]
    sweep_emb = emb if sweep_reqs is reqs else emb_all[len(reqs) :]
    if emb_info["embed_ms_per_prompt"] is None or emb_info["distinct_embedded"] < 256:
        sample = list(dict.fromkeys(r.prompt for r in reqs))[:256]
        embedder.embed(sample[:8])  # load the model outside the timing
        t0, c0 = time.perf_counter(), time.process_time()
        embedder.embed(sample)
        emb_info["embed_ms_per_prompt_sample"] = round(1000 * (time.perf_counter() - t0) / max(len(sample), 1), 3)
        emb_info["embed_cpu_ms_per_prompt_sample"] = round(1000 * (time.process_time() - c0) / max(len(sample), 1), 3)
    embed_ms = emb_info.get("embed_ms_per_prompt_sample") or emb_info["embed_ms_per_prompt"]
    embed_cpu_ms = emb_info.get("embed_cpu_ms_per_prompt_sample") or emb_info["embed_cpu_ms_per_prompt"]

    # Size and cost models.
    codec_sizes = measure_state_bytes()
    sizes = SizeModel(
        {c: (FP32_BYTES_PER_LATENT_PIXEL if c == "fp32" else v["bytes_per_latent_pixel"]) for c, v in
         codec_sizes.items()},
        image_bytes_per_pixel,
    )  # fmt: skip
    measured_cost = step_cost_512(reqs)
    cost = step_cost_s if step_cost_s is not None else (measured_cost or 0.1)
    cost_source = "given" if step_cost_s is not None else ("trace gen_seconds" if measured_cost else "default 0.1 s")
    unit = sizes.prompt_bytes_fp32_512()
    budget = budget_prompts * unit

    need: dict[tuple[str, str], set[int]] = {("head", p): {budget} for p in wanted}
    sweep_ds = "head" if sweep_reqs is reqs else "sweep"
    if do_sweep:
        for p in sweep_wanted:
            bs = {b * unit for b in sweep_budgets} if all_specs[p].bounded else {budget}
            need.setdefault((sweep_ds, p), set()).update(bs)
    data = {"head": (reqs, emb), "sweep": (sweep_reqs, sweep_emb)}
    common = {"sizes": sizes.bytes_per_latent_pixel, "image_bytes_per_pixel": image_bytes_per_pixel,
              "step_cost_s": cost, "space": embedder.space}  # fmt: skip
    digests = {ds: requests_digest(data[ds][0]) for ds in {ds for ds, _ in need}}
    fps = {(ds, p): replay_fingerprint(digests[ds], all_specs[p], common) for (ds, p) in need}
    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    if resume and checkpoint is not None:
        done = load_checkpoint(checkpoint, fps)
        for (ds, p, b), row in done.items():
            if b in need[(ds, p)]:
                results[(ds, p, b)] = row
                need[(ds, p)].discard(b)
        if verbose:
            log.info("resumed %d replays from %s", len(results), checkpoint)
    todo = [(ds, p, tuple(sorted(bs))) for (ds, p), bs in need.items() if bs]
    # The headline first (what the JSON's "policies" need), then the sweep, longest tasks first.
    todo.sort(key=lambda t: (t[0] != "head", -len(reqs if t[0] == "head" else sweep_reqs) * len(t[2])))
    server = PostgresServer(database_url)
    tasks = ReplayTasks(
        data=data,
        specs=all_specs,
        server=server,
        sizes=sizes,
        space=embedder.space,
        step_cost=cost,
        verbose=verbose,
        checkpoint=checkpoint,
        fps=fps,
        snapshot_every=snapshot_every,
    )
    try:
        if jobs > 1 and len(todo) > 1:
            for rows in forked_map(tasks.run, todo, min(jobs, len(todo))):
                results.update({(ds, name, b): row for ds, name, b, row in rows})
        else:
            for t in todo:
                results.update({(ds, name, b): row for ds, name, b, row in tasks.run(t)})
    finally:
        server.close()

    pol = {name: results[("head", name, budget)] for name in wanted}
    for name, row in pol.items():
        row["note"] = all_specs[name].note
        row["codec"] = all_specs[name].codec
        row["table"] = Path(all_specs[name].table).name if all_specs[name].table != "paper" else "paper"
    router: dict[str, Any] = {"embed_ms_per_prompt": embed_ms, "embed_cpu_ms_per_prompt": embed_cpu_ms}
    src = pol.get("ours") or next(iter(pol.values()))
    cache_ms = src["timing"]["ms_per_request"]
    router["cache_ms_per_request"] = cache_ms
    router["cache_client_cpu_ms_per_request"] = src["timing"].get("client_cpu_ms_per_request")
    router["measured_on"] = "ours" if "ours" in pol else next(iter(pol))
    router_pps = 1000.0 / (cache_ms + (embed_ms or 0.0)) if cache_ms + (embed_ms or 0.0) > 0 else None
    sweep_rows = []
    for (d, name, b), row in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if not do_sweep or d != sweep_ds or name not in sweep_wanted:
            continue
        extra = {"same_as_budget_prompts": row["same_as_budget_bytes"] // unit} if "same_as_budget_bytes" in row else {}
        if not all_specs[name].bounded:
            sweep_rows.append({"policy": name, "budget_prompts": None, "budget_bytes": None, **_brief(row)})
        elif b in [x * unit for x in sweep_budgets]:
            sweep_rows.append({"policy": name, "budget_prompts": b // unit, "budget_bytes": b, **_brief(row), **extra})
    return {
        "bench": "trace",
        "requests": len(reqs),
        "requests_per_channel_limit": limit,
        "channels": chan_info,
        "replay_model": (
            "one cache (one database, one global byte budget) for all channels; tenant = channel (no cross-channel "
            "reuse); model_key = model/WxH/sampler; channel files keep their order and are merged by the "
            "interpolated clock; one trajectory per request (n_images ignored)"
        ),
        "budget_prompts": budget_prompts,
        "budget_bytes": budget,
        "prompt_unit_bytes": unit,
        "codec_bytes": codec_sizes,
        "image_bytes_per_pixel": image_bytes_per_pixel,
        "image_budget_fraction": image_budget_fraction,
        "image_bytes_512": sizes.image_bytes(TraceRequest(0, "", "", "x", 0, 7.0, 50, 512, 512, 1, "", None)),
        "step_cost_s_512": round(cost, 4),
        "step_cost_source": cost_source,
        "policies": pol,
        "router_prompts_per_s": round(router_pps, 1) if router_pps else None,
        "router": router,
        "embedding": emb_info,
        "sweep": {
            "requests": len(sweep_reqs) if do_sweep else 0,
            "requests_per_channel_limit": sweep_lim,
            "budgets_prompts": list(sweep_budgets) if do_sweep else [],
            "rows": sweep_rows,
        },
        "progress": progress_points(checkpoint, fps, budget, pol),
        "notes": notes,
        "wall_s": round(time.perf_counter() - t_all, 1),
    }


def _brief(row: dict[str, Any]) -> dict[str, Any]:
    """The columns of a sweep row."""
    return {k: row[k] for k in ("requests", "hit_rate", "steps_saved_fraction", "gpu_seconds_saved_fraction", "bytes",
                                "prompts_stored")}  # fmt: skip
