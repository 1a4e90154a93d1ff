"""A gallery of the bundled model: a PNG grid and an HTML page with the prompts and whether the probe agrees."""

from __future__ import annotations

import html
import random
import time
from pathlib import Path
from typing import Any

from PIL import Image

from nirvana.config import bundled_probe_dir
from nirvana.engine.engine import DiffusionEngine, to_pil
from nirvana.engine.loader import load_model
from nirvana.scene.evaluate import generate_batched
from nirvana.scene.metrics import ProbeMetrics
from nirvana.scene.world import render, split_scenes, write_prompt


def image_grid(images: list[Image.Image], cols: int, scale: int = 4) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w * scale, rows * h * scale), (255, 255, 255))
    for i, im in enumerate(images):
        big = im.resize((w * scale, h * scale), Image.Resampling.NEAREST)
        grid.paste(big, ((i % cols) * w * scale, (i // cols) * h * scale))
    return grid


def render_gallery(out: Path, n: int = 24, steps: int = 50, seed: int = 0) -> dict[str, Any]:
    """Generate ``n`` held-out prompts, write ``grid.png`` (generated | rendered truth) and ``index.html``."""
    out = Path(out)
    (out / "img").mkdir(parents=True, exist_ok=True)
    engine = DiffusionEngine(load_model("bundled"))
    metrics = ProbeMetrics(bundled_probe_dir())
    rng = random.Random(seed)
    held = split_scenes()[1]
    scenes = [held[i] for i in rng.sample(range(len(held)), min(n, len(held)))]
    prompts = [write_prompt(s, rng) for s in scenes]
    seeds = [rng.randrange(2**31) for _ in scenes]
    t0 = time.perf_counter()
    images, _ = generate_batched(engine, prompts, seeds, steps, desc="gallery")
    secs = time.perf_counter() - t0
    pil = to_pil(images)
    adh = metrics.adherence(images, list(scenes))
    truth = [render(s, seed=7) for s in scenes]
    pairs = [im for g, t in zip(pil, truth, strict=True) for im in (g, t)]
    image_grid(pairs, cols=8).save(out / "grid.png")
    rows = []
    for i, (p, im, ok) in enumerate(zip(prompts, pil, adh["ok"], strict=True)):
        im.resize((128, 128), Image.Resampling.NEAREST).save(out / "img" / f"{i:03d}.png")
        truth[i].resize((128, 128), Image.Resampling.NEAREST).save(out / "img" / f"{i:03d}-truth.png")
        rows.append(
            f"<tr><td><img src='img/{i:03d}.png'></td><td><img src='img/{i:03d}-truth.png'></td>"
            f"<td>{html.escape(p)}</td><td>{'✓' if ok else '✗'}</td></tr>"
        )
    page = (
        "<!doctype html><meta charset='utf-8'><title>nirvana bundled model</title>"
        "<style>body{font-family:sans-serif}td{padding:4px;vertical-align:middle}img{image-rendering:pixelated}</style>"
        f"<h1>Bundled model: {n} held-out prompts, {steps} steps</h1>"
        f"<p>adherence (probe agrees on all five attributes): <b>{adh['adherence']:.2f}</b></p>"
        "<table><tr><th>generated</th><th>rendered truth</th><th>prompt</th><th>probe</th></tr>"
        + "".join(rows)
        + "</table>"
    )
    (out / "index.html").write_text(page)
    return {
        "html": out / "index.html",
        "grid": out / "grid.png",
        "adherence": adh["adherence"],
        "seconds": secs,
    }
