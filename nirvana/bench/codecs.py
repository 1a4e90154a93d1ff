"""``nirvana bench codecs``: bytes per stored state for each latent codec, and what decoding costs in output
quality — images resumed from each codec's decoded state compared with those resumed from the exact state, and
(when a metric is available) the bundled model's adherence.

Needs a model: ``bundled`` (skipped with a message when ``nirvana/models/scenes-32/model_index.json`` is absent),
``tiny`` (random-weight tiny SD, for tests), or a local diffusers directory.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from nirvana.scene.metrics import ImageMetric


def _bundled_present() -> tuple[bool, Path]:
    from nirvana.config import bundled_model_dir

    d = bundled_model_dir()
    return (d / "model_index.json").exists(), d


def _default_metric(model: str) -> tuple[ImageMetric | None, str]:
    """The attribute-probe metric for the bundled model, if its probe is present."""
    if model != "bundled":
        return None, "adherence needs the bundled model and its probe"
    try:
        from nirvana.config import bundled_probe_dir
        from nirvana.scene.metrics import ProbeMetrics

        probe = bundled_probe_dir()
        if not probe.exists():
            return None, f"probe not found at {probe}"
        return ProbeMetrics(probe), ""
    except Exception as e:  # the metric is optional: report why it is missing
        return None, f"probe metric unavailable: {type(e).__name__}: {e}"


def _prompts(model: str, n: int, seed: int) -> list[str]:
    import random

    if model == "bundled":
        from nirvana.scene.world import all_scenes, write_prompt

        rng = random.Random(seed)
        return [write_prompt(s, rng) for s in rng.sample(all_scenes(), n)]
    base = [
        "a red circle on a white background",
        "a blue square in the top left",
        "a green triangle, small",
        "a yellow star on black",
        "a large purple circle in the center",
        "an orange square, bottom right",
    ]
    return [base[i % len(base)] for i in range(n)]


def run_codecs_bench(
    model: str = "bundled",
    n_prompts: int = 16,
    steps: int = 50,
    ks: tuple[int, ...] = (10, 25),
    codecs: tuple[str, ...] | None = None,
    seed: int = 0,
    metric: ImageMetric | None = None,
    print_table: bool = True,
) -> dict[str, Any]:
    """Measure every codec; returns a JSON-able dict (``{"skipped": True, "reason": ...}`` without the model).

    Raises:
        ValueError: ``n_prompts`` < 1, or a k outside 1..steps-1.
    """
    from nirvana.cache.store import CODECS, decode_latent, encode_latent

    codecs = codecs or CODECS
    if n_prompts < 1:
        raise ValueError(f"n_prompts must be >= 1, got {n_prompts}")
    for k in ks:
        if not 0 < k < steps:
            raise ValueError(f"ks must be in 1..{steps - 1}, got {k}")
    if model == "bundled":
        present, d = _bundled_present()
        if not present:
            reason = f"bundled model not found ({d / 'model_index.json'} missing; `nirvana train-model` makes it)"
            if print_table:
                print(f"bench codecs: skipped: {reason}")
            return {"skipped": True, "reason": reason}
    import torch

    from nirvana.engine.engine import DiffusionEngine
    from nirvana.engine.loader import load_model

    metric_note = ""
    if metric is None:
        metric, metric_note = _default_metric(model)
    with tempfile.TemporaryDirectory() as tmp:
        ref = model
        if model == "tiny":
            from nirvana.engine.tiny import build_tiny_sd

            ref = str(build_tiny_sd(Path(tmp) / "tiny-sd"))
        engine = DiffusionEngine(load_model(ref, device="cpu"))
    prompts = _prompts(model, n_prompts, seed)
    seeds = list(range(seed, seed + n_prompts))
    t0 = time.perf_counter()
    full = engine.generate(prompts, seeds=seeds, steps=steps, capture=list(ks))
    res: dict[str, Any] = {"model": model, "model_key": full.model_key, "steps": steps, "prompts": n_prompts,
                           "ks": list(ks), "rows": [], "adherence_note": metric_note or None}  # fmt: skip
    if metric is not None:
        res["adherence_full"] = metric.score(full.pil_images(), prompts).get("adherence")
    for k in ks:
        states = [next(s for s in per if s.step == k) for per in full.states]
        exact = engine.generate(prompts, seeds=seeds, steps=steps, start=states, capture=[])
        for codec in codecs:
            blobs = [encode_latent(s.latent.numpy(), codec) for s in states]
            dec = [torch.from_numpy(decode_latent(b)[0]) for b in blobs]
            lat_err = max(float((d - s.latent).abs().max()) for d, s in zip(dec, states, strict=True))
            resumed = [type(s)(d, s.step, s.num_steps, s.timestep, s.scheduler_family, s.model_key, s.sigma)
                       for d, s in zip(dec, states, strict=True)]  # fmt: skip
            out = engine.generate(prompts, seeds=seeds, steps=steps, start=resumed, capture=[])
            diff = (out.images - exact.images).float()
            mse = float((diff / 2).pow(2).mean())  # images in [-1, 1] → [0, 1] scale
            row = {
                "k": k,
                "codec": codec,
                "bytes_per_state": statistics.mean(len(b) for b in blobs),
                "raw_fp32_bytes": int(states[0].latent.numel() * 4),
                "latent_max_abs_err": lat_err,
                "image_max_abs_diff_px": float(diff.abs().max() / 2 * 255),
                "image_psnr_db": (10 * math.log10(1 / mse)) if mse > 0 else math.inf,
            }
            if metric is not None:
                row["adherence"] = metric.score(out.pil_images(), prompts).get("adherence")
            res["rows"].append(row)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    if print_table:
        print(format_codecs_table(res))
    return res


def format_codecs_table(res: dict[str, Any]) -> str:
    if res.get("skipped"):
        return f"bench codecs: skipped: {res['reason']}"
    lines = [
        f"codecs: model={res['model']} steps={res['steps']} prompts={res['prompts']} ({res['seconds']}s)",
        f"{'k':>3} {'codec':>10} {'bytes':>8} {'vs fp32':>8} {'lat err':>9} {'px diff':>8} {'PSNR dB':>8} "
        f"{'adherence':>9}",
    ]
    for r in res["rows"]:
        adh = f"{r['adherence']:.3f}" if r.get("adherence") is not None else "-"
        psnr = f"{r['image_psnr_db']:.1f}" if math.isfinite(r["image_psnr_db"]) else "inf"
        ratio = r["bytes_per_state"] / r["raw_fp32_bytes"]
        lines.append(
            f"{r['k']:>3} {r['codec']:>10} {r['bytes_per_state']:>8.0f} {ratio:>8.3f} "
            f"{r['latent_max_abs_err']:>9.2e} {r['image_max_abs_diff_px']:>8.2f} {psnr:>8} {adh:>9}"
        )
    if res.get("adherence_full") is not None:
        lines.append(f"adherence of the full runs (no resume): {res['adherence_full']:.3f}")
    elif res.get("adherence_note"):
        lines.append(f"adherence: not measured ({res['adherence_note']})")
    return "\n".join(lines)


def to_json(res: dict[str, Any]) -> str:
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        if isinstance(v, np.generic):
            return v.item()
        return v

    return json.dumps(clean(res), separators=(",", ":"))
