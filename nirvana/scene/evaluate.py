"""``nirvana eval-model``: quality of the bundled model, and the K × similarity table the cache calibrates on.

Everything is seeded: the same held-out prompts, seeds and pairs on every run.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nirvana.engine.engine import DiffusionEngine
from nirvana.engine.state import CapturedState
from nirvana.scene.metrics import ProbeMetrics
from nirvana.scene.world import ATTRIBUTES, VALUES, Scene, render, split_scenes, to_array, write_prompt

SIM_BUCKETS: tuple[float, ...] = (0.0, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0001)
TABLE_K: tuple[int, ...] = (5, 10, 15, 20, 25)


def bucket_label(lo: float, hi: float) -> str:
    return f"{lo:.2f}-{min(hi, 1.0):.2f}"


def bucket_of(sim: float) -> int:
    for i in range(len(SIM_BUCKETS) - 1):
        if SIM_BUCKETS[i] <= sim < SIM_BUCKETS[i + 1]:
            return i
    return 0 if sim < 0 else len(SIM_BUCKETS) - 2


def generate_batched(
    engine: DiffusionEngine,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 50,
    guidance: float | None = None,
    start: Sequence[CapturedState] | None = None,
    capture: Sequence[int] | None = None,
    batch: int = 64,
    desc: str | None = None,
) -> tuple[torch.Tensor, list[list[CapturedState]]]:
    """Run ``engine.generate`` over chunks; returns (images (B,3,H,W), states per prompt)."""
    images, states = [], []
    chunks = range(0, len(prompts), batch)
    for i in tqdm(chunks, desc=desc, leave=False, disable=desc is None):
        out = engine.generate(
            list(prompts[i : i + batch]),
            seeds=list(seeds[i : i + batch]),
            steps=steps,
            guidance=guidance,
            start=list(start[i : i + batch]) if start is not None else None,
            capture=list(capture) if capture is not None else [],
        )
        images.append(out.images)
        states.extend(out.states)
    return torch.cat(images), states


def edit_scene(scene: Scene, n_changes: int, rng: random.Random) -> Scene:
    """``scene`` with ``n_changes`` attributes set to other values (colour never equal to background)."""
    while True:
        fields = scene.as_dict()
        for attr in rng.sample(ATTRIBUTES, n_changes):
            fields[attr] = rng.choice([v for v in VALUES[attr] if v != fields[attr]])
        if fields["color"] != fields["background"]:
            return Scene(**fields)


@dataclass
class PromptPair:
    source: str
    target: str
    target_scene: Scene
    changes: int
    seed: int
    similarity: float = 0.0


def make_pairs(n: int, seed: int = 0, scenes: list[Scene] | None = None) -> list[PromptPair]:
    """(cached prompt, new prompt) pairs: a paraphrase of the same scene, or an edit of 1–3 attributes.

    Mixes roughly like a user refining prompts: 30% paraphrase/same scene, 35% one edit, 25% two, 10% three.
    """
    rng = random.Random(seed)
    pool = scenes if scenes is not None else split_scenes()[1]
    pairs = []
    for _ in range(n):
        src = rng.choice(pool)
        changes = rng.choices([0, 1, 2, 3], weights=[30, 35, 25, 10])[0]
        tgt = edit_scene(src, changes, rng)
        pairs.append(PromptPair(write_prompt(src, rng), write_prompt(tgt, rng), tgt, changes, rng.randrange(2**31)))
    return pairs


def cosine_similarities(sources: list[str], targets: list[str]) -> np.ndarray:
    """MiniLM sentence-embedding cosine similarity of each (source, target) pair."""
    from nirvana.engine.text import load_minilm

    st = load_minilm()
    a = st.encode(sources, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
    b = st.encode(targets, batch_size=256, normalize_embeddings=True, convert_to_numpy=True)
    return np.asarray((a * b).sum(axis=1), dtype=np.float64)


def k_similarity_table(
    engine: DiffusionEngine,
    metrics: ProbeMetrics,
    pairs: list[PromptPair],
    steps: int = 50,
    guidance: float | None = None,
    batch: int = 64,
) -> dict[str, Any]:
    """Adherence of targets resumed from their source's state at each K, bucketed by prompt similarity.

    Column K=0 is full generation of the target (same seed), the reference each cell is compared against.
    """
    sims = cosine_similarities([p.source for p in pairs], [p.target for p in pairs])
    for p, s in zip(pairs, sims, strict=True):
        p.similarity = float(s)
    seeds = [p.seed for p in pairs]
    scenes: list[Scene | None] = [p.target_scene for p in pairs]
    scale = steps / 50
    ks = [round(k * scale) for k in TABLE_K]
    _, src_states = generate_batched(
        engine,
        [p.source for p in pairs],
        seeds,
        steps,
        guidance,
        capture=ks,
        batch=batch,
        desc="table: sources",
    )
    full, _ = generate_batched(
        engine, [p.target for p in pairs], seeds, steps, guidance, batch=batch, desc="table: full"
    )
    ok_by_k: dict[int, list[bool]] = {0: metrics.adherence(full, scenes)["ok"]}
    for j, k in enumerate(ks):
        starts = [st[j] for st in src_states]
        imgs, _ = generate_batched(
            engine,
            [p.target for p in pairs],
            seeds,
            steps,
            guidance,
            start=starts,
            batch=batch,
            desc=f"table: K={k}",
        )
        ok_by_k[k] = metrics.adherence(imgs, scenes)["ok"]
    nb = len(SIM_BUCKETS) - 1
    cols = [0, *ks]
    counts = [[0] * len(cols) for _ in range(nb)]
    sums = [[0.0] * len(cols) for _ in range(nb)]
    for i, p in enumerate(pairs):
        b = bucket_of(p.similarity)
        for c, k in enumerate(cols):
            counts[b][c] += 1
            sums[b][c] += float(ok_by_k[k][i])
    adher = [[(sums[b][c] / counts[b][c]) if counts[b][c] else None for c in range(len(cols))] for b in range(nb)]
    return {
        "buckets": [bucket_label(SIM_BUCKETS[i], SIM_BUCKETS[i + 1]) for i in range(nb)],
        "bucket_edges": list(SIM_BUCKETS),
        "k": cols,
        "num_steps": steps,
        "adherence": adher,
        "counts": counts,
        "pairs": len(pairs),
    }


def format_table(table: dict[str, Any]) -> str:
    head = "similarity   " + "".join(f"{'full' if k == 0 else f'K={k}':>14}" for k in table["k"])
    lines = [head]
    for b, label in enumerate(table["buckets"]):
        cells = []
        for c in range(len(table["k"])):
            a, n = table["adherence"][b][c], table["counts"][b][c]
            cells.append(f"{'-' if a is None else f'{a:.2f}'} ({n:>3})".rjust(14))
        lines.append(f"{label:<13}" + "".join(cells))
    return "\n".join(lines)


def evaluate_model(
    engine: DiffusionEngine,
    metrics: ProbeMetrics,
    steps: int = 50,
    guidance: float | None = None,
    pairs: int = 240,
    batch: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Full-generation quality on held-out combinations + probe accuracy + the K × similarity table."""
    _, held = split_scenes()
    rng = random.Random(seed)
    prompts = [write_prompt(s, rng) for s in held]
    seeds = [rng.randrange(2**31) for _ in held]
    t0 = time.perf_counter()
    images, _ = generate_batched(engine, prompts, seeds, steps, guidance, batch=batch, desc="held-out")
    batched_s = (time.perf_counter() - t0) / len(held)
    adh = metrics.adherence(images, list(held))
    refs = torch.from_numpy(to_array([render(s, seed=1000 + i) for i, s in enumerate(held) for _ in range(2)]))
    probe_fid = metrics.fid(images, refs)
    real = torch.from_numpy(to_array([render(s, seed=5000 + i) for i, s in enumerate(held)]))
    probe_acc = metrics.adherence(real, list(held))
    # Single-image latency (warm): the ≤ 2 s target is for one 50-step image.
    engine.generate([prompts[0]], seeds=[seeds[0]], steps=steps, guidance=guidance, capture=[])
    t1 = time.perf_counter()
    engine.generate([prompts[0]], seeds=[seeds[0]], steps=steps, guidance=guidance, capture=[])
    single_s = time.perf_counter() - t1
    table = (
        k_similarity_table(engine, metrics, make_pairs(pairs, seed=seed + 1), steps, guidance, batch) if pairs else None
    )
    return {
        "model_key": engine.model_key(),
        "held_out_scenes": len(held),
        "steps": steps,
        "guidance": engine.c.default_guidance if guidance is None else guidance,
        "adherence": adh["adherence"],
        "per_attribute": adh["per_attribute"],
        "probe_accuracy": probe_acc["adherence"],
        "probe_per_attribute": probe_acc["per_attribute"],
        "probe_fid": probe_fid,
        "seconds_per_image_single": single_s,
        "seconds_per_image_batched": batched_s,
        "table": table,
    }
